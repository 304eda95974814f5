"""Where the backward of a fixed fan-in layer may hand its weight gradient instead of returning it.

A sink takes grad_W one range of labels at a time, each as soon as it is computed, so that the
gradient of the whole ``[L, K]`` weight never exists: an optimizer's sink takes its step on the
range and lets the buffer go. The op knows nothing of what a sink does with a range. The one
promise it makes: a range arrives after everything in this backward that reads those labels' old
weights (grad_h), so the sink may write the weights.
"""

from __future__ import annotations

from typing import Protocol

import torch

from xmlsparse.ops.fixed_fanin.plan import Blocks


class GradWeightSink(Protocol):
    """Takes the weight gradient of one backward, range by range."""

    # The dtype of the ranges handed to ``take`` (an optimizer reading them as bf16 halves their bytes).
    dtype: torch.dtype

    def open(self) -> None:
        """Called once per backward, before the first range (an optimizer advances its step)."""
        ...

    def take(self, start: int, stop: int, grad: torch.Tensor) -> None:
        """grad_W of labels ``[start, stop)``, ``[stop - start, K]`` in ``dtype``."""
        ...


class FusedGradWeightSink(GradWeightSink, Protocol):
    """A sink that can also compute grad_W itself in one pass over the tiles of the grad_W kernel
    and consume each tile where it is computed (its kernel is built from the shared helpers of
    ``xmlsparse.ops.fixed_fanin.kernels``). The op offers this when one batch block covers the
    batch, so that each tile's gradient is final where it is computed."""

    def take_fused(self, grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor,
                   grad_bias: torch.Tensor | None, blocks: Blocks) -> None:
        """grad_W of all labels from ``grad_out [B, L]`` and ``h^T [D, ldh]`` consumed tile by
        tile; ``grad_bias`` (when not None) is written with the batch sums of ``grad_out``."""
        ...
