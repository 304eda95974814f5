"""Plain torch fixed fan-in layer: runs on any device and is the oracle for the Triton kernels.

``z[b, l] = sum_k W[l, k] * h[b, I[l // G, k]] + bias[l]`` with ``h [B, D]``, ``W [L, K]``,
``bias [L]`` or None, and ``I`` integer ``[ceil(L / G), K]``: labels in groups of ``G`` (the
``group_size``, 1 by default: a row of ``I`` per label) share one row of inputs.

Every pass works on chunks of labels whose gathered block ``[Lc, K, B]`` holds at most
``chunk_elements`` elements (``CHUNK_ELEMENTS`` by default), so no ``[B, L, K]`` tensor ever
exists, on CPU either.

Dtypes: sums accumulate in float32, or in float64 when an input is float64. The logits take h's
dtype promoted with W's (bf16 with bf16 gives bf16, bf16 with fp32 gives fp32); the gradients
take the dtype of the tensor they belong to.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from xmlsparse.ops.fixed_fanin.checks import check_group_shapes
from xmlsparse.ops.fixed_fanin.sink import GradWeightSink

# Elements of the largest temporary block one chunk of labels may create, by default (the
# dispatcher passes its plan's ``reference_chunk_elements``).
CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of ``dtypes`` is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def label_chunk(batch: int, fan_in: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Labels per chunk so that a ``[Lc, K, B]`` block stays within ``chunk_elements``."""
    return max(1, chunk_elements // max(1, batch * fan_in))


def _label_ranges(n_labels: int, batch: int, fan_in: int, chunk_elements: int):
    step = label_chunk(batch, fan_in, chunk_elements)
    for start in range(0, n_labels, step):
        yield start, min(start + step, n_labels)


def label_indices(indices: torch.Tensor, start: int, stop: int, group_size: int = 1) -> torch.Tensor:
    """The input rows read by labels ``[start, stop)``: row ``l // group_size`` for label ``l``."""
    if group_size == 1:
        return indices[start:stop]
    return indices[torch.arange(start, stop, device=indices.device) // group_size]


def _gather(h_t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of ``h_t [D, B]`` picked by ``indices [Lc, K]`` -> ``[Lc, K, B]`` (int64 offsets)."""
    n_labels, fan_in = indices.shape
    return h_t.index_select(0, indices.reshape(-1).long()).view(n_labels, fan_in, h_t.shape[1])


def _check_inputs(
    h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 1
) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be [B, D], got shape {tuple(h.shape)}")
    if indices.dim() != 2 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer [L, K] tensor, got {indices.dtype} {tuple(indices.shape)}")
    check_group_shapes(indices, weight, group_size)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    tensors = [h, indices, weight] + ([bias] if bias is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"h, indices, weight and bias must share one device, got {sorted(map(str, devices))}")


def forward(
    h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS, group_size: int = 1,
) -> torch.Tensor:
    """Logits ``z [B, L]`` in ``promote_types(h.dtype, weight.dtype)``."""
    _check_inputs(h, indices, weight, bias, group_size)
    acc = accumulation_dtype(h.dtype, weight.dtype)
    batch = h.shape[0]
    n_labels, fan_in = weight.shape
    h_t = h.t().to(acc).contiguous()  # [D, B]: one gathered index reads B contiguous values
    z = torch.empty(batch, n_labels, dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
    for start, stop in _label_ranges(n_labels, batch, fan_in, chunk_elements):
        gathered = _gather(h_t, label_indices(indices, start, stop, group_size))  # [Lc, K, B]
        w = weight[start:stop].to(acc).unsqueeze(1)  # [Lc, 1, K]
        z_chunk = torch.bmm(w, gathered).squeeze(1)  # [Lc, B]
        if bias is not None:
            z_chunk += bias[start:stop].to(acc).unsqueeze(1)
        z[:, start:stop] = z_chunk.t()
    return z


def grad_input(
    grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, n_inputs: int,
    chunk_elements: int = CHUNK_ELEMENTS, group_size: int = 1,
) -> torch.Tensor:
    """``grad_h [B, D]``: ``grad_h[b, I[l, k]] += W[l, k] * grad_out[b, l]`` (repeats in a row add up).

    Returned in ``promote_types(grad_out.dtype, weight.dtype)``.
    """
    acc = accumulation_dtype(grad_out.dtype, weight.dtype)
    batch = grad_out.shape[0]
    n_labels, fan_in = weight.shape
    g_t = grad_out.t()  # [L, B]
    grad_h_t = torch.zeros(n_inputs, batch, dtype=acc, device=grad_out.device)  # [D, B]
    for start, stop in _label_ranges(n_labels, batch, fan_in, chunk_elements):
        w = weight[start:stop].to(acc).unsqueeze(2)  # [Lc, K, 1]
        contributions = w * g_t[start:stop].to(acc).unsqueeze(1)  # [Lc, K, B]
        rows = label_indices(indices, start, stop, group_size)
        grad_h_t.index_add_(0, rows.reshape(-1).long(), contributions.view(-1, batch))
    return grad_h_t.t().to(torch.promote_types(grad_out.dtype, weight.dtype)).contiguous()


def grad_weight(
    grad_out: torch.Tensor, h: torch.Tensor, indices: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
    group_size: int = 1,
) -> torch.Tensor:
    """``grad_W [L, K]``: ``grad_W[l, k] = sum_b grad_out[b, l] * h[b, I[l, k]]``.

    Returned in ``promote_types(grad_out.dtype, h.dtype)``.
    """
    acc = accumulation_dtype(grad_out.dtype, h.dtype)
    batch = h.shape[0]
    n_labels, fan_in = grad_out.shape[1], indices.shape[1]
    h_t = h.t().to(acc).contiguous()  # [D, B]
    grad_w = torch.empty(n_labels, fan_in, dtype=torch.promote_types(grad_out.dtype, h.dtype), device=h.device)
    for start, stop in _label_ranges(n_labels, batch, fan_in, chunk_elements):
        grad_w[start:stop] = _grad_weight_rows(grad_out, h_t, indices, start, stop, group_size)
    return grad_w


def _grad_weight_rows(
    grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, start: int, stop: int, group_size: int = 1
) -> torch.Tensor:
    """grad_W of labels ``[start, stop)`` from ``h_t [D, B]`` in the accumulation dtype."""
    gathered = _gather(h_t, label_indices(indices, start, stop, group_size))  # [Lc, K, B]
    g = grad_out[:, start:stop].t().to(h_t.dtype).unsqueeze(2)  # [Lc, B, 1]
    return torch.bmm(gathered, g).squeeze(2)


class FixedFanInFunction(torch.autograd.Function):
    """Autograd wrapper: forward and the explicit chunked backward above; with a sink, the
    backward hands grad_W to it chunk by chunk, after grad_h (which reads the old weights)."""

    @staticmethod
    def forward(ctx, h, indices, weight, bias, sink, chunk_elements, group_size):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(h, indices, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.sink, ctx.chunk_elements, ctx.group_size = sink, chunk_elements, group_size
        return forward(h, indices, weight, bias, chunk_elements, group_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (autograd protocol)
        h, indices, weight = ctx.saved_tensors
        need_h, _, need_weight, need_bias = ctx.needs_input_grad[:4]
        chunk, group = ctx.chunk_elements, ctx.group_size
        grad_h = grad_input(grad_out, indices, weight, h.shape[1], chunk, group).to(h.dtype) if need_h else None
        grad_b = None
        if need_bias:
            grad_b = grad_out.sum(0, dtype=accumulation_dtype(grad_out.dtype)).to(ctx.bias_dtype)
        sink = ctx.sink
        if not need_weight or sink is None:
            grad_w = grad_weight(grad_out, h, indices, chunk, group).to(weight.dtype) if need_weight else None
            return grad_h, None, grad_w, grad_b, None, None, None
        # The gradient of the whole weight never exists: chunk by chunk to the sink.
        sink.open()
        h_t = h.t().to(accumulation_dtype(grad_out.dtype, h.dtype)).contiguous()
        for start, stop in _label_ranges(weight.shape[0], h.shape[0], indices.shape[1], chunk):
            sink.take(start, stop, _grad_weight_rows(grad_out, h_t, indices, start, stop, group).to(sink.dtype))
        return grad_h, None, None, grad_b, None, None, None


def fixed_fanin(
    h: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    sink: GradWeightSink | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    group_size: int = 1,
) -> torch.Tensor:
    """Differentiable fixed fan-in op ``h [B, D] -> z [B, L]`` (see the module docstring); with
    ``sink`` the backward hands grad_W to it (``GradWeightSink``) instead of returning it."""
    _check_inputs(h, indices, weight, bias, group_size)
    return FixedFanInFunction.apply(h, indices, weight, bias, sink, chunk_elements, group_size)
