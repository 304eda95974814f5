"""Losses against sparse label lists, never a dense ``B x L`` target matrix.

Every (point, label) pair is a binary problem with target 1 at the point's labels and 0 elsewhere,
so the loss is ``f(z, 0)`` summed over all logits plus ``f(z, 1) - f(z, 0)`` at the few positive
positions, gathered by (row, label id). The reduction is the mean over all ``B * L`` pairs, as in
the paper (the sum over labels would only rescale the learning rate by ``L``).

``softmax`` is the one loss that is not per label: each point's labels share one softmax over all
labels (cross-entropy against the target spread evenly over the point's labels, the "pick all
labels, normalised" reduction). It is averaged over the points.

The losses are autograd functions that keep only the logits for the backward pass and work on
chunks of rows, so the temporaries stay small however many labels there are. Logits of any float
dtype (bf16 under autocast) are evaluated in float32 (float64 stays float64); the loss comes back
in that precision and the gradient in the logits' dtype.

``loss_fn`` sends CUDA logits to the Triton kernels of ``xmlsparse.ops.sparse_target_loss`` instead:
one read of the logits gives the loss and its gradient, and only that gradient is kept for backward.
These torch functions stay the CPU path and the kernels' test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from xmlsparse.errors import XMLSparseError
from xmlsparse.ops import resolve_impl

# Elements of the largest float32 temporary a chunk of rows may create.
CHUNK_ELEMENTS = 1 << 22

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def label_positions(y_indices: torch.Tensor, y_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, labels)`` of every positive pair, from the CSR label rows of a batch."""
    counts = y_ptr[1:] - y_ptr[:-1]
    rows = torch.repeat_interleave(
        torch.arange(counts.numel(), device=y_ptr.device), counts, output_size=y_indices.numel()
    )
    return rows, y_indices.long()


def _row_chunks(logits: torch.Tensor):
    n_rows, n_labels = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(1, n_labels))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


@dataclass(frozen=True)
class BinaryLoss:
    """A per-pair loss ``f(z, y)`` for targets 0 and 1, with its derivatives in ``z``."""

    negative: Callable[[torch.Tensor], torch.Tensor]  # f(z, 0)
    positive: Callable[[torch.Tensor], torch.Tensor]  # f(z, 1)
    negative_grad: Callable[[torch.Tensor], torch.Tensor]
    positive_grad: Callable[[torch.Tensor], torch.Tensor]


SQUARED_HINGE = BinaryLoss(  # max(0, 1 - y z)^2 with y in {-1, +1}
    negative=lambda z: torch.relu(1 + z).square(),
    positive=lambda z: torch.relu(1 - z).square(),
    negative_grad=lambda z: 2 * torch.relu(1 + z),
    positive_grad=lambda z: -2 * torch.relu(1 - z),
)

BCE = BinaryLoss(  # binary cross-entropy with logits: softplus(z) - y z
    negative=torch.nn.functional.softplus,
    positive=lambda z: torch.nn.functional.softplus(-z),
    negative_grad=torch.sigmoid,
    positive_grad=lambda z: torch.sigmoid(z) - 1,
)


class _SparseTargetLoss(torch.autograd.Function):
    """Mean over all ``B * L`` pairs of ``loss.f(z, y)``; keeps only the logits for backward."""

    @staticmethod
    def forward(ctx, logits, rows, labels, loss):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(logits, rows, labels)
        ctx.loss = loss
        acc = _accumulation_dtype(logits)
        total = torch.zeros((), dtype=acc, device=logits.device)
        for part in _row_chunks(logits):
            total += loss.negative(logits[part].to(acc)).sum()
        positives = logits[rows, labels].to(acc)
        total += (loss.positive(positives) - loss.negative(positives)).sum()
        return total / logits.numel()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # noqa: D102 (autograd protocol)
        logits, rows, labels = ctx.saved_tensors
        loss = ctx.loss
        acc = _accumulation_dtype(logits)
        scale = grad_loss.to(acc) / logits.numel()
        grad = torch.empty_like(logits)
        for part in _row_chunks(logits):
            grad[part] = loss.negative_grad(logits[part].to(acc)) * scale
        # Labels within a row are distinct, so overwriting the positive pairs is exact.
        grad[rows, labels] = (loss.positive_grad(logits[rows, labels].to(acc)) * scale).to(grad.dtype)
        return grad, None, None, None


