"""Triton kernels of the fixed fan-in layer ``z[b, l] = sum_k W[l, k] * h[b, I[l, k]] + bias[l]``.

Layout: the kernels read activations as ``h^T [D, ldh]`` (``ldh`` = B rounded up to 16 when
B >= 16, the padding zeroed), so one gathered index reads B contiguous values; indices ``I``
int32 ``[L, K]`` and weights ``W [L, K]`` are row-major, a label's K slots contiguous. When a
gradient is wanted the logits are stored ``[L, B]`` (a ``[B, L]`` tensor with strides ``(1, B)``),
so that a gradient of that layout reaches the by-input backward without a transposed copy. Every
kernel accumulates in float32 and forms offsets in int64, so ``L*K``, ``B*L`` and ``D*B`` may
pass 2**31. No ``[B, L, K]`` temporary exists: each program holds one ``[labels, slots, batch]``
tile in registers.

Passes (each gathers B*L*K*bytes rows from L2):

* ``forward``: programs over (label block, batch block), a loop over slot blocks; the batch blocks
  run one after another when h^T is larger than ``HOT_L2_SHARE`` of L2.
* ``grad_weight``: programs over label blocks, loops over batch and slot blocks; the bias
  gradient (a sum over the batch) comes from the same loads of ``grad_out``.
* ``grad_input`` (a scatter-add into ``[D, B]``), two strategies:
  ``"csc"``  a by-input copy of the index (for each input the slots ``l*K + k`` that read it),
             built on the device and cached until the indices change; labels are cut into chunks
             whose ``grad_out^T`` rows and weights fit in L2, and each input sums a chunk's
             contributions in registers and adds them once per chunk. From ``FUSED_MIN_BATCH``
             on, the same pass also gives grad_W (one read of the ``grad_out^T`` rows for both).
  ``"atomic"`` one pass over the labels that adds ``W[l, k] * g[:, l]`` into an fp32 ``[D, B]``
             buffer with atomics (fused with grad_weight in the autograd backward).
  ``DEFAULT_GRAD_INPUT_STRATEGY`` holds the faster one on an H100 (numbers beside it).

Dtypes: h is read as float32, bfloat16 or float16, W as float32 or bfloat16. Outside autocast the
logits take ``promote_types(h.dtype, W.dtype)`` (as the reference op). Under autocast (the trainer
runs the head under bf16 autocast on CUDA) h is cast to the autocast dtype and the logits come
out in that dtype, as ``torch.nn.functional.linear`` does, while W stays in its own dtype and is
read as is. Gradients take the dtype of the tensor they belong to.

Indices must lie in ``[0, D)``; the per-step kernels do not check (that would cost a host sync),
the by-input index build does. Under ``TRITON_INTERPRET=1`` the launchers run on CPU tensors.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from xmlsparse.ops.adam import UPDATE_GRAD_DTYPE, RowRangeUpdate, WeightUpdate
from xmlsparse.ops.adam_kernels import adam_update

GRAD_INPUT_STRATEGIES = ("csc", "atomic")
# Backward (grad_h + grad_W + grad_bias) on one H100, L=670,091, D=65,536, bf16 (docs/benchmarks.md):
# csc 1.50 / 3.08 / 7.95 ms against atomic 1.92 / 10.78 / 40.2 ms at (K=64, B=32) / (K=64, B=128) /
# (K=32, B=512). The fp32 atomics into [D, B] run at about 0.5-0.8e12 adds/s, while the by-input
# pass gathers at L2 speed and writes each input once per label chunk; the index rebuild (2.4-5.2
# ms) is paid only when rewiring changes the indices.
DEFAULT_GRAD_INPUT_STRATEGY = "csc"
# From this batch on, the "csc" backward computes grad_W inside the by-input pass (one read of the
# grad_out^T rows for both gradients); below it, a separate grad_weight pass is faster (H100:
# fused 2.98 ms vs 2.33 + 1.49 at B=128, K=64; 1.62 ms vs 0.92 + 0.42 at B=32).
FUSED_MIN_BATCH = 128
# Slots of the bf16 weight gradient that a backward taking the Adam step holds at once: the step
# runs over label ranges, each right after its gradient is computed, so that the gradient of the
# whole head never exists (amazon-3m shape, K = 96: 32 MiB instead of 515 MiB).
UPDATE_RANGE_SLOTS = 1 << 24
# Share of the L2 cache one label chunk of the by-input grad_input pass may fill with its
# grad_out^T rows and weights (the rest holds the [D, B] accumulator and streamed indices).
CSC_L2_SHARE = 0.5
# Share of L2 the gathered rows of h^T may fill before the forward runs batch block after batch
# block and grad_weight splits the batch into column ranges.
HOT_L2_SHARE = 1 / 3
# L2 size assumed when the device does not report one (the CPU interpreter): an H100's 50 MB.
DEFAULT_L2_BYTES = 50 * 1024 * 1024

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    ht_ptr, ldh, idx_ptr, w_ptr, bias_ptr, z_ptr, stride_zb, stride_zl, B, B_LOAD, L, K,
    HAS_BIAS: tl.constexpr, BATCH_MAJOR: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    if BATCH_MAJOR:
        # All label blocks of one batch block run together: only BLOCK_B columns of h^T are hot.
        n_l = tl.cdiv(L, BLOCK_L)
        pid_l = pid % n_l
        pid_b = pid // n_l
    else:
        n_b = tl.cdiv(B, BLOCK_B)
        pid_l = pid // n_b
        pid_b = pid % n_b
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_l = offs_l < L
    mask_b_load = offs_b < B_LOAD  # padded columns of h^T are zero: lets the loads vectorise
    row = offs_l.to(tl.int64) * K
    acc = tl.zeros((BLOCK_L, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_lk = mask_l[:, None] & (offs_k < K)[None, :]
        slot = row[:, None] + offs_k[None, :]
        idx = tl.load(idx_ptr + slot, mask=mask_lk, other=0)
        w = tl.load(w_ptr + slot, mask=mask_lk, other=0.0).to(tl.float32)
        src = ht_ptr + (idx.to(tl.int64) * ldh)[:, :, None] + offs_b[None, None, :]
        x = tl.load(src, mask=mask_lk[:, :, None] & mask_b_load[None, None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32) * w[:, :, None], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_l, mask=mask_l, other=0.0).to(tl.float32)[:, None]
    dst = z_ptr + offs_b.to(tl.int64)[None, :] * stride_zb + offs_l.to(tl.int64)[:, None] * stride_zl
    tl.store(dst, acc.to(z_ptr.dtype.element_ty), mask=mask_l[:, None] & (offs_b < B)[None, :])


@triton.jit
def _grad_out_tile(g_ptr, stride_gb, stride_gl, offs_l, offs_b, mask_l, mask_b):
    """The float32 ``[labels, batch]`` tile of ``grad_out`` (any strides) at ``offs_l`` x ``offs_b``."""
    src = g_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l.to(tl.int64)[:, None] * stride_gl
    return tl.load(src, mask=mask_l[:, None] & mask_b[None, :], other=0.0).to(tl.float32)


@triton.jit
def _grad_weight_kernel(
    ht_ptr, ldh, g_ptr, stride_gb, stride_gl, idx_ptr, gw_ptr, gb_ptr, B, B_LOAD, L, K, accumulate,
    w_ptr, m_ptr, v_ptr, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, seed,
    HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr, DECOUPLED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Batch blocks outer, slot blocks inner: each grad_out tile is loaded once; with more than one
    # batch block (or ``accumulate``: an earlier launch did other columns) the partial sums go
    # through gw_ptr (float32 then), owned by this program alone. With UPDATE (one batch block, so
    # each tile's gradient is final) the tile takes its Adam step at once, from the gradient
    # rounded to bf16 as the buffered update would read it, with the same rounding bits (Philox
    # counter = slot): no gradient is stored at all.
    pid_l = tl.program_id(0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    row = offs_l.to(tl.int64) * K
    gb_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        g = _grad_out_tile(g_ptr, stride_gb, stride_gl, offs_l, offs_b, mask_l, mask_b)
        if HAS_BIAS:
            gb_acc += tl.sum(g, axis=1)
        mask_b_load = offs_b < B_LOAD
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_lk = mask_l[:, None] & (offs_k < K)[None, :]
            slot = row[:, None] + offs_k[None, :]
            idx = tl.load(idx_ptr + slot, mask=mask_lk, other=0)
            src = ht_ptr + (idx.to(tl.int64) * ldh)[:, :, None] + offs_b[None, None, :]
            x = tl.load(src, mask=mask_lk[:, :, None] & mask_b_load[None, None, :], other=0.0)
            part = tl.sum(x.to(tl.float32) * g[:, None, :], axis=2)
            if UPDATE:
                grad = part.to(tl.bfloat16).to(tl.float32)
                adam_update(w_ptr, m_ptr, v_ptr, slot, mask_lk, grad, lr, beta1, beta2, eps, weight_decay,
                            step_size, bc2_sqrt, seed, slot, DECOUPLED)
            else:
                carried = (offs_k * 0 + b0 + accumulate > 0)[None, :]  # earlier batch columns to add to
                part += tl.load(gw_ptr + slot, mask=mask_lk & carried, other=0.0).to(tl.float32)
                tl.store(gw_ptr + slot, part.to(gw_ptr.dtype.element_ty), mask=mask_lk)
    if HAS_BIAS:
        gb_acc += tl.load(gb_ptr + offs_l, mask=mask_l & (offs_l * 0 + accumulate > 0), other=0.0).to(tl.float32)
        tl.store(gb_ptr + offs_l, gb_acc.to(gb_ptr.dtype.element_ty), mask=mask_l)


@triton.jit
def _backward_atomic_kernel(
    g_ptr, stride_gb, stride_gl, idx_ptr, w_ptr, acc_ptr, ld_acc, ht_ptr, ldh, gw_ptr, gb_ptr,
    B, B_LOAD, L, K,
    WITH_GRAD_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # grad_h^T[I[l, k], b] += W[l, k] * g[b, l] by relaxed fp32 atomics into acc_ptr [D, ld_acc];
    # with WITH_GRAD_WEIGHT the same grad_out tile also gives grad_W (and the bias gradient).
    pid_l = tl.program_id(0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    row = offs_l.to(tl.int64) * K
    gb_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        g = _grad_out_tile(g_ptr, stride_gb, stride_gl, offs_l, offs_b, mask_l, mask_b)
        if HAS_BIAS:
            gb_acc += tl.sum(g, axis=1)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_lk = mask_l[:, None] & (offs_k < K)[None, :]
            slot = row[:, None] + offs_k[None, :]
            idx = tl.load(idx_ptr + slot, mask=mask_lk, other=0).to(tl.int64)
            w = tl.load(w_ptr + slot, mask=mask_lk, other=0.0).to(tl.float32)
            dst = acc_ptr + (idx * ld_acc)[:, :, None] + offs_b[None, None, :]
            tl.atomic_add(dst, w[:, :, None] * g[:, None, :], mask=mask_lk[:, :, None] & mask_b[None, None, :],
                          sem="relaxed")
            if WITH_GRAD_WEIGHT:
                src = ht_ptr + (idx * ldh)[:, :, None] + offs_b[None, None, :]
                x = tl.load(src, mask=mask_lk[:, :, None] & (offs_b < B_LOAD)[None, None, :], other=0.0)
                part = tl.sum(x.to(tl.float32) * g[:, None, :], axis=2)
                part += tl.load(gw_ptr + slot, mask=mask_lk & (b0 > 0), other=0.0).to(tl.float32)
                tl.store(gw_ptr + slot, part.to(gw_ptr.dtype.element_ty), mask=mask_lk)
    if HAS_BIAS:
        tl.store(gb_ptr + offs_l, gb_acc.to(gb_ptr.dtype.element_ty), mask=mask_l)


@triton.jit
def _transpose_kernel(g_ptr, stride_gb, stride_gl, gt_ptr, ldg, B, L, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr):
    # grad_out [B, L] (any strides) -> grad_out^T [L, ldg], the padding columns zeroed.
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    for b0 in range(0, ldg, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        src = g_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l.to(tl.int64)[:, None] * stride_gl
        x = tl.load(src, mask=mask_l[:, None] & (offs_b < B)[None, :], other=0.0)
        dst = gt_ptr + offs_l.to(tl.int64)[:, None] * ldg + offs_b[None, :]
        tl.store(dst, x, mask=mask_l[:, None] & (offs_b < ldg)[None, :])


@triton.jit
def _backward_csc_kernel(
    gt_ptr, ldg, slots_ptr, offsets_ptr, w_ptr, out_ptr, stride_od, stride_ob, ht_ptr, ldh, gw_ptr, gw_base,
    B, B_LOAD, n_inputs,
    K: tl.constexpr, ACCUMULATE: tl.constexpr, WITH_GRAD_WEIGHT: tl.constexpr, GW_ATOMIC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One (label chunk, input d) segment per program (and one batch block): sum W[l, k] * g^T[l, :]
    # over the segment's slots in registers, then write it once (one chunk) or add it atomically
    # into the fp32 accumulator (several chunks; programs run roughly chunk after chunk, so the
    # grad_out^T rows and weights of one chunk are read while they sit in L2). With
    # WITH_GRAD_WEIGHT the same grad_out^T rows give grad_W[l, k] = <g^T[l, :], h^T[d, :]> per slot
    # (added atomically when the batch spans several blocks) at gw_ptr[slot - gw_base]: a launch over
    # some label chunks writes the gradient of just their slots.
    pid = tl.program_id(0)
    n_b = tl.cdiv(B, BLOCK_B)
    segment = (pid // n_b).to(tl.int64)
    d = segment % n_inputs
    offs_b = (pid % n_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b_load = offs_b < B_LOAD
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    if WITH_GRAD_WEIGHT:
        h_row = tl.load(ht_ptr + d * ldh + offs_b, mask=mask_b_load, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_E, BLOCK_B), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        slot = tl.load(slots_ptr + offs_e, mask=mask_e, other=0)
        w = tl.load(w_ptr + slot, mask=mask_e, other=0.0).to(tl.float32)
        src = gt_ptr + ((slot // K).to(tl.int64) * ldg)[:, None] + offs_b[None, :]
        x = tl.load(src, mask=mask_e[:, None] & mask_b_load[None, :], other=0.0).to(tl.float32)
        acc += x * w[:, None]
        if WITH_GRAD_WEIGHT:
            gw = tl.sum(x * h_row[None, :], axis=1)
            gw_dst = gw_ptr + (slot.to(tl.int64) - gw_base)
            if GW_ATOMIC:
                tl.atomic_add(gw_dst, gw, mask=mask_e, sem="relaxed")
            else:
                tl.store(gw_dst, gw.to(gw_ptr.dtype.element_ty), mask=mask_e)
    total = tl.sum(acc, axis=0)
    dst = out_ptr + d * stride_od + offs_b.to(tl.int64) * stride_ob
    if ACCUMULATE:
        tl.atomic_add(dst, total, mask=offs_b < tl.where(end > start, B, 0), sem="relaxed")
    else:
        tl.store(dst, total.to(out_ptr.dtype.element_ty), mask=offs_b < B)


# --------------------------------------------------------------------------------------------
# Block shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Tile of one program: labels (or by-input entries) x slots x batch columns, and its warps."""

    block_l: int
    block_k: int
    block_b: int
    num_warps: int
    batch_major: bool | None = None  # forward only; None: when h^T is over HOT_L2_SHARE of L2


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


