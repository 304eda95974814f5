"""Triton kernels of the per-label binary losses against sparse targets (``xmlsparse.train.losses``).

The loss is the mean over all ``B * L`` pairs of ``f(z, y)``, ``y = 1`` at a point's few labels and 0
elsewhere. Three passes, all in the forward:

* ``positives``: over the (row, label) pairs, the partial sums of ``f(z, 1) - f(z, 0)`` and the
  gradients ``f'(z, 1) / (B L)``, kept aside in a buffer of one float a pair;
* ``negatives``: one read of every logit gives each program's partial sum of ``f(z, 0)`` (a float32
  buffer, summed afterwards by torch: deterministic, no atomics) and writes ``f'(z, 0) / (B L)``, the
  gradient as if every target were 0; it runs over the logits' storage, so either layout works,
  and it may write over the logits themselves (``in_place``);
* ``scatter``: the positives' gradients overwrite theirs (labels within a row are distinct).

The autograd function keeps only that gradient for backward, not the logits, so the logits are read
once and their gradient written once; with ``consume_logits`` it is written over the logits and
the step holds one ``B x L`` buffer instead of two. Logits are float32, bfloat16 or float16, laid
out row-major ``[B, L]`` or as the ``[L, B]`` storage the fixed fan-in head writes for training
(other strides are copied first); sums run in float32, offsets in int64 (``B * L`` may pass 2**31).
Label ids outside ``[0, L)`` are masked out, not reported (checking would cost a host sync; the
data loader validates them). Under ``TRITON_INTERPRET=1`` the launchers run on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# Loss names of ``train.loss`` mapped to the kernels' LOSS constant.
LOSS_KINDS = {"squared-hinge": 0, "bce": 1}
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Logits per program of the negatives pass: 16 elements per thread at 8 warps, and B * L / 4096
# partial sums (21k at B=128, L=670k) for the final torch sum.
BLOCK_LOGITS = 4096
BLOCK_POSITIVES = 256


@triton.jit
def _negative_loss(z, LOSS: tl.constexpr):
    if LOSS == 0:  # max(0, 1 + z)^2 (target -1)
        m = tl.maximum(1.0 + z, 0.0)
        return m * m
    else:  # softplus(z) = max(z, 0) + log(1 + exp(-|z|))
        return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _negative_grad(z, LOSS: tl.constexpr):
    if LOSS == 0:
        return 2.0 * tl.maximum(1.0 + z, 0.0)
    else:
        return tl.sigmoid(z)


@triton.jit
def _positive_minus_negative(z, LOSS: tl.constexpr):
    if LOSS == 0:  # max(0, 1 - z)^2 - max(0, 1 + z)^2
        p = tl.maximum(1.0 - z, 0.0)
        n = tl.maximum(1.0 + z, 0.0)
        return p * p - n * n
    else:  # softplus(-z) - softplus(z) = -z exactly
        return -z


@triton.jit
def _positive_grad(z, LOSS: tl.constexpr):
    if LOSS == 0:
        return -2.0 * tl.maximum(1.0 - z, 0.0)
    else:
        return tl.sigmoid(z) - 1.0


@triton.jit
def _negatives_kernel(z_ptr, grad_ptr, partial_ptr, n, inv_count, LOSS: tl.constexpr, BLOCK: tl.constexpr):
    # Elementwise over the logits' storage, whatever their layout ([B, L] or [L, B]): a program
    # reads and then writes the same elements, so grad_ptr may be z_ptr.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    value = tl.where(mask, _negative_loss(z, LOSS), 0.0)
    tl.store(partial_ptr + pid, tl.sum(value, axis=0))
    grad = _negative_grad(z, LOSS) * inv_count
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _positives_kernel(
    z_ptr, stride_zb, stride_zl, pos_grad_ptr, partial_ptr, rows_ptr, labels_ptr, n_pairs, B, L, inv_count,
    LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Reads the logits at the positive pairs (before the negatives pass may overwrite them) and
    # keeps their gradient aside in pos_grad_ptr [n_pairs].
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    row = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + offs, mask=mask, other=0).to(tl.int64)
    mask = mask & (row >= 0) & (row < B) & (label >= 0) & (label < L)
    z = tl.load(z_ptr + row * stride_zb + label * stride_zl, mask=mask, other=0.0).to(tl.float32)
    value = tl.where(mask, _positive_minus_negative(z, LOSS), 0.0)
    tl.store(partial_ptr + pid, tl.sum(value, axis=0))
    tl.store(pos_grad_ptr + offs, _positive_grad(z, LOSS) * inv_count, mask=offs < n_pairs)


@triton.jit
def _scatter_positives_kernel(
    grad_ptr, stride_gb, stride_gl, pos_grad_ptr, rows_ptr, labels_ptr, n_pairs, B, L, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    row = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + offs, mask=mask, other=0).to(tl.int64)
    mask = mask & (row >= 0) & (row < B) & (label >= 0) & (label < L)
    grad = tl.load(pos_grad_ptr + offs, mask=mask, other=0.0)
    tl.store(grad_ptr + row * stride_gb + label * stride_gl, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, loss: str) -> None:
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    if logits.dim() != 2 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be a float32, bfloat16 or float16 [B, L] tensor, "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    if rows.shape != labels.shape or rows.dim() != 1:
        raise ValueError(f"rows and labels must be two 1-d tensors of one length, "
                         f"got {tuple(rows.shape)} and {tuple(labels.shape)}")
    devices = {t.device for t in (logits, rows, labels)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")
    if logits.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton loss kernels need CUDA tensors (or TRITON_INTERPRET=1), got {logits.device}")


def _dense_layout(t: torch.Tensor) -> bool:
    """True when ``t [B, L]`` fills its storage row-major or column-major (no gaps, no overlap)."""
    return t.is_contiguous() or t.t().is_contiguous()


def loss_and_grad(
    logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, loss: str, *, in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean loss, its gradient)`` of ``logits [B, L]`` with targets 1 at the pairs
    ``(rows[i], labels[i])`` (distinct within a row) and 0 elsewhere; ``loss`` is a name of
    ``LOSS_KINDS``. The loss is a float32 scalar; the gradient has the logits' dtype and layout
    (row-major ``[B, L]`` or the transposed ``[L, B]`` storage the head writes for training).
    ``in_place=True`` writes the gradient over the logits and returns them: no second ``B x L``
    buffer exists."""
    _check(logits, rows, labels, loss)
    batch, n_labels = logits.shape
    if not _dense_layout(logits):
        logits = logits.contiguous()
    grad = logits if in_place else torch.empty_like(logits)  # empty_like keeps the layout
    count = batch * n_labels
    if count == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=logits.device), grad
    kind = LOSS_KINDS[loss]
    inv_count = 1.0 / count
    n_blocks = triton.cdiv(count, BLOCK_LOGITS)
    n_pairs = rows.numel()
    pair_programs = triton.cdiv(n_pairs, BLOCK_POSITIVES)
    partials = torch.empty(n_blocks + pair_programs, dtype=torch.float32, device=logits.device)
    rows, labels = rows.contiguous(), labels.contiguous()
    pos_grad = torch.empty(n_pairs, dtype=torch.float32, device=logits.device)
    if n_pairs:
        _positives_kernel[(pair_programs,)](
            logits, logits.stride(0), logits.stride(1), pos_grad, partials[n_blocks:], rows, labels, n_pairs,
            batch, n_labels, inv_count, LOSS=kind, BLOCK=BLOCK_POSITIVES, num_warps=4,
        )
    _negatives_kernel[(n_blocks,)](
        logits, grad, partials, count, inv_count, LOSS=kind, BLOCK=BLOCK_LOGITS, num_warps=8,
    )
    if n_pairs:
        # Same stream, after the negatives pass: the positive pairs' gradient overwrites theirs.
        _scatter_positives_kernel[(pair_programs,)](
            grad, grad.stride(0), grad.stride(1), pos_grad, rows, labels, n_pairs, batch, n_labels,
            BLOCK=BLOCK_POSITIVES, num_warps=4,
        )
    return partials.sum() / count, grad


class SparseTargetLossTriton(torch.autograd.Function):
    """Mean loss over ``B * L`` pairs; keeps only the gradient computed in the forward."""

    @staticmethod
    def forward(ctx, logits, rows, labels, loss, consume_logits):  # noqa: D102 (autograd protocol)
        value, grad = loss_and_grad(logits, rows, labels, loss, in_place=consume_logits)
        if grad is logits:
            # The logits now hold their gradient: any autograd use of them saved elsewhere must fail.
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # noqa: D102 (autograd protocol)
        (grad,) = ctx.saved_tensors
        # In place: the gradient buffer is released with this node, so no second copy is made.
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None


def sparse_target_loss(
    logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, loss: str, *, consume_logits: bool = False
) -> torch.Tensor:
    """Differentiable mean loss (float32 scalar) of ``logits [B, L]`` against targets 1 at the
    pairs ``(rows, labels)``; ``loss`` is ``"squared-hinge"`` or ``"bce"``. With ``consume_logits``
    the logits' storage is reused for their gradient: the caller must not read the logits again."""
    _check(logits, rows, labels, loss)
    return SparseTargetLossTriton.apply(logits, rows, labels, loss, consume_logits)