class _SoftmaxLoss(torch.autograd.Function):
    """Mean over the rows of ``sum_j y_j / |y| * (logsumexp(z) - z_j)``; a row without labels adds
    nothing. Keeps only the logits for backward, and works a chunk of rows at a time."""

    @staticmethod
    def forward(ctx, logits, rows, labels, per_label):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(logits, rows, labels, per_label)
        acc = _accumulation_dtype(logits)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for part in _row_chunks(logits):
            lse[part] = torch.logsumexp(logits[part].to(acc), dim=1)
        ctx.lse = lse
        total = ((lse[rows] - logits[rows, labels].to(acc)) * per_label[rows]).sum()
        return total / logits.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # noqa: D102 (autograd protocol)
        logits, rows, labels, per_label = ctx.saved_tensors
        acc = _accumulation_dtype(logits)
        scale = grad_loss.to(acc) / logits.shape[0]
        # d/dz_k = (softmax(z)_k * sum_j y_j / |y|) - y_k / |y|; the sum is 1, or 0 without labels.
        has_labels = (per_label > 0).to(acc)
        grad = torch.empty_like(logits)
        for part in _row_chunks(logits):
            probs = torch.exp(logits[part].to(acc) - ctx.lse[part, None])
            grad[part] = probs * (has_labels[part, None] * scale)
        grad[rows, labels] = (grad[rows, labels].to(acc) - per_label[rows] * scale).to(grad.dtype)
        return grad, None, None, None


def _accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_shapes(logits: torch.Tensor, y_ptr: torch.Tensor) -> None:
    if logits.dim() != 2 or y_ptr.numel() != logits.shape[0] + 1:
        raise ValueError(
            f"logits must be [B, L] with B + 1 label row pointers, got logits {tuple(logits.shape)} "
            f"and {y_ptr.numel()} row pointers"
        )


def sparse_target_loss(
    logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor, loss: BinaryLoss
) -> torch.Tensor:
    """Mean of ``loss`` over all pairs of ``logits [B, L]``, the positives given as CSR label rows
    (``y_indices`` flat label ids, distinct within a row; ``y_ptr [B + 1]``)."""
    _check_shapes(logits, y_ptr)
    rows, labels = label_positions(y_indices, y_ptr)
    return _SparseTargetLoss.apply(logits, rows, labels, loss)


def squared_hinge_loss(logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
    """Mean over ``B * L`` of ``max(0, 1 - y z)^2``, ``y = +1`` at the labels and ``-1`` elsewhere."""
    return sparse_target_loss(logits, y_indices, y_ptr, SQUARED_HINGE)


def bce_loss(logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
    """Mean over ``B * L`` of ``softplus(z) - y z``, ``y = 1`` at the labels and 0 elsewhere."""
    return sparse_target_loss(logits, y_indices, y_ptr, BCE)


def softmax_loss(logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
    """Mean over the ``B`` rows of the cross-entropy between ``softmax(z)`` and the row's labels
    weighted ``1 / |y|`` each; rows without labels count as zero."""
    _check_shapes(logits, y_ptr)
    rows, labels = label_positions(y_indices, y_ptr)
    counts = (y_ptr[1:] - y_ptr[:-1]).to(_accumulation_dtype(logits))
    per_label = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    return _SoftmaxLoss.apply(logits, rows, labels, per_label)


# Keyed by the choices of train.loss (config.CHOICES, which configs are checked against);
# tests/train/test_losses.py checks that the two agree.
LOSSES: dict[str, LossFn] = {"squared-hinge": squared_hinge_loss, "bce": bce_loss, "softmax": softmax_loss}



# The per-label losses, which the kernels of ``xmlsparse.ops.sparse_target_loss`` also compute;
# softmax needs each row's logsumexp first and stays on the torch path.
TRITON_LOSSES = ("squared-hinge", "bce")


def _uses_triton(logits: torch.Tensor, impl: str) -> bool:
    """Whether ``impl`` picks the Triton kernels for these logits; ``auto`` does for CUDA logits of
    a dtype they read (float64 stays on the torch path)."""
    if resolve_impl(impl, logits.device) != "triton":
        return False
    from xmlsparse.ops.sparse_target_loss import LOGIT_DTYPES

    return impl == "triton" or logits.dtype in LOGIT_DTYPES


def loss_fn(name: str, impl: str = "auto", consume_logits: bool = False) -> LossFn:
    """The loss called ``name`` (``train.loss``): ``(logits, y_indices, y_ptr) -> scalar``. With
    ``impl="auto"`` CUDA logits go through the Triton kernels (``xmlsparse.ops.sparse_target_loss``,
    which keep the gradient instead of the logits), others through the torch functions above;
    ``"triton"`` or ``"reference"`` forces one. ``consume_logits`` lets the Triton kernels write
    the gradient over the logits (the training step, which drops them after the loss)."""
    if name not in LOSSES:
        raise XMLSparseError(f"train.loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    resolve_impl(impl, torch.device("cpu"))  # rejects an unknown impl now, not at the first step
    torch_loss = LOSSES[name]
    if name not in TRITON_LOSSES:
        return torch_loss

    def loss(logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
        if not _uses_triton(logits, impl):
            return torch_loss(logits, y_indices, y_ptr)
        from xmlsparse.ops import sparse_target_loss as triton_losses

        _check_shapes(logits, y_ptr)
        rows, labels = label_positions(y_indices, y_ptr)
        return triton_losses.sparse_target_loss(logits, rows, labels, name, consume_logits=consume_logits)

    return loss
