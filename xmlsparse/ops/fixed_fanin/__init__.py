"""The fixed fan-in op: ``z[b, l] = sum_k W[l, k] * h[b, I[l // G, k]] + bias[l]``, where labels in
groups of ``G`` (``group_size``; 1: each label its own row of ``I``) share one row of inputs.

``fixed_fanin(h, indices, weight, bias)`` runs one of two implementations with one signature:
the Triton kernels (``triton_op.py`` over ``kernels.py``, tiles from ``plan.py``), used on CUDA,
and plain chunked torch (``reference.py``), which runs everywhere and is the oracle. The backward
may hand grad_W to a sink (``sink.py``) instead of returning it; the Triton grad_h pass walks a
by-input copy of the indices (``by_input.py``), which the caller may keep between steps. Grouped
labels run on tensor-core kernels of their own (``grouped.py``).
"""

from __future__ import annotations

import torch

from xmlsparse.ops import resolve_impl
from xmlsparse.ops.fixed_fanin.by_input import ByInputCache
from xmlsparse.ops.fixed_fanin.plan import DEFAULT_PLAN, Plan
from xmlsparse.ops.fixed_fanin.sink import FusedGradWeightSink, GradWeightSink

__all__ = ["ByInputCache", "FusedGradWeightSink", "GradWeightSink", "Plan", "fixed_fanin"]


def fixed_fanin(
    h: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    sink: GradWeightSink | None = None,
    by_input: ByInputCache | None = None,
    plan: Plan = DEFAULT_PLAN,
    group_size: int = 1,
) -> torch.Tensor:
    """Differentiable fixed fan-in op: ``h [B, D]``, ``indices`` int32 ``[ceil(L / group_size), K]``,
    ``weight [L, K]``, ``bias [L]`` or None -> ``z [B, L]``. With ``sink`` the backward hands grad_W
    to it range by range and leaves ``weight.grad`` unset. ``by_input`` keeps the Triton backward's
    by-input index from one call to the next (its owner drops it when the indices change); ``plan``
    sets the tiles, thresholds and chunk sizes. Grouped labels (``group_size`` > 1) need no by-input
    index."""
    chosen = resolve_impl(impl, h.device)
    if group_size != 1:
        if chosen == "triton":
            from xmlsparse.ops.fixed_fanin.grouped import grouped_fixed_fanin

            return grouped_fixed_fanin(h, indices, weight, bias, group_size, sink=sink, plan=plan)
        from xmlsparse.ops.fixed_fanin.reference import fixed_fanin as reference_fixed_fanin

        return reference_fixed_fanin(h, indices, weight, bias, sink=sink, chunk_elements=plan.reference_chunk_elements,
                                     group_size=group_size)
    if chosen == "triton":
        from xmlsparse.ops.fixed_fanin.triton_op import fixed_fanin as triton_fixed_fanin

        return triton_fixed_fanin(h, indices, weight, bias, sink=sink, by_input=by_input, plan=plan)
    from xmlsparse.ops.fixed_fanin.reference import fixed_fanin as reference_fixed_fanin

    return reference_fixed_fanin(h, indices, weight, bias, sink=sink, chunk_elements=plan.reference_chunk_elements)
