"""Tile sizes and thresholds of the fixed fan-in op, in one object.

``Plan()`` holds the values measured fastest on an H100 (docs/benchmarks.md, "Fixed fan-in op:
Triton kernels on one H100", and the paragraph on ``Plan`` there); a test or benchmark that wants
other values constructs its own ``Plan`` and passes it to the op, rather than changing module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    """Tile of one program: labels (or by-input entries) x slots x batch columns, and its warps."""

    block_l: int
    block_k: int
    block_b: int
    num_warps: int


def pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two >= ``n``, capped at ``cap``."""
    return min(cap, 1 << (max(1, n) - 1).bit_length())


def _slot_block(fan_in: int, cap: int) -> int:
    """Largest power of two <= cap dividing K (no masked tail), else cap."""
    block = cap
    while block > 1 and fan_in % block:
        block //= 2
    return block if block >= min(cap, 4) or fan_in < 4 else cap


@dataclass(frozen=True)
class Plan:
    """How the op cuts its work.

    - ``fused_min_batch``: from this batch on, the backward computes grad_W inside the by-input
      grad_h pass (one read of the ``grad_out^T`` rows for both); below it a separate grad_W pass is
      faster.
    - ``sink_range_slots``: slots of grad_W handed to a gradient sink at once, so that the gradient
      of the whole head never exists (amazon-3m shape, K = 96: 32 MiB instead of 515 MiB).
    - ``by_input_l2_share``: share of L2 one label chunk of the by-input pass may fill with its
      ``grad_out^T`` rows and weights (the rest holds the ``[D, B]`` accumulator and the index).
    - ``hot_l2_share``: share of L2 the gathered rows of ``h^T`` may fill before the forward runs
      batch block after batch block and grad_W splits the batch into column ranges.
    - ``l2_bytes_default``: the L2 size assumed when the device reports none (the CPU
      interpreter): an H100's 50 MB.
    - ``by_input_build_slots``: slots sorted at once while building the by-input index (its
      temporaries take about 35 bytes a slot).
    - ``reference_chunk_elements``: the largest ``[labels, K, B]`` block the reference op
      gathers at once.
    """

    fused_min_batch: int = 128
    sink_range_slots: int = 1 << 24
    by_input_l2_share: float = 0.5
    hot_l2_share: float = 1 / 3
    l2_bytes_default: int = 50 * 1024 * 1024
    by_input_build_slots: int = 1 << 22
    reference_chunk_elements: int = 1 << 24

    def l2_bytes(self, device: torch.device) -> int:
        if device.type == "cuda":
            return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or self.l2_bytes_default
        return self.l2_bytes_default

    def h_is_hot(self, h_t: torch.Tensor) -> bool:
        """Whether the transposed activations fit in the L2 share kept for them."""
        return h_t.numel() * h_t.element_size() <= self.l2_bytes(h_t.device) * self.hot_l2_share

    def forward_blocks(self, batch_cols: int, fan_in: int) -> Blocks:
        """Tile for the forward gather, 8192 elements: smaller tiles of 2048-4096 ran up to 15x
        slower at the same bytes."""
        block_b = pow2_at_most(batch_cols, 128)
        block_k = _slot_block(fan_in, 8)
        block_l = max(1, min(256, 8192 // (block_k * block_b)))
        return Blocks(block_l, block_k, block_b, 4)

    def grad_weight_blocks(self, batch_cols: int, fan_in: int) -> Blocks:
        """Tile for the grad_W gather (a sum over the batch inside each tile), 8192 elements."""
        block_b = pow2_at_most(batch_cols, 64)
        block_k = _slot_block(fan_in, 16)
        block_l = max(1, min(256, 8192 // (block_k * block_b)))
        return Blocks(block_l, block_k, block_b, 4)

    def by_input_blocks(self, batch_cols: int) -> Blocks:
        """Tile for the by-input pass: ``block_l`` slots of one segment per step, one warp, up to
        512 batch columns per program."""
        block_b = pow2_at_most(batch_cols, 512)
        return Blocks(8 if block_b <= 128 else 4, 1, block_b, 1)

    def by_input_chunk_labels(self, fan_in: int, device: torch.device, batch: int, grad_dtype: torch.dtype,
                              with_grad_weight: bool = True) -> int:
        """Labels per chunk of the by-input pass, so that a chunk's ``grad_out^T`` rows, weights
        (and grad_W rows, when the same pass writes them) fill ``by_input_l2_share`` of L2."""
        per_label = padded_width(batch) * torch.finfo(grad_dtype).bits // 8 + fan_in * 4 * (1 + with_grad_weight)
        return max(1, int(self.l2_bytes(device) * self.by_input_l2_share) // per_label)


def padded_width(batch: int) -> int:
    """Row length of the transposed activations: B rounded up to 16 (16-byte loads) from B = 16 on."""
    return batch if batch < 16 else (batch + 15) // 16 * 16


DEFAULT_PLAN = Plan()
