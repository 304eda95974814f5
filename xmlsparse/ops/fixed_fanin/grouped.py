"""The grouped fixed fan-in op on Triton's tensor-core dot: labels in groups of ``G`` share one row
of inputs, ``z[b, l] = sum_k W[l, k] * h[b, I[l // G, k]] + bias[l]``, ``I [ceil(L / G), K]``.

A group gathers its K input rows of ``h^T`` once and multiplies them by its ``[G, K]`` weights
with ``tl.dot``, so a pass gathers ``L/G * K * B`` activations instead of ``L * K * B``, and the
arithmetic runs on the MMA units:

* forward: programs over (group, batch block): ``z[group, b] = W_group [G, K] @ h^T[I_group, b]``;
* grad_W: a program per group, over batch blocks: ``g[group, b] @ h^T[I_group, b]^T``;
* grad_h: programs over (group, batch block): ``W_group^T @ g[group, b]``, ``[K, B_block]``, added
  into an fp32 ``[D, B]`` buffer with atomics at the group's K input rows.

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
def grouped_grad_weight_kernel(
    ht_ptr, ldh, g_ptr, stride_gb, stride_gl, idx_ptr, gw_ptr, B, B_LOAD, L, K,
    G: tl.constexpr, FP32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs_l = group * G + tl.arange(0, G)
    mask_l = offs_l < L
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + group * K + offs_k).to(tl.int64)
        acc = tl.zeros((G, BLOCK_K), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            g = tl.load(g_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l[:, None] * stride_gl,
                        mask=mask_l[:, None] & (offs_b < B)[None, :], other=0.0)
            x = tl.load(ht_ptr + idx[:, None] * ldh + offs_b[None, :], mask=(offs_b < B_LOAD)[None, :], other=0.0)
            acc += _dot(g, tl.trans(x), FP32)
        tl.store(gw_ptr + offs_l[:, None] * K + offs_k[None, :], acc.to(gw_ptr.dtype.element_ty), mask=mask_l[:, None])


@triton.jit
def grouped_grad_input_kernel(
    g_ptr, stride_gb, stride_gl, idx_ptr, w_ptr, acc_ptr, ld_acc, B, L, K,
    G: tl.constexpr, FP32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs_l = group * G + tl.arange(0, G)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_l = offs_l < L
    mask_b = offs_b < B
    g = tl.load(g_ptr + offs_b.to(tl.int64)[None, :] * stride_gb + offs_l[:, None] * stride_gl,
                mask=mask_l[:, None] & mask_b[None, :], other=0.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + group * K + offs_k).to(tl.int64)
        w = tl.load(w_ptr + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None], other=0.0)
        part = _dot(tl.trans(w), g, FP32)  # [BLOCK_K, BLOCK_B]
        tl.atomic_add(acc_ptr + idx[:, None] * ld_acc + offs_b[None, :], part, mask=mask_b[None, :], sem="relaxed")


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


def grad_weight(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, n_labels: int, group_size: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``grad_W [L, K]`` from ``grad_out [B, L]`` (any strides) and ``h^T``."""
    batch, fan_in = grad_out.shape[0], indices.shape[1]
    gw = torch.empty(n_labels, fan_in, dtype=out_dtype, device=grad_out.device)
    if n_labels == 0:
        return gw
    block_k, block_b = _blocks(batch, fan_in)
    grouped_grad_weight_kernel[(indices.shape[0],)](
        h_t, h_t.shape[1], grad_out, grad_out.stride(0), grad_out.stride(1), indices, gw, batch, h_t.shape[1],
        n_labels, fan_in, G=group_size, FP32=_fp32(grad_out, h_t), BLOCK_K=block_k, BLOCK_B=block_b, num_warps=4,
    )
    return gw


def grad_input(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int, group_size: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``grad_h [B, D]``: each group's ``W_group^T @ g`` added at its K input rows (fp32 atomics)."""
    batch, n_labels = grad_out.shape
    acc = torch.zeros(n_inputs, batch, dtype=torch.float32, device=grad_out.device)
    if batch > 0 and n_labels > 0:
        block_k, block_b = _blocks(batch, weight.shape[1])
        grouped_grad_input_kernel[(indices.shape[0], triton.cdiv(batch, block_b))](
            grad_out, grad_out.stride(0), grad_out.stride(1), indices, weight, acc, batch, batch, n_labels,
            weight.shape[1], G=group_size, FP32=_fp32(grad_out), BLOCK_K=block_k, BLOCK_B=block_b,
            num_warps=4,
        )
    return acc.t().to(out_dtype)


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
        grad_h = grad_input(grad_out, indices, weight, ctx.n_inputs, group, ctx.h_dtype) if need_h else None
        grad_b = grad_out.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_b else None
        if sink is None:
            grad_w = grad_weight(grad_out, h_t, indices, weight.shape[0], group, weight.dtype) if need_w else None
            return grad_h, None, grad_w, grad_b, None, None, None, None
        sink.open()  # after grad_h, which reads the weights the sink may update
        n_labels, fan_in = weight.shape
        per_range = max(group, ctx.plan.sink_range_slots // max(1, fan_in) // group * group)
        for start in range(0, n_labels, per_range):
            stop = min(start + per_range, n_labels)
            rows = indices[start // group : -(-stop // group)]
            sink.take(start, stop, grad_weight(grad_out[:, start:stop], h_t, rows, stop - start, group, sink.dtype))
        return grad_h, None, None, grad_b, None, None, None, None


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
