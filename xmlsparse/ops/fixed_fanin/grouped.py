"""The grouped fixed fan-in op on Triton's tensor-core dot: labels in groups of ``G`` share one row
of inputs, ``z[b, l] = sum_k W[l, k] * h[b, I[l // G, k]] + bias[l]``, ``I [ceil(L / G), K]``.

A group gathers its K input rows of ``h^T`` once and multiplies them by its ``[G, K]`` weights
with ``tl.dot``, so a pass gathers ``L/G * K * B`` activations instead of ``L * K * B``, and the
arithmetic runs on the MMA units:

* forward: programs over (group, batch block): ``z[group, b] = W_group [G, K] @ h^T[I_group, b]``;
* backward: a program per group, over batch blocks, reads each tile of the group's gradient once
  for all three gradients: grad_W ``g[group, b] @ h^T[I_group, b]^T``, grad_bias the tile's sums,
  and grad_h ``W_group^T @ g[group, b]`` (``[K, B_block]``), added into an fp32 ``[D, B]`` buffer
  with atomics at the group's K input rows.

With bf16 (or fp16) activations the dot reads bf16 and accumulates in fp32, the weights (fp32
master weights too) rounded to the activations' dtype as ``F.linear`` does under autocast; with
fp32 activations it runs in full fp32 (``input_precision="ieee"``), so fp32 results match the
reference to fp32 rounding. The Triton path needs ``G`` in ``GROUP_SIZES`` and ``K`` a multiple of 16 (the
dot's smallest tile); the reference op takes any ``G`` and ``K``. The last group may be partial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from xmlsparse.ops.fixed_fanin.checks import check_call, check_float, check_group_shapes, interpreting, logits_input
from xmlsparse.ops.fixed_fanin.plan import DEFAULT_PLAN, Plan
from xmlsparse.ops.fixed_fanin.sink import GradWeightSink
from xmlsparse.ops.fixed_fanin.triton_op import transpose_padded

GROUP_SIZES = (16, 32, 64)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """``a @ b`` accumulated in fp32: in full fp32 when ``FP32``, else on bf16/fp16 operands."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def grouped_forward_kernel(
    ht_ptr, ldh, idx_ptr, w_ptr, bias_ptr, z_ptr, stride_zb, stride_zl, B, B_LOAD, L, K,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs_l = group * G + tl.arange(0, G)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_l = offs_l < L
    mask_b_load = offs_b < B_LOAD  # padded columns of h^T are zero
    acc = tl.zeros((G, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + group * K + offs_k).to(tl.int64)
        x = tl.load(ht_ptr + idx[:, None] * ldh + offs_b[None, :], mask=mask_b_load[None, :], other=0.0)
        w = tl.load(w_ptr + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None], other=0.0)
        acc += _dot(w, x, FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_l, mask=mask_l, other=0.0).to(tl.float32)[:, None]
    dst = z_ptr + offs_b.to(tl.int64)[None, :] * stride_zb + offs_l[:, None] * stride_zl
    tl.store(dst, acc.to(z_ptr.dtype.element_ty), mask=mask_l[:, None] & (offs_b < B)[None, :])


