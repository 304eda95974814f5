"""Triton kernels of the per-label binary losses against sparse targets (``xmlsparse.train.losses``).

The loss is the mean over all ``B * L`` pairs of ``f(z, y)``, ``y = 1`` at a point's few labels and 0
elsewhere. Two passes, both in the forward:

* ``negatives``: one read of the logits gives each program's partial sum of ``f(z, 0)`` (a float32
  buffer, summed afterwards by torch: deterministic, no atomics) and writes ``f'(z, 0) / (B L)``, the
  gradient as if every target were 0, into a ``[B, L]`` buffer of the logits' dtype.
* ``positives``: over the (row, label) pairs, adds ``f(z, 1) - f(z, 0)`` to the partial sums and
  overwrites the gradient there with ``f'(z, 1) / (B L)`` (labels within a row are distinct).

The autograd function keeps only that gradient for backward, not the logits, so the logits are read
once and their gradient written once. Logits are float32, bfloat16 or float16 with the last dim
contiguous (any row stride); sums run in float32, offsets in int64 (``B * L`` may pass 2**31).
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
# Labels of one row per program of the negatives pass: 16 elements per thread at 8 warps, and about
# B * L / 4096 partial sums (21k at B=128, L=670k) for the final torch sum.
BLOCK_LABELS = 4096
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
def _negatives_kernel(
    z_ptr, stride_zb, grad_ptr, partial_ptr, L, n_blocks, inv_count,
    LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // n_blocks).to(tl.int64)
    offs = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    z = tl.load(z_ptr + row * stride_zb + offs, mask=mask, other=0.0).to(tl.float32)
    value = tl.where(mask, _negative_loss(z, LOSS), 0.0)
    tl.store(partial_ptr + pid, tl.sum(value, axis=0))
    grad = _negative_grad(z, LOSS) * inv_count
    tl.store(grad_ptr + row * L + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _positives_kernel(
    z_ptr, stride_zb, grad_ptr, partial_ptr, rows_ptr, labels_ptr, n_pairs, B, L, inv_count,
    LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    row = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + offs, mask=mask, other=0).to(tl.int64)
    mask = mask & (row >= 0) & (row < B) & (label >= 0) & (label < L)
    z = tl.load(z_ptr + row * stride_zb + label, mask=mask, other=0.0).to(tl.float32)
    value = tl.where(mask, _positive_minus_negative(z, LOSS), 0.0)
    tl.store(partial_ptr + pid, tl.sum(value, axis=0))
    grad = _positive_grad(z, LOSS) * inv_count
    tl.store(grad_ptr + row * L + label, grad.to(grad_ptr.dtype.element_ty), mask=mask)


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


def loss_and_grad(
    logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, loss: str, *,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean loss, its gradient)`` of ``logits [B, L]`` with targets 1 at the pairs
    ``(rows[i], labels[i])`` (distinct within a row) and 0 elsewhere; ``loss`` is a name of
    ``LOSS_KINDS``. The loss is a float32 scalar, the gradient (written into ``grad_out`` when
    given, contiguous) has the logits' dtype."""
    _check(logits, rows, labels, loss)
    batch, n_labels = logits.shape
    if n_labels > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    if grad_out is None:
        grad_out = torch.empty(batch, n_labels, dtype=logits.dtype, device=logits.device)
    elif grad_out.shape != logits.shape or grad_out.dtype != logits.dtype or not grad_out.is_contiguous():
        raise ValueError(f"grad_out must be a contiguous {logits.dtype} tensor of shape {tuple(logits.shape)}, "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)}")
    count = batch * n_labels
    if count == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=logits.device), grad_out
    kind = LOSS_KINDS[loss]
    inv_count = 1.0 / count
    block = min(BLOCK_LABELS, triton.next_power_of_2(n_labels))
    n_blocks = triton.cdiv(n_labels, block)
    n_pairs = rows.numel()
    pair_programs = triton.cdiv(n_pairs, BLOCK_POSITIVES)
    partials = torch.empty(batch * n_blocks + pair_programs, dtype=torch.float32, device=logits.device)
    _negatives_kernel[(batch * n_blocks,)](
        logits, logits.stride(0), grad_out, partials, n_labels, n_blocks, inv_count,
        LOSS=kind, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    if n_pairs:
        # Runs after the negatives pass on the same stream, so its gradient stores win.
        _positives_kernel[(pair_programs,)](
            logits, logits.stride(0), grad_out, partials[batch * n_blocks:], rows.contiguous(),
            labels.contiguous(), n_pairs, batch, n_labels, inv_count,
            LOSS=kind, BLOCK=BLOCK_POSITIVES, num_warps=4,
        )
    return partials.sum() / count, grad_out


class SparseTargetLossTriton(torch.autograd.Function):
    """Mean loss over ``B * L`` pairs; keeps only the gradient computed in the forward."""

    @staticmethod
    def forward(ctx, logits, rows, labels, loss):  # noqa: D102 (autograd protocol)
        value, grad = loss_and_grad(logits, rows, labels, loss)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # noqa: D102 (autograd protocol)
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def sparse_target_loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Differentiable mean loss (float32 scalar) of ``logits [B, L]`` against targets 1 at the
    pairs ``(rows, labels)``; ``loss`` is ``"squared-hinge"`` or ``"bce"``."""
    _check(logits, rows, labels, loss)
    return SparseTargetLossTriton.apply(logits, rows, labels, loss)
