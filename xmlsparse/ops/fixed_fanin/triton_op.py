"""The fixed fan-in op on Triton: launchers over the kernels of ``kernels.py``, then the autograd
Function and its backward.

Passes (each gathers B*L*K*bytes rows from L2):

* forward: programs over (label block, batch block), a loop over slot blocks; the batch blocks
  run one after another when ``h^T`` is larger than the plan's hot share of L2.
* grad_W: programs over label blocks, loops over batch and slot blocks; the bias gradient (a sum
  over the batch) comes from the same loads of ``grad_out``.
* grad_h, a scatter-add into ``[D, B]``, walks the by-input index (``by_input.py``): labels are cut
  into chunks whose ``grad_out^T`` rows and weights fit in L2, and each input sums a chunk's
  contributions in registers and adds them once per chunk. From the plan's ``fused_min_batch`` on,
  the same pass also gives grad_W (one read of the ``grad_out^T`` rows for both).

When a gradient is wanted, the forward stores the logits as ``[L, B]`` (a ``[B, L]`` tensor with
strides ``(1, B)``): the loss may write their gradient over them, and the by-input pass reads that
gradient's rows without a transposed copy.

Dtypes: h is read as float32, bfloat16 or float16, W as float32 or bfloat16. Outside autocast the
logits take ``promote_types(h.dtype, W.dtype)`` (as the reference op). Under autocast (the trainer
runs the head under bf16 autocast on CUDA) h is cast to the autocast dtype and the logits come
out in that dtype, as ``torch.nn.functional.linear`` does, while W stays in its own dtype and is
read as is. Gradients take the dtype of the tensor they belong to.

Indices must lie in ``[0, D)``; the per-step kernels do not check, the by-input index build does.
Under ``TRITON_INTERPRET=1`` the launchers run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable

from xmlsparse.ops.fixed_fanin.by_input import ByInputCache, ByInputIndex, build_by_input_index
from xmlsparse.ops.fixed_fanin.checks import check_call, check_device, check_float, check_indices, logits_input, new_out
from xmlsparse.ops.fixed_fanin.kernels import (
    forward_kernel,
    grad_input_by_input_kernel,
    grad_weight_kernel,
    transpose_kernel,
)
from xmlsparse.ops.fixed_fanin.plan import DEFAULT_PLAN, Blocks, Plan, pow2_at_most, padded_width
from xmlsparse.ops.fixed_fanin.sink import GradWeightSink


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


def transpose_grad(grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out [B, L]`` (any strides) ``-> [L, padded_width(B)]``, the padding zeroed."""
    batch, n_labels = grad_out.shape
    width = padded_width(batch)
    g_t = torch.empty(n_labels, width, dtype=grad_out.dtype, device=grad_out.device)
    block_b = pow2_at_most(width, 64)
    block_l = max(16, 4096 // block_b)
    transpose_kernel[(triton.cdiv(n_labels, block_l),)](
        grad_out, grad_out.stride(0), grad_out.stride(1), g_t, width, batch, n_labels,
        BLOCK_L=block_l, BLOCK_B=block_b, num_warps=4,
    )
    return g_t


def _is_label_major(grad_out: torch.Tensor) -> bool:
    """True for ``[B, L]`` gradients stored as ``[L, B]`` rows (what the training forward writes)."""
    return grad_out.shape[1] > 1 and grad_out.stride(0) == 1 and grad_out.stride(1) == grad_out.shape[0]


# --------------------------------------------------------------------------------------------
# Launchers on transposed activations
# --------------------------------------------------------------------------------------------


def _forward_t(h_t: torch.Tensor, batch: int, indices: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, plan: Plan, blocks: Blocks | None = None) -> torch.Tensor:
    n_labels, fan_in = indices.shape
    if batch == 0 or n_labels == 0:
        return out
    if fan_in == 0:
        out.copy_(bias.expand(batch, n_labels) if bias is not None else torch.zeros_like(out))
        return out
    ldh = h_t.shape[1]
    blk = blocks or plan.forward_blocks(ldh, fan_in)
    grid = (triton.cdiv(n_labels, blk.block_l) * triton.cdiv(batch, blk.block_b),)
    forward_kernel[grid](
        h_t, ldh, indices, weight, bias if bias is not None else weight, out, out.stride(0), out.stride(1),
        batch, ldh, n_labels, fan_in,
        HAS_BIAS=bias is not None, BATCH_MAJOR=not plan.h_is_hot(h_t),
        BLOCK_L=blk.block_l, BLOCK_K=blk.block_k, BLOCK_B=blk.block_b,
        num_warps=blk.num_warps,
    )
    return out


def _grad_weight_t(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                   grad_bias: torch.Tensor | None, plan: Plan, blocks: Blocks | None = None) -> torch.Tensor:
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
    blk = blocks or plan.grad_weight_blocks(ldh, fan_in)
    # Columns of h^T per launch: all of them while h^T is hot in L2, else launches over column
    # ranges so that the rows being gathered stay in L2 (partial sums carried in gw).
    row_bytes = h_t.shape[0] * h_t.element_size()
    hot_bytes = int(plan.l2_bytes(h_t.device) * plan.hot_l2_share)
    span = max(blk.block_b, hot_bytes // row_bytes // blk.block_b * blk.block_b)
    span = min(span, triton.cdiv(batch, blk.block_b) * blk.block_b)
    single = batch <= blk.block_b
    target = out if out.dtype == torch.float32 or single else torch.empty_like(out, dtype=torch.float32)
    bias_target = grad_bias
    if grad_bias is not None and grad_bias.dtype != torch.float32 and span < batch:
        bias_target = torch.empty_like(grad_bias, dtype=torch.float32)
    grid = (triton.cdiv(n_labels, blk.block_l),)
    for c0 in range(0, batch, span):
        cols = min(span, batch - c0)
        grad_weight_kernel[grid](
            h_t[:, c0:], ldh, grad_out[c0:], grad_out.stride(0), grad_out.stride(1), indices, target,
            bias_target if bias_target is not None else target, cols, min(span, ldh - c0), n_labels, fan_in,
            int(c0 > 0), HAS_BIAS=grad_bias is not None,
            BLOCK_L=blk.block_l, BLOCK_K=blk.block_k, BLOCK_B=blk.block_b, num_warps=blk.num_warps,
        )
    if target is not out:
        out.copy_(target)
    if bias_target is not grad_bias:
        grad_bias.copy_(bias_target)
    return out


def grad_input_over_index(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int,
                          out: torch.Tensor, index: ByInputIndex, plan: Plan, blocks: Blocks | None = None,
                          h_t: torch.Tensor | None = None, grad_w: torch.Tensor | None = None,
                          sink: GradWeightSink | None = None) -> torch.Tensor:
    """grad_h into ``out [B, D]`` over a built by-input ``index`` (the launcher that ``grad_input``
    and the backward share; benchmarks call it with their own tiles). With ``h_t`` and ``grad_w``
    also grad_W from the same reads, or with ``h_t`` and ``sink`` grad_W launch by launch over
    groups of label chunks, each group's gradient handed to the sink (a group's weights are read
    by no later launch)."""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    with_gw = grad_w is not None or sink is not None
    if batch == 0 or n_labels == 0 or fan_in == 0:
        out.zero_()
        if grad_w is not None:
            grad_w.zero_()
        return out
    if _is_label_major(grad_out):
        # Rows of the gradient's [L, B] storage are already what one slot reads: no transposed copy.
        g_t, ldg, load_cols = grad_out.t(), batch, batch
    else:
        g_t = transpose_grad(grad_out)  # [L, ldg]: one slot reads a label's B gradients contiguously
        ldg = load_cols = g_t.shape[1]
    blk = blocks or plan.by_input_blocks(ldg)
    several = index.n_chunks > 1
    target = torch.zeros(n_inputs, batch, dtype=torch.float32, device=out.device) if several else out
    strides = (batch, 1) if several else (1, n_inputs)
    gw_atomic = with_gw and batch > blk.block_b
    n_b = triton.cdiv(batch, blk.block_b)
    chunk_slots = index.chunk_labels * fan_in
    per_launch = index.n_chunks if sink is None else max(1, plan.sink_range_slots // chunk_slots)
    for c0 in range(0, index.n_chunks, per_launch):
        c1 = min(c0 + per_launch, index.n_chunks)
        start, stop = c0 * index.chunk_labels, min(c1 * index.chunk_labels, n_labels)
        gw = grad_w if sink is None else torch.empty(stop - start, fan_in, dtype=sink.dtype, device=out.device)
        gw_target = torch.zeros(gw.shape, dtype=torch.float32, device=gw.device) if gw_atomic else gw
        grad_input_by_input_kernel[((c1 - c0) * n_inputs * n_b,)](
            g_t, ldg, index.slots, index.offsets[c0 * n_inputs :], weight, target, *strides,
            h_t if with_gw else g_t, h_t.shape[1] if with_gw else ldg, gw_target if with_gw else target,
            start * fan_in, batch, load_cols, n_inputs, K=fan_in, ACCUMULATE=several, WITH_GRAD_WEIGHT=with_gw,
            GW_ATOMIC=gw_atomic, BLOCK_E=blk.block_l, BLOCK_B=blk.block_b, num_warps=blk.num_warps,
        )
        if gw_target is not gw:
            gw.copy_(gw_target)
        if sink is not None:
            sink.take(start, stop, gw)
    if several:
        out.copy_(target.t())
    return out


def _by_input_index(indices: torch.Tensor, n_inputs: int, batch: int, grad_dtype: torch.dtype, with_grad_weight: bool,
                    plan: Plan, cache: ByInputCache | None) -> ByInputIndex:
    """The by-input index for this batch: the cache's (built when it has none that fits), else a
    new one that nothing keeps."""
    chunk = plan.by_input_chunk_labels(indices.shape[1], indices.device, batch, grad_dtype, with_grad_weight)
    if cache is None:
        return build_by_input_index(indices, n_inputs, chunk, plan.by_input_build_slots)
    return cache.get(indices, n_inputs, chunk, plan.by_input_build_slots)


# --------------------------------------------------------------------------------------------
# Piece-wise launchers on [B, D] activations, as the reference op has
# --------------------------------------------------------------------------------------------


def forward(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
            plan: Plan = DEFAULT_PLAN, blocks: Blocks | None = None) -> torch.Tensor:
    """Logits ``z [B, L]``, by default in ``promote_types(h.dtype, weight.dtype)``."""
    check_float("h", h)
    check_indices(indices, weight)
    check_device(h, indices, weight, *([bias] if bias is not None else []))
    dtype = out_dtype or torch.promote_types(h.dtype, weight.dtype)
    z = new_out(out, (h.shape[0], indices.shape[0]), dtype, h.device)
    return _forward_t(transpose_padded(h), h.shape[0], indices.contiguous(), weight.contiguous(),
                      None if bias is None else bias.contiguous(), z, plan, blocks)


def grad_weight(grad_out: torch.Tensor, h: torch.Tensor, indices: torch.Tensor, *,
                out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                plan: Plan = DEFAULT_PLAN, blocks: Blocks | None = None) -> torch.Tensor:
    """``grad_W [L, K]``, by default in ``promote_types(grad_out.dtype, h.dtype)``."""
    check_float("grad_out", grad_out)
    check_float("h", h)
    check_indices(indices)
    check_device(grad_out, h, indices)
    dtype = out_dtype or torch.promote_types(grad_out.dtype, h.dtype)
    gw = new_out(out, tuple(indices.shape), dtype, h.device)
    return _grad_weight_t(grad_out, transpose_padded(h), indices.contiguous(), gw, None, plan, blocks)


def grad_input(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int, *,
               out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               plan: Plan = DEFAULT_PLAN, blocks: Blocks | None = None,
               by_input: ByInputCache | None = None) -> torch.Tensor:
    """``grad_h [B, D]``, by default in ``promote_types(grad_out.dtype, weight.dtype)``; the
    by-input index comes from ``by_input`` when given, else is built for this call."""
    check_float("grad_out", grad_out)
    check_indices(indices, weight)
    check_device(grad_out, indices, weight)
    dtype = out_dtype or torch.promote_types(grad_out.dtype, weight.dtype)
    gh = new_out(out, (grad_out.shape[0], n_inputs), dtype, grad_out.device)
    indices, weight = indices.contiguous(), weight.contiguous()
    index = _by_input_index(indices, n_inputs, grad_out.shape[0], grad_out.dtype, False, plan, by_input)
    return grad_input_over_index(grad_out, indices, weight, n_inputs, gh, index, plan, blocks)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class FixedFanInTriton(torch.autograd.Function):
    """``z = fixed_fanin(h, I, W, bias)`` with the Triton kernels; saves ``h^T`` for the backward."""

    @staticmethod
    def forward(ctx, h, indices, weight, bias, out_dtype, sink, by_input, plan):  # noqa: D102 (autograd protocol)
        h_t = transpose_padded(h)
        batch, n_labels = h.shape[0], indices.shape[0]
        if any(ctx.needs_input_grad[:4]):
            # A tensor of its own with these strides, not a view: a view made inside a custom
            # Function may not be written in place later (the loss does).
            z = torch.empty_strided((batch, n_labels), (1, batch), dtype=out_dtype, device=h.device)
        else:
            z = torch.empty(batch, n_labels, dtype=out_dtype, device=h.device)
        _forward_t(h_t, batch, indices, weight, bias, z, plan)
        ctx.save_for_backward(h_t, indices, weight)
        ctx.batch, ctx.n_inputs, ctx.h_dtype = batch, h.shape[1], h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.sink, ctx.by_input, ctx.plan = sink, by_input, plan
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (autograd protocol)
        h_t, indices, weight = ctx.saved_tensors
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        grads = backward(grad_out, h_t, indices, weight, ctx.n_inputs, h_dtype=ctx.h_dtype,
                         bias_dtype=ctx.bias_dtype if need_b else None, need_h=need_h, need_weight=need_w,
                         sink=ctx.sink if need_w else None, by_input=ctx.by_input, plan=ctx.plan)
        return grads[0], None, grads[1], grads[2], None, None, None, None


def _label_ranges(n_labels: int, fan_in: int, sink: GradWeightSink | None, plan: Plan) -> list[tuple[int, int]]:
    """All labels at once, or for a sink ranges of ``plan.sink_range_slots`` slots."""
    per_range = n_labels if sink is None else max(1, plan.sink_range_slots // max(1, fan_in))
    return [(start, min(start + per_range, n_labels)) for start in range(0, n_labels, max(1, per_range))]


def backward(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int,
             *, h_dtype: torch.dtype, bias_dtype: torch.dtype | None, need_h: bool = True, need_weight: bool = True,
             sink: GradWeightSink | None = None, by_input: ByInputCache | None = None, plan: Plan = DEFAULT_PLAN,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_h, grad_W, grad_bias)`` from ``grad_out [B, L]`` and the forward's ``h^T``
    (``transpose_padded(h)``); ``bias_dtype=None`` skips the bias gradient.

    With a ``sink``, grad_W goes to it and comes back None. When one batch block covers the batch
    and the sink can take the grad_W pass's tiles itself (``FusedGradWeightSink``), it does;
    otherwise grad_W is computed label range by label range into buffers of at most
    ``plan.sink_range_slots`` slots (or one by-input label chunk), each handed over right away.
    Either way the whole gradient never exists, and every range reaches the sink after grad_h,
    which reads the old weights."""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    device = grad_out.device
    grad_h = torch.empty(batch, n_inputs, dtype=h_dtype, device=device) if need_h else None
    grad_b = torch.empty(n_labels, dtype=bias_dtype, device=device) if bias_dtype is not None else None
    grad_w = torch.empty_like(weight) if need_weight and sink is None else None
    if sink is not None:
        sink.open()
    if need_h and need_weight and batch >= plan.fused_min_batch:
        # One pass over the by-input index gives grad_h and grad_W.
        index = _by_input_index(indices, n_inputs, batch, grad_out.dtype, True, plan, by_input)
        grad_input_over_index(grad_out, indices, weight, n_inputs, grad_h, index, plan, h_t=h_t, grad_w=grad_w,
                              sink=sink)
        if grad_b is not None:
            grad_b.copy_(grad_out.sum(0, dtype=torch.float32))
        return grad_h, grad_w, grad_b
    if need_h:
        index = _by_input_index(indices, n_inputs, batch, grad_out.dtype, False, plan, by_input)
        grad_input_over_index(grad_out, indices, weight, n_inputs, grad_h, index, plan)
    blocks = plan.grad_weight_blocks(h_t.shape[1], fan_in)
    if (sink is not None and hasattr(sink, "take_fused") and 0 < batch <= blocks.block_b and plan.h_is_hot(h_t)
            and n_labels > 0 and fan_in > 0):
        sink.take_fused(grad_out, h_t, indices, grad_b, blocks)
    elif need_weight:
        for start, stop in _label_ranges(n_labels, fan_in, sink, plan):
            rows = slice(start, stop)
            gw = grad_w if sink is None else torch.empty(stop - start, fan_in, dtype=sink.dtype, device=device)
            _grad_weight_t(grad_out[:, rows], h_t, indices[rows], gw, None if grad_b is None else grad_b[rows], plan)
            if sink is not None:
                sink.take(start, stop, gw)
    elif grad_b is not None:
        grad_b.copy_(grad_out.sum(0, dtype=torch.float32))
    return grad_h, grad_w, grad_b


def fixed_fanin(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                *, sink: GradWeightSink | None = None, by_input: ByInputCache | None = None,
                plan: Plan = DEFAULT_PLAN) -> torch.Tensor:
    """Differentiable fixed fan-in op ``h [B, D] -> z [B, L]`` (dtype rule in the module
    docstring); with ``sink`` the backward hands grad_W to it (see ``backward``); ``by_input`` keeps
    the by-input index between backward passes."""
    check_float("h", h)
    check_indices(indices, weight)
    check_call(h, indices, weight, bias, sink)
    h, out_dtype = logits_input(h, weight)
    return FixedFanInTriton.apply(h, indices.contiguous(), weight.contiguous(),
                                  None if bias is None else bias.contiguous(), out_dtype, sink, by_input, plan)