@triton.jit
def grouped_backward_kernel(
    ht_ptr, ldh, g_ptr, stride_gb, stride_gl, idx_ptr, w_ptr, acc_ptr, ld_acc, gw_ptr, gb_ptr, B, B_LOAD, L, K,
    G: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, FP32: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One program per group reads the group's gradient tiles once for all three gradients.
    group = tl.program_id(0).to(tl.int64)
    offs_l = group * G + tl.arange(0, G)
    mask_l = offs_l < L
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + group * K + offs_k).to(tl.int64)
        if NEED_H:
            w = tl.load(w_ptr + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None], other=0.0)
        acc_w = tl.zeros((G, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((G,), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            g = tl.load(g_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l[:, None] * stride_gl,
                        mask=mask_l[:, None] & mask_b[None, :], other=0.0)
            if NEED_W:
                x = tl.load(ht_ptr + idx[:, None] * ldh + offs_b[None, :], mask=(offs_b < B_LOAD)[None, :], other=0.0)
                acc_w += _dot(g, tl.trans(x), FP32)
            if NEED_H:
                part = _dot(tl.trans(w), g, FP32)  # [BLOCK_K, BLOCK_B]
                tl.atomic_add(acc_ptr + idx[:, None] * ld_acc + offs_b[None, :], part, mask=mask_b[None, :], sem="relaxed")
            if NEED_B:
                acc_b += tl.sum(g.to(tl.float32), axis=1)
        if NEED_W:
            tl.store(gw_ptr + offs_l[:, None] * K + offs_k[None, :], acc_w.to(gw_ptr.dtype.element_ty), mask=mask_l[:, None])
        if NEED_B:
            if k0 == 0:
                tl.store(gb_ptr + offs_l, acc_b, mask=mask_l)


def _blocks(batch: int, fan_in: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_B): the largest slot block of 16, 32 or 64 dividing K; 16 to 128 columns."""
    block_k = 64 if fan_in % 64 == 0 else 32 if fan_in % 32 == 0 else 16
    return block_k, min(128, max(16, triton.next_power_of_2(max(1, batch))))


def check_grouped(indices: torch.Tensor, weight: torch.Tensor, group_size: int) -> None:
    """The Triton path's shapes: a group size it has kernels for and K in whole dot tiles."""
    check_group_shapes(indices, weight, group_size)
    if indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32, got {indices.dtype}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size}: the Triton grouped op has kernels for "
                         f"{', '.join(map(str, GROUP_SIZES))} (any group size runs with impl='reference')")
    if weight.shape[1] % 16:
        raise ValueError(f"fan_in {weight.shape[1]}: the Triton grouped op needs a multiple of 16 "
                         "(its tensor-core tiles); impl='reference' takes any")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"weight must be float32 or bfloat16, got {weight.dtype}")


def _fp32(*tensors: torch.Tensor) -> bool:
    """Whether the dot runs in fp32: fp32 activations, or Triton's CPU interpreter, whose bf16 dot
    gives wrong sums (so interpreted tests check the kernels' indexing in fp32, and
    scripts/check_ops_gpu.py the bf16 dot on the device)."""
    return interpreting() or any(t.dtype == torch.float32 for t in tensors)


