"""Triton kernels of the fixed fan-in op ``z[b, l] = sum_k W[l, k] * h[b, I[l, k]] + bias[l]``.

They read activations as ``h^T [D, ldh]`` (``ldh`` = B rounded up to 16 from B = 16 on, the
padding zeroed), so one gathered index reads B contiguous values; indices ``I`` int32 ``[L, K]``
and weights ``W [L, K]`` are row-major, a label's K slots contiguous. Every kernel accumulates in
float32 and forms offsets in int64, so ``L*K``, ``B*L`` and ``D*B`` may pass 2**31. No
``[B, L, K]`` temporary exists: each program holds one ``[labels, slots, batch]`` tile in registers.
The helpers ``grad_out_tile`` and ``grad_weight_part`` are shared with kernels that fuse an
optimizer step into the grad_W pass (``xmlsparse.ops.adam_kernels``).
"""

import triton
import triton.language as tl

@triton.jit
def forward_kernel(
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
def grad_out_tile(g_ptr, stride_gb, stride_gl, offs_l, offs_b, mask_l, mask_b):
    """The float32 ``[labels, batch]`` tile of ``grad_out`` (any strides) at ``offs_l`` x ``offs_b``."""
    src = g_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l.to(tl.int64)[:, None] * stride_gl
    return tl.load(src, mask=mask_l[:, None] & mask_b[None, :], other=0.0).to(tl.float32)


@triton.jit
def grad_weight_part(ht_ptr, ldh, idx_ptr, g, slot, mask_lk, offs_b, mask_b_load):
    """``sum_b g[l, b] * h^T[I[l, k], b]`` of one ``[labels, slots]`` tile over one batch block."""
    idx = tl.load(idx_ptr + slot, mask=mask_lk, other=0)
    src = ht_ptr + (idx.to(tl.int64) * ldh)[:, :, None] + offs_b[None, None, :]
    x = tl.load(src, mask=mask_lk[:, :, None] & mask_b_load[None, None, :], other=0.0)
    return tl.sum(x.to(tl.float32) * g[:, None, :], axis=2)


@triton.jit
def grad_weight_kernel(
    ht_ptr, ldh, g_ptr, stride_gb, stride_gl, idx_ptr, gw_ptr, gb_ptr, B, B_LOAD, L, K, accumulate,
    HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Batch blocks outer, slot blocks inner: each grad_out tile is loaded once; with more than one
    # batch block (or ``accumulate``: an earlier launch did other columns) the partial sums go
    # through gw_ptr (float32 then), owned by this program alone.
    pid_l = tl.program_id(0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    row = offs_l.to(tl.int64) * K
    gb_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        g = grad_out_tile(g_ptr, stride_gb, stride_gl, offs_l, offs_b, mask_l, mask_b)
        if HAS_BIAS:
            gb_acc += tl.sum(g, axis=1)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_lk = mask_l[:, None] & (offs_k < K)[None, :]
            slot = row[:, None] + offs_k[None, :]
            part = grad_weight_part(ht_ptr, ldh, idx_ptr, g, slot, mask_lk, offs_b, offs_b < B_LOAD)
            carried = (offs_k * 0 + b0 + accumulate > 0)[None, :]  # earlier batch columns to add to
            part += tl.load(gw_ptr + slot, mask=mask_lk & carried, other=0.0).to(tl.float32)
            tl.store(gw_ptr + slot, part.to(gw_ptr.dtype.element_ty), mask=mask_lk)
    if HAS_BIAS:
        gb_acc += tl.load(gb_ptr + offs_l, mask=mask_l & (offs_l * 0 + accumulate > 0), other=0.0).to(tl.float32)
        tl.store(gb_ptr + offs_l, gb_acc.to(gb_ptr.dtype.element_ty), mask=mask_l)


@triton.jit
def transpose_kernel(g_ptr, stride_gb, stride_gl, gt_ptr, ldg, B, L, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr):
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
def grad_input_by_input_kernel(
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