def _slot_block(fan_in: int, cap: int) -> int:
    """Largest power of two <= cap dividing K (no masked tail), else cap."""
    block = cap
    while block > 1 and fan_in % block:
        block //= 2
    return block if block >= min(cap, 4) or fan_in < 4 else cap


def forward_blocks(batch_cols: int, fan_in: int) -> Blocks:
    """Tile for the forward gather. Measured on an H100 (docs/benchmarks.md): tiles of 8192
    elements run at 5-7 TB/s of gathered rows; tiles of 2048-4096 labels x slots x batch ran up to
    15x slower at the same bytes, so the tile never shrinks below 8192 elements."""
    block_b = _pow2_at_most(batch_cols, 128)
    block_k = _slot_block(fan_in, 8)
    block_l = max(1, min(256, 8192 // (block_k * block_b)))
    return Blocks(block_l, block_k, block_b, 4)


def grad_weight_blocks(batch_cols: int, fan_in: int) -> Blocks:
    """Tile for the grad_weight gather (a sum over the batch inside each tile), 8192 elements."""
    block_b = _pow2_at_most(batch_cols, 64)
    block_k = _slot_block(fan_in, 16)
    block_l = max(1, min(256, 8192 // (block_k * block_b)))
    return Blocks(block_l, block_k, block_b, 4)


def atomic_blocks(batch_cols: int, fan_in: int) -> Blocks:
    """Tile for the atomic grad_input pass."""
    block_b = _pow2_at_most(batch_cols, 128)
    block_k = _slot_block(fan_in, 8)
    block_l = max(16, min(128, 4096 // (block_k * block_b)))
    return Blocks(block_l, block_k, block_b, 4)


def csc_blocks(batch_cols: int) -> Blocks:
    """Tile for the by-input pass: ``block_l`` slots of one segment per step, one warp (segments
    hold about chunk_labels * K / D slots); up to 512 batch columns per program (H100: 7.7 ms
    with 4 x 512 against 9.9 ms with 8 x 128 at B=512, K=32)."""
    block_b = _pow2_at_most(batch_cols, 512)
    return Blocks(8 if block_b <= 128 else 4, 1, block_b, 1)


# --------------------------------------------------------------------------------------------
# Checks and layout helpers
# --------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")
    device = tensors[0].device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton fixed fan-in kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _check_indices(indices: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    if indices.dim() != 2 or indices.dtype != torch.int32:
        raise ValueError(f"indices must be an int32 [L, K] tensor, got {indices.dtype} {tuple(indices.shape)}")
    if weight is not None:
        if weight.shape != indices.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} differs from indices shape {tuple(indices.shape)}")
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"weight must be float32 or bfloat16, got {weight.dtype}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def padded_width(batch: int) -> int:
    """Row length of the transposed activations: B rounded up to 16 (16-byte loads) from B = 16 on."""
    return batch if batch < 16 else (batch + 15) // 16 * 16


def transpose_padded(x: torch.Tensor) -> torch.Tensor:
    """``x [B, N] -> [N, padded_width(B)]`` with the padding columns zeroed."""
    batch, n = x.shape
    width = padded_width(batch)
    if width == batch:
        return x.t().contiguous()
    out = torch.empty(n, width, dtype=x.dtype, device=x.device)
    out[:, batch:].zero_()
    out[:, :batch].copy_(x.t())
    return out


def _new_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


# --------------------------------------------------------------------------------------------
# Launchers on transposed activations
# --------------------------------------------------------------------------------------------


def _forward_t(h_t: torch.Tensor, batch: int, indices: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, blocks: Blocks | None = None) -> torch.Tensor:
    n_labels, fan_in = indices.shape
    if batch == 0 or n_labels == 0:
        return out
    if fan_in == 0:
        out.copy_(bias.expand(batch, n_labels) if bias is not None else torch.zeros_like(out))
        return out
    ldh = h_t.shape[1]
    blk = blocks or forward_blocks(ldh, fan_in)
    grid = (triton.cdiv(n_labels, blk.block_l) * triton.cdiv(batch, blk.block_b),)
    _forward_kernel[grid](
        h_t, ldh, indices, weight, bias if bias is not None else weight, out, out.stride(0), out.stride(1),
        batch, ldh, n_labels, fan_in,
        HAS_BIAS=bias is not None, BATCH_MAJOR=blk.batch_major if blk.batch_major is not None else
        h_t.numel() * h_t.element_size() > _l2_bytes(h_t.device) * HOT_L2_SHARE,
        BLOCK_L=blk.block_l, BLOCK_K=blk.block_k, BLOCK_B=blk.block_b,
        num_warps=blk.num_warps,
    )
    return out


def _grad_weight_t(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                   grad_bias: torch.Tensor | None = None, blocks: Blocks | None = None) -> torch.Tensor:
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    if n_labels == 0:
        return out
    if batch == 0 or fan_in == 0:
        out.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
        return out
    ldh = h_t.shape[1]
    blk = blocks or grad_weight_blocks(ldh, fan_in)
    # Columns of h^T per launch: all of them while h^T fits in HOT_L2_SHARE of L2, else launches over
    # column ranges so that the rows being gathered stay in L2 (partial sums carried in gw).
    row_bytes = h_t.shape[0] * h_t.element_size()
    span = max(blk.block_b, int(_l2_bytes(h_t.device) * HOT_L2_SHARE) // row_bytes // blk.block_b * blk.block_b)
    span = min(span, triton.cdiv(batch, blk.block_b) * blk.block_b)
    single = batch <= blk.block_b
    target = out if out.dtype == torch.float32 or single else torch.empty_like(out, dtype=torch.float32)
    bias_target = grad_bias
    if grad_bias is not None and grad_bias.dtype != torch.float32 and span < batch:
        bias_target = torch.empty_like(grad_bias, dtype=torch.float32)
    grid = (triton.cdiv(n_labels, blk.block_l),)
    for c0 in range(0, batch, span):
        cols = min(span, batch - c0)
        _grad_weight_kernel[grid](
            h_t[:, c0:], ldh, grad_out[c0:], grad_out.stride(0), grad_out.stride(1), indices, target,
            bias_target if bias_target is not None else target, cols, min(span, ldh - c0), n_labels, fan_in,
            int(c0 > 0), target, target, target, *_NO_ADAM_SCALARS, HAS_BIAS=grad_bias is not None,
            UPDATE=False, DECOUPLED=False, BLOCK_L=blk.block_l, BLOCK_K=blk.block_k,
            BLOCK_B=blk.block_b, num_warps=blk.num_warps,
        )
    if target is not out:
        out.copy_(target)
    if bias_target is not grad_bias:
        grad_bias.copy_(bias_target)
    return out


# Placeholders for the Adam arguments of the grad_weight kernel when it takes no step.
_NO_ADAM_SCALARS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0)


def _grad_weight_step_fits(batch: int, h_t: torch.Tensor, fan_in: int) -> bool:
    """True when one grad_weight launch with one batch block covers the batch, so that each tile's
    gradient is final where it is computed and the Adam step can be taken there."""
    blk = grad_weight_blocks(h_t.shape[1], fan_in)
    return 0 < batch <= blk.block_b and h_t.numel() * h_t.element_size() <= _l2_bytes(h_t.device) * HOT_L2_SHARE


def _grad_weight_step_t(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor,
                        grad_bias: torch.Tensor | None, update: RowRangeUpdate) -> None:
    """grad_W and the weight's Adam step in one pass (``_grad_weight_step_fits`` must hold)."""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    if n_labels == 0 or fan_in == 0:
        if grad_bias is not None:
            grad_bias.copy_(grad_out.sum(0, dtype=torch.float32))
        return
    ldh = h_t.shape[1]
    blk = grad_weight_blocks(ldh, fan_in)
    step, weight = update.step, update.weight
    _grad_weight_kernel[(triton.cdiv(n_labels, blk.block_l),)](
        h_t, ldh, grad_out, grad_out.stride(0), grad_out.stride(1), indices, weight,
        grad_bias if grad_bias is not None else weight, batch, ldh, n_labels, fan_in, 0,
        weight, update.exp_avg, update.exp_avg_sq, step.lr, step.beta1, step.beta2, step.eps, step.weight_decay,
        step.step_size, step.bias_correction2_sqrt, step.seed,
        HAS_BIAS=grad_bias is not None, UPDATE=True, DECOUPLED=step.decoupled,
        BLOCK_L=blk.block_l, BLOCK_K=blk.block_k, BLOCK_B=blk.block_b, num_warps=blk.num_warps,
    )


def _grad_input_atomic(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int,
                       out: torch.Tensor, h_t: torch.Tensor | None = None, grad_w: torch.Tensor | None = None,
                       grad_bias: torch.Tensor | None = None, blocks: Blocks | None = None,
                       update: RowRangeUpdate | None = None) -> torch.Tensor:
    """Atomic scatter into an fp32 ``[D, B]`` buffer; with ``h_t`` and ``grad_w`` also grad_W, or
    with ``h_t`` and ``update`` grad_W range by range, each range handed to the update (B > 0)."""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    acc = torch.zeros(n_inputs, batch, dtype=torch.float32, device=grad_out.device)
    with_gw = grad_w is not None or update is not None
    if grad_w is not None and (batch == 0 or fan_in == 0):
        grad_w.zero_()
    if grad_bias is not None and (batch == 0 or fan_in == 0):
        grad_bias.copy_(grad_out.sum(0))
    if batch > 0 and n_labels > 0 and fan_in > 0:
        ldh = h_t.shape[1] if with_gw else batch
        blk = blocks or atomic_blocks(batch, fan_in)
        for start, stop in _label_ranges(n_labels, fan_in, update):
            rows = slice(start, stop)
            gw = grad_w if update is None else _update_grad(stop - start, fan_in, grad_out.device)
            target = gw
            if with_gw and gw.dtype != torch.float32 and batch > blk.block_b:
                target = torch.empty_like(gw, dtype=torch.float32)
            _backward_atomic_kernel[(triton.cdiv(stop - start, blk.block_l),)](
                grad_out[:, rows], grad_out.stride(0), grad_out.stride(1), indices[rows], weight[rows], acc, batch,
                h_t if with_gw else acc, ldh, target if with_gw else acc,
                grad_bias[rows] if grad_bias is not None else acc, batch, ldh, stop - start, fan_in,
                WITH_GRAD_WEIGHT=with_gw, HAS_BIAS=grad_bias is not None,
                BLOCK_L=blk.block_l, BLOCK_K=blk.block_k, BLOCK_B=blk.block_b, num_warps=blk.num_warps,
            )
            if with_gw and target is not gw:
                gw.copy_(target)
            if update is not None:
                update(start, stop, gw)
    out.copy_(acc.t())
    return out


def _update_grad(n_labels: int, fan_in: int, device: torch.device) -> torch.Tensor:
    """A label range's weight gradient as the Adam step reads it (bf16)."""
    return torch.empty(n_labels, fan_in, dtype=UPDATE_GRAD_DTYPE, device=device)


def _label_ranges(n_labels: int, fan_in: int, update: RowRangeUpdate | None) -> list[tuple[int, int]]:
    """All labels at once, or with an update ranges of ``UPDATE_RANGE_SLOTS`` slots."""
    per_range = n_labels if update is None else max(1, UPDATE_RANGE_SLOTS // max(1, fan_in))
    return [(start, min(start + per_range, n_labels)) for start in range(0, n_labels, max(1, per_range))]


# --------------------------------------------------------------------------------------------
# By-input (transposed) index, cached per indices tensor
# --------------------------------------------------------------------------------------------


@dataclass
class TransposedIndex:
    """Slots of ``indices`` grouped by (label chunk, input): the slots ``l*K + k`` of chunk ``c``
    that read input ``d`` are ``slots[offsets[c*D + d] : offsets[c*D + d + 1]]``, ascending."""

    chunk_labels: int
    n_chunks: int
    n_inputs: int
    slots: torch.Tensor
    offsets: torch.Tensor


# Slots sorted at once by build_transposed_index (whole label chunks at a time, so a single chunk
# larger than this is still one piece; a piece also holds at most this many (chunk, input)
# counts). A piece's temporaries (int32 keys, torch.sort's sorted keys, int64 order and, on CUDA,
# its index input and radix-sort buffers) take about 35 bytes a slot, then 8 bytes a count for the
# bincount. H100, L=2.81 M, K=96, D=131,072, 25,600-label chunks (outputs 1.09 GB): extra peak
# 86 MB in 44 ms at this size (257 MB / 30 ms at 1 << 23, 515 MB / 27 ms at 1 << 24), against
# 11.4 GB in 290 ms for one sort over all slots.
TRANSPOSED_BUILD_SLOTS = 1 << 22


def build_transposed_index(indices: torch.Tensor, n_inputs: int, chunk_labels: int) -> TransposedIndex:
    """Sort the slots by (label chunk, input) on the indices' device: a stable sort, a bincount and
    a cumulative sum per piece of whole label chunks (``TRANSPOSED_BUILD_SLOTS`` slots and
    ``TRANSPOSED_BUILD_SLOTS`` counts at most, unless one chunk alone is larger), written into the
    preallocated ``slots`` and ``offsets``. Raises ValueError when an index lies outside
    ``[0, n_inputs)``."""
    _check_indices(indices)
    n_labels, fan_in = indices.shape
    chunk_labels = max(1, min(chunk_labels, n_labels))
    n_chunks = triton.cdiv(n_labels, chunk_labels)
    n_slots = n_labels * fan_in
    flat = indices.reshape(-1)
    if n_slots:
        low, high = torch.aminmax(flat)
        if int(low) < 0 or int(high) >= n_inputs:
            raise ValueError(f"indices must lie in [0, {n_inputs}), found values in [{int(low)}, {int(high)}]")
    pos_dtype = torch.int32 if n_slots < 2**31 else torch.int64
    slots = torch.empty(n_slots, dtype=pos_dtype, device=flat.device)
    offsets = torch.zeros(n_chunks * n_inputs + 1, dtype=pos_dtype, device=flat.device)
    # Chunked to bound memory: chunk c's slots are the contiguous range [c*chunk_labels*K, ...) and
    # its segments the range [c*D, (c+1)*D) of offsets, so sorting whole chunks piece by piece
    # (local key = local chunk * D + input) and shifting by the piece's first slot gives exactly
    # the stable sort over all slots, without its L*K-sized keys, int64 order and workspace.
    # A chunk is never split: sorting parts of one chunk apart would not group its segments.
    chunk_slots = chunk_labels * fan_in
    per_piece = max(1, min(TRANSPOSED_BUILD_SLOTS // max(chunk_slots, 1), TRANSPOSED_BUILD_SLOTS // max(n_inputs, 1)))
    for c0 in range(0, n_chunks, per_piece):
        c1 = min(c0 + per_piece, n_chunks)
        start, end = c0 * chunk_slots, min(c1 * chunk_slots, n_slots)
        key_dtype = torch.int32 if (c1 - c0) * n_inputs < 2**31 else torch.int64
        key = flat[start:end].to(key_dtype, copy=True)
        if c1 - c0 > 1 and end > start:
            # Only the layer's last chunk may be partial: the piece's full chunks, then the rest.
            n_full = (end - start) // chunk_slots
            shift = torch.arange(n_full, device=flat.device, dtype=key_dtype).mul_(n_inputs)
            key[: n_full * chunk_slots].view(n_full, chunk_slots).add_(shift[:, None])
            key[n_full * chunk_slots :].add_(n_full * n_inputs)
        order = torch.sort(key, stable=True).indices
        slots[start:end].copy_(order.add_(start))
        del order
        counts = torch.bincount(key, minlength=(c1 - c0) * n_inputs)
        del key
        segments = offsets[c0 * n_inputs + 1 : c1 * n_inputs + 1]
        torch.cumsum(counts, 0, out=segments)
        segments.add_(start)
    return TransposedIndex(chunk_labels, n_chunks, n_inputs, slots, offsets)


# Keyed by (device, data pointer, shape, n_inputs); an entry holds a weak reference to the indices
# and their version counter (``indices._version``, bumped by every in-place change such as
# rewiring or load_state_dict), so a changed or freed indices tensor is never served stale.
_TRANSPOSED_CACHE: dict[tuple, tuple[weakref.ref, int, TransposedIndex]] = {}
_CACHE_ENTRIES = 8


def clear_transposed_index_cache() -> None:
    """Drop every cached by-input index (they are rebuilt on demand)."""
    _TRANSPOSED_CACHE.clear()


def drop_transposed_index(indices: torch.Tensor) -> None:
    """Free the cached by-input index of ``indices`` (a backward rebuilds it on demand)."""
    for key in [k for k, (ref, _, _) in _TRANSPOSED_CACHE.items() if ref() is indices]:
        del _TRANSPOSED_CACHE[key]


def transposed_index_bytes() -> int:
    """Bytes held by the cached by-input indices of indices tensors still alive."""
    return sum(
        index.slots.numel() * index.slots.element_size() + index.offsets.numel() * index.offsets.element_size()
        for ref, _, index in _TRANSPOSED_CACHE.values()
        if ref() is not None
    )


def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return DEFAULT_L2_BYTES


def csc_chunk_labels(indices: torch.Tensor, batch: int, grad_dtype: torch.dtype, with_grad_weight: bool = True) -> int:
    """Labels per chunk so that a chunk's ``grad_out^T`` rows, weights (and grad_W rows, written by
    the fused backward) fill ``CSC_L2_SHARE`` of L2."""
    per_label = padded_width(batch) * torch.finfo(grad_dtype).bits // 8 + indices.shape[1] * 4 * (1 + with_grad_weight)
    return max(1, int(_l2_bytes(indices.device) * CSC_L2_SHARE) // per_label)


def transposed_index(indices: torch.Tensor, n_inputs: int, chunk_labels: int) -> TransposedIndex:
    """The cached by-input index of ``indices``, rebuilt when the indices changed in place (their
    version counter moved) or the cached chunks are larger than ``chunk_labels`` or under a quarter
    of it (a smaller batch reuses the index built for a larger one)."""
    key = (indices.device, indices.data_ptr(), tuple(indices.shape), n_inputs)
    # A stale entry is dropped before the build, with no reference to it left here: at amazon-3m
    # shape it holds 1 GB that would otherwise sit beside its replacement.
    ref, version, cached = _TRANSPOSED_CACHE.pop(key, (None, None, None))
    if cached is not None:
        owner = ref()
        wanted = max(1, min(chunk_labels, indices.shape[0]))
        fits = cached.chunk_labels <= wanted < 4 * cached.chunk_labels
        if owner is not None and owner.data_ptr() == indices.data_ptr() and version == indices._version and fits:
            _TRANSPOSED_CACHE[key] = (ref, version, cached)
            return cached
    del cached
    for stale in [k for k, (ref, _, _) in _TRANSPOSED_CACHE.items() if ref() is None]:
        del _TRANSPOSED_CACHE[stale]
    index = build_transposed_index(indices, n_inputs, chunk_labels)
    while len(_TRANSPOSED_CACHE) >= _CACHE_ENTRIES:
        del _TRANSPOSED_CACHE[next(iter(_TRANSPOSED_CACHE))]
    _TRANSPOSED_CACHE[key] = (weakref.ref(indices), indices._version, index)
    return index


def transpose_grad(grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out [B, L]`` (any strides) ``-> [L, padded_width(B)]``, the padding zeroed."""
    batch, n_labels = grad_out.shape
    width = padded_width(batch)
    g_t = torch.empty(n_labels, width, dtype=grad_out.dtype, device=grad_out.device)
    block_b = _pow2_at_most(width, 64)
    block_l = max(16, 4096 // block_b)
    _transpose_kernel[(triton.cdiv(n_labels, block_l),)](
        grad_out, grad_out.stride(0), grad_out.stride(1), g_t, width, batch, n_labels,
        BLOCK_L=block_l, BLOCK_B=block_b, num_warps=4,
    )
    return g_t


def _is_transposed_layout(grad_out: torch.Tensor) -> bool:
    """True for ``[B, L]`` gradients stored as ``[L, B]`` rows (what the training forward writes)."""
    return grad_out.shape[1] > 1 and grad_out.stride(0) == 1 and grad_out.stride(1) == grad_out.shape[0]


def _grad_input_csc(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int,
                    out: torch.Tensor, index: TransposedIndex | None = None, blocks: Blocks | None = None,
                    h_t: torch.Tensor | None = None, grad_w: torch.Tensor | None = None,
                    update: RowRangeUpdate | None = None) -> torch.Tensor:
    """By-input grad_input; with ``h_t`` and ``grad_w`` also grad_W from the same reads, or with
    ``h_t`` and ``update`` grad_W launch by launch over groups of label chunks, each group's
    gradient handed to the update (a group's weights are read by no later launch)."""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    with_gw = grad_w is not None or update is not None
    if batch == 0 or n_labels == 0 or fan_in == 0:
        out.zero_()
        if grad_w is not None:
            grad_w.zero_()
        return out
    if index is None:
        index = transposed_index(indices, n_inputs, csc_chunk_labels(indices, batch, grad_out.dtype, with_gw))
    if _is_transposed_layout(grad_out):
        # Rows of the gradient's [L, B] storage are already what one slot reads: no transposed copy.
        g_t, ldg, load_cols = grad_out.t(), batch, batch
    else:
        g_t = transpose_grad(grad_out)  # [L, ldg]: one slot reads a label's B gradients contiguously
        ldg = load_cols = g_t.shape[1]
    blk = blocks or csc_blocks(ldg)
    several = index.n_chunks > 1
    target = torch.zeros(n_inputs, batch, dtype=torch.float32, device=out.device) if several else out
    strides = (batch, 1) if several else (1, n_inputs)
    gw_atomic = with_gw and batch > blk.block_b
    n_b = triton.cdiv(batch, blk.block_b)
    chunk_slots = index.chunk_labels * fan_in
    per_launch = index.n_chunks if update is None else max(1, UPDATE_RANGE_SLOTS // chunk_slots)
    for c0 in range(0, index.n_chunks, per_launch):
        c1 = min(c0 + per_launch, index.n_chunks)
        start, stop = c0 * index.chunk_labels, min(c1 * index.chunk_labels, n_labels)
        gw = grad_w if update is None else _update_grad(stop - start, fan_in, out.device)
        gw_target = torch.zeros(gw.shape, dtype=torch.float32, device=gw.device) if gw_atomic else gw
        _backward_csc_kernel[((c1 - c0) * n_inputs * n_b,)](
            g_t, ldg, index.slots, index.offsets[c0 * n_inputs :], weight, target, *strides,
            h_t if with_gw else g_t, h_t.shape[1] if with_gw else ldg, gw_target if with_gw else target,
            start * fan_in, batch, load_cols, n_inputs, K=fan_in, ACCUMULATE=several, WITH_GRAD_WEIGHT=with_gw,
            GW_ATOMIC=gw_atomic, BLOCK_E=blk.block_l, BLOCK_B=blk.block_b, num_warps=blk.num_warps,
        )
        if gw_target is not gw:
            gw.copy_(gw_target)
        if update is not None:
            update(start, stop, gw)
    if several:
        out.copy_(target.t())
    return out


# --------------------------------------------------------------------------------------------
# Public piece-wise launchers ([B, D] activations, as the reference ops)
# --------------------------------------------------------------------------------------------


def forward(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
            blocks: Blocks | None = None) -> torch.Tensor:
    """Logits ``z [B, L]``, by default in ``promote_types(h.dtype, weight.dtype)``."""
    _check_float("h", h)
    _check_indices(indices, weight)
    _check_device(h, indices, weight, *([bias] if bias is not None else []))
    dtype = out_dtype or torch.promote_types(h.dtype, weight.dtype)
    z = _new_out(out, (h.shape[0], indices.shape[0]), dtype, h.device)
    return _forward_t(transpose_padded(h), h.shape[0], indices.contiguous(), weight.contiguous(),
                      None if bias is None else bias.contiguous(), z, blocks)


def grad_weight(grad_out: torch.Tensor, h: torch.Tensor, indices: torch.Tensor, *,
                out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                blocks: Blocks | None = None) -> torch.Tensor:
    """``grad_W [L, K]``, by default in ``promote_types(grad_out.dtype, h.dtype)``."""
    _check_float("grad_out", grad_out)
    _check_float("h", h)
    _check_indices(indices)
    _check_device(grad_out, h, indices)
    dtype = out_dtype or torch.promote_types(grad_out.dtype, h.dtype)
    gw = _new_out(out, tuple(indices.shape), dtype, h.device)
    return _grad_weight_t(grad_out, transpose_padded(h), indices.contiguous(), gw, None, blocks)


def grad_input(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int, *,
               strategy: str | None = None, out: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, blocks: Blocks | None = None) -> torch.Tensor:
    """``grad_h [B, D]``, by default in ``promote_types(grad_out.dtype, weight.dtype)``;
    ``strategy`` is ``"csc"`` or ``"atomic"`` (default ``DEFAULT_GRAD_INPUT_STRATEGY``)."""
    _check_float("grad_out", grad_out)
    _check_indices(indices, weight)
    _check_device(grad_out, indices, weight)
    strategy = strategy or DEFAULT_GRAD_INPUT_STRATEGY
    if strategy not in GRAD_INPUT_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(GRAD_INPUT_STRATEGIES)}, got {strategy!r}")
    dtype = out_dtype or torch.promote_types(grad_out.dtype, weight.dtype)
    gh = _new_out(out, (grad_out.shape[0], n_inputs), dtype, grad_out.device)
    indices, weight = indices.contiguous(), weight.contiguous()
    if strategy == "atomic":
        return _grad_input_atomic(grad_out, indices, weight, n_inputs, gh, blocks=blocks)
    return _grad_input_csc(grad_out, indices, weight, n_inputs, gh, blocks=blocks)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class FixedFanInTriton(torch.autograd.Function):
    """``z = fixed_fanin(h, I, W, bias)`` with the Triton kernels; saves ``h^T`` for the backward.

    When a gradient is wanted the logits are written as ``[L, B]`` storage (a ``[B, L]`` tensor
    with strides ``(1, B)``): the loss can write their gradient over them and the by-input
    backward reads that gradient's rows without a transposed copy."""

    @staticmethod
    def forward(ctx, h, indices, weight, bias, out_dtype, strategy, weight_update):  # noqa: D102 (autograd protocol)
        h_t = transpose_padded(h)
        batch, n_labels = h.shape[0], indices.shape[0]
        if any(ctx.needs_input_grad[:4]):
            # A tensor of its own with these strides, not a view: a view made inside a custom
            # Function may not be written in place later (the loss does).
            z = torch.empty_strided((batch, n_labels), (1, batch), dtype=out_dtype, device=h.device)
        else:
            z = torch.empty(batch, n_labels, dtype=out_dtype, device=h.device)
        _forward_t(h_t, batch, indices, weight, bias, z)
        ctx.save_for_backward(h_t, indices, weight)
        ctx.batch, ctx.n_inputs, ctx.h_dtype = batch, h.shape[1], h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.strategy = strategy
        ctx.weight_update = weight_update
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (autograd protocol)
        h_t, indices, weight = ctx.saved_tensors
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        update = ctx.weight_update if need_w else None
        grads = backward(grad_out, h_t, indices, weight, ctx.n_inputs, h_dtype=ctx.h_dtype,
                         bias_dtype=ctx.bias_dtype if need_b else None, need_h=need_h, need_weight=need_w,
                         strategy=ctx.strategy, weight_update=update)
        return grads[0], None, grads[1], grads[2], None, None, None


def backward(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int,
             *, h_dtype: torch.dtype, bias_dtype: torch.dtype | None, need_h: bool = True, need_weight: bool = True,
             strategy: str | None = None, weight_update: WeightUpdate | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_h, grad_W, grad_bias)`` from ``grad_out [B, L]`` and the forward's ``h^T``
    (``transpose_padded(h)``); ``bias_dtype=None`` skips the bias gradient. With ``weight_update``
    the weight takes its Adam step here and grad_W comes back None. When one batch block covers the
    batch, the grad_weight pass takes the step on each tile it computes (no gradient stored);
    otherwise grad_W is computed label range by label range into a bf16 buffer of at most
    ``UPDATE_RANGE_SLOTS`` slots (or one by-input label chunk), read by the Adam kernel right away.
    Either way the whole gradient an optimizer step needs never exists. (Adam inside the by-input
    pass was measured 2x slower: there the weight and moment accesses are scattered.)"""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    device = grad_out.device
    grad_h = torch.empty(batch, n_inputs, dtype=h_dtype, device=device) if need_h else None
    grad_b = torch.empty(n_labels, dtype=bias_dtype, device=device) if bias_dtype is not None else None
    csc = (strategy or DEFAULT_GRAD_INPUT_STRATEGY) == "csc"
    update = RowRangeUpdate(weight, weight_update) if need_weight and weight_update is not None else None
    grad_w = torch.empty_like(weight) if need_weight and update is None else None
    if need_h and not csc and batch > 0:
        # One pass over the labels gives grad_h, grad_W and the bias gradient.
        _grad_input_atomic(grad_out, indices, weight, n_inputs, grad_h, h_t, grad_w, grad_b, update=update)
    elif need_h and need_weight and batch >= FUSED_MIN_BATCH:
        # One pass over the by-input index gives grad_h and grad_W.
        _grad_input_csc(grad_out, indices, weight, n_inputs, grad_h, h_t=h_t, grad_w=grad_w, update=update)
        if grad_b is not None:
            grad_b.copy_(grad_out.sum(0, dtype=torch.float32))
    else:
        if need_h:
            _grad_input_csc(grad_out, indices, weight, n_inputs, grad_h)
        if update is not None and _grad_weight_step_fits(batch, h_t, fan_in):
            # After grad_h, which reads the weights before the update.
            _grad_weight_step_t(grad_out, h_t, indices, grad_b, update)
        elif need_weight:
            for start, stop in _label_ranges(n_labels, fan_in, update):
                rows = slice(start, stop)
                gw = grad_w if update is None else _update_grad(stop - start, fan_in, device)
                _grad_weight_t(grad_out[:, rows], h_t, indices[rows], gw, None if grad_b is None else grad_b[rows])
                if update is not None:
                    update(start, stop, gw)
        elif grad_b is not None:
            grad_b.copy_(grad_out.sum(0, dtype=torch.float32))
    return grad_h, grad_w, grad_b


def fixed_fanin(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                *, grad_input_strategy: str | None = None, weight_update: WeightUpdate | None = None) -> torch.Tensor:
    """Differentiable fixed fan-in layer ``h [B, D] -> z [B, L]`` (dtype rule in the module
    docstring); with ``weight_update`` the backward updates ``weight`` itself (see ``backward``)."""
    _check_float("h", h)
    _check_indices(indices, weight)
    if bias is not None and bias.shape != (indices.shape[0],):
        raise ValueError(f"bias must be [{indices.shape[0]}], got shape {tuple(bias.shape)}")
    _check_device(h, indices, weight, *([bias] if bias is not None else []))
    strategy = grad_input_strategy or DEFAULT_GRAD_INPUT_STRATEGY
    if strategy not in GRAD_INPUT_STRATEGIES:
        raise ValueError(f"grad_input_strategy must be one of {', '.join(GRAD_INPUT_STRATEGIES)}, got {strategy!r}")
    if weight_update is not None and not weight.is_contiguous():
        raise ValueError("a weight updated in the backward must be contiguous (it is written in place)")
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
        out_dtype = h.dtype
    else:
        out_dtype = torch.promote_types(h.dtype, weight.dtype)
    return FixedFanInTriton.apply(h, indices.contiguous(), weight.contiguous(),
                                  None if bias is None else bias.contiguous(), out_dtype, strategy, weight_update)