def forward(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
            out_dtype: torch.dtype, h_t: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``z [B, L]`` in ``out_dtype``."""
    batch, n_labels = h.shape[0], weight.shape[0]
    h_t = transpose_padded(h) if h_t is None else h_t
    z = torch.empty(batch, n_labels, dtype=out_dtype, device=h.device)
    if batch == 0 or n_labels == 0:
        return z
    block_k, block_b = _blocks(batch, weight.shape[1])
    grid = (indices.shape[0], triton.cdiv(batch, block_b))
    grouped_forward_kernel[grid](
        h_t, h_t.shape[1], indices, weight, bias if bias is not None else weight, z, z.stride(0), z.stride(1),
        batch, h_t.shape[1], n_labels, weight.shape[1], G=group_size, HAS_BIAS=bias is not None,
        FP32=_fp32(h_t), BLOCK_K=block_k, BLOCK_B=block_b, num_warps=4,
    )
    return z


def backward(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, group_size: int,
             acc: torch.Tensor | None, grad_w: torch.Tensor | None, grad_b: torch.Tensor | None) -> None:
    """One pass over the groups of ``indices``, labels ``[0, weight.shape[0])`` of ``grad_out [B, L]``
    (any strides): adds each group's ``W_group^T @ g`` into ``acc [D, B]`` (fp32, atomics) at its
    input rows, writes ``grad_w [L, K]`` and the batch sums ``grad_b [L]`` (fp32), each where given."""
    batch, n_labels = grad_out.shape[0], weight.shape[0]
    if n_labels == 0 or (acc is None and grad_w is None and grad_b is None):
        return
    fan_in = weight.shape[1]
    block_k = _blocks(batch, fan_in)[0]
    # 64 columns, not the forward's 128: the atomics of grad_h then overlap the dots better.
    block_b = min(64, max(16, triton.next_power_of_2(max(1, batch))))
    placeholder = weight  # for the pointers of outputs not asked for (their code is compiled out)
    grouped_backward_kernel[(indices.shape[0],)](
        h_t, h_t.shape[1], grad_out, grad_out.stride(0), grad_out.stride(1), indices, weight,
        placeholder if acc is None else acc, batch, placeholder if grad_w is None else grad_w,
        placeholder if grad_b is None else grad_b, batch, h_t.shape[1], n_labels, fan_in, G=group_size,
        NEED_H=acc is not None, NEED_W=grad_w is not None, NEED_B=grad_b is not None, FP32=_fp32(grad_out, h_t),
        BLOCK_K=block_k, BLOCK_B=block_b, num_warps=4,
    )


class GroupedFixedFanInTriton(torch.autograd.Function):
    """``z = fixed_fanin(h, I, W, bias, group_size=G)`` with the grouped kernels; with a sink the
    backward hands grad_W to it range by range of whole groups, after grad_h."""

    @staticmethod
    def forward(ctx, h, indices, weight, bias, group_size, out_dtype, sink, plan):  # noqa: D102 (autograd protocol)
        h_t = transpose_padded(h)
        z = forward(h, indices, weight, bias, group_size, out_dtype, h_t)
        ctx.save_for_backward(h_t, indices, weight)
        ctx.group_size, ctx.n_inputs, ctx.h_dtype = group_size, h.shape[1], h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.sink, ctx.plan = sink, plan
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (autograd protocol)
        h_t, indices, weight = ctx.saved_tensors
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        group, sink = ctx.group_size, ctx.sink if need_w else None
        n_labels, fan_in = weight.shape
        acc = torch.zeros(ctx.n_inputs, grad_out.shape[0], dtype=torch.float32, device=grad_out.device) if need_h else None
        grad_b = torch.empty(n_labels, dtype=torch.float32, device=grad_out.device) if need_b else None
        grad_w = None
        if sink is None:
            grad_w = torch.empty(n_labels, fan_in, dtype=weight.dtype, device=weight.device) if need_w else None
            backward(grad_out, h_t, indices, weight, group, acc, grad_w, grad_b)
        else:
            # Range by range: a range's grad_h terms are added in the pass that computes its
            # grad_W, so the sink may update those labels' weights as soon as it takes them.
            sink.open()
            per_range = max(group, ctx.plan.sink_range_slots // max(1, fan_in) // group * group)
            for start in range(0, n_labels, per_range):
                stop = min(start + per_range, n_labels)
                range_w = torch.empty(stop - start, fan_in, dtype=sink.dtype, device=weight.device)
                backward(grad_out[:, start:stop], h_t, indices[start // group : -(-stop // group)], weight[start:stop],
                         group, acc, range_w, None if grad_b is None else grad_b[start:stop])
                sink.take(start, stop, range_w)
        grad_h = acc.t().to(ctx.h_dtype) if need_h else None
        grad_b = grad_b.to(ctx.bias_dtype) if need_b else None
        return grad_h, None, grad_w, grad_b, None, None, None, None


def grouped_fixed_fanin(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        group_size: int, sink: GradWeightSink | None = None, plan: Plan = DEFAULT_PLAN) -> torch.Tensor:
    """Differentiable grouped op ``h [B, D] -> z [B, L]``; dtypes as the plain Triton op (under
    autocast h is cast to the autocast dtype and the logits come out in it). With ``sink`` grad_W
    goes to it in ranges of at most ``plan.sink_range_slots`` slots (whole groups)."""
    check_float("h", h)
    check_grouped(indices, weight, group_size)
    check_call(h, indices, weight, bias, sink)
    h, out_dtype = logits_input(h, weight)
    return GroupedFixedFanInTriton.apply(h, indices.contiguous(), weight.contiguous(),
                                         None if bias is None else bias.contiguous(), group_size, out_dtype, sink, plan)
