"""The by-input index of a fixed fan-in layer: for each input, the slots ``l*K + k`` that read it,
grouped by label chunk. The grad_h pass walks it to sum each input's contributions in registers
instead of scattering them with atomics.

``build_by_input_index`` is a pure function of the indices. ``ByInputCache`` keeps one built index
for its owner (the layer, which drops it when its connections change) and rebuilds it when a batch
asks for chunks of another size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xmlsparse.ops.fixed_fanin.checks import check_indices
from xmlsparse.ops.fixed_fanin.plan import DEFAULT_PLAN


@dataclass
class ByInputIndex:
    """Slots of ``indices`` grouped by (label chunk, input): the slots ``l*K + k`` of chunk ``c``
    that read input ``d`` are ``slots[offsets[c*D + d] : offsets[c*D + d + 1]]``, ascending."""

    chunk_labels: int
    n_chunks: int
    n_inputs: int
    slots: torch.Tensor
    offsets: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size() + self.offsets.numel() * self.offsets.element_size()


def build_by_input_index(indices: torch.Tensor, n_inputs: int, chunk_labels: int,
                         build_slots: int = DEFAULT_PLAN.by_input_build_slots) -> ByInputIndex:
    """Sort the slots by (label chunk, input) on the indices' device: a stable sort, a bincount and
    a cumulative sum per piece of whole label chunks (``build_slots`` slots and ``build_slots``
    counts at most, unless one chunk alone is larger), written into the
    preallocated ``slots`` and ``offsets``. Raises ValueError when an index lies outside
    ``[0, n_inputs)``."""
    check_indices(indices)
    n_labels, fan_in = indices.shape
    chunk_labels = max(1, min(chunk_labels, n_labels))
    n_chunks = -(-n_labels // chunk_labels)
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
    per_piece = max(1, min(build_slots // max(chunk_slots, 1), build_slots // max(n_inputs, 1)))
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
    return ByInputIndex(chunk_labels, n_chunks, n_inputs, slots, offsets)


# Keyed by (device, data pointer, shape, n_inputs); an entry holds a weak reference to the indices
# and their version counter (``indices._version``, bumped by every in-place change such as


class ByInputCache:
    """The by-input index of one layer's indices, kept from one backward to the next. Its owner
    calls ``drop`` whenever the indices change (rewiring, loading a state dict, moving devices)."""

    def __init__(self) -> None:
        self.index: ByInputIndex | None = None

    def get(self, indices: torch.Tensor, n_inputs: int, chunk_labels: int,
            build_slots: int = DEFAULT_PLAN.by_input_build_slots) -> ByInputIndex:
        """The kept index, or a new one when there is none, or when its chunks are larger than
        ``chunk_labels`` or under a quarter of it (a smaller batch reuses the index built for a
        larger one)."""
        wanted = max(1, min(chunk_labels, indices.shape[0]))
        kept = self.index
        if kept is not None and kept.n_inputs == n_inputs and kept.chunk_labels <= wanted < 4 * kept.chunk_labels:
            return kept
        # Dropped before the build: at amazon-3m shape the old index holds 1 GB that would
        # otherwise sit beside its replacement.
        self.index = kept = None
        self.index = build_by_input_index(indices, n_inputs, chunk_labels, build_slots)
        return self.index

    def drop(self) -> None:
        """Forget the index (the next backward that needs one builds it)."""
        self.index = None

    @property
    def nbytes(self) -> int:
        """Bytes of the kept index, 0 without one."""
        return 0 if self.index is None else self.index.nbytes
