"""Rewiring of a fixed fan-in layer: prune the weakest connections, regrow them at random.

Every ``interval`` optimizer steps, until ``stop`` of the planned steps have passed, the slots of
``layer.weight`` with the smallest magnitudes (a ``fraction`` of the whole layer, or those below a
``threshold`` that may decay from round to round) are pruned. Each pruned slot is regrown at a
random input its label does not read through any kept slot, so every row stays free of repeats;
a regrown slot may land on the input it just left, and is reset all the same. Regrown weights are
``zero`` (as in Schultheis & Babbar, 2023) or ``random``: drawn from the layer's initial
distribution ``U(-1/sqrt(K), 1/sqrt(K))``. The optimizer state of the changed slots (Adam's
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; any per-element state of the weight) is zeroed,
the rest of the state, the other slots and the bias are left untouched.

Everything runs on the layer's device; indices change in place, shapes never change. A layer whose
labels read every input (``fan_in == in_features``) has nothing to regrow into and is left as is.

Random numbers of round ``r`` come from a generator seeded with ``(seed, r)``, so the state to
checkpoint is two integers and a resumed run rewires exactly as an uninterrupted one (on the
same kind of device); data-parallel replicas with the same seed rewire identically.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist

from xmlsparse.config import RewireConfig
from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.parallel.world import SINGLE, World
from xmlsparse.train.averaging import WeightAverage

# Slots of the weight handled at once when selecting the slots to prune. The selection runs over
# pieces of the flattened weight so that its temporaries stay near 13 bytes a slot of one piece
# (up to 24 bytes a tie when listing at most this many ties) beside the bool [L, K] mask it
# returns, rather than a full float32 copy plus kthvalue's workspace over all L*K slots
# (measured in docs/benchmarks.md).
SELECT_CHUNK_SLOTS = 1 << 22
_RADIX_BITS = 8


def _magnitude_bits(piece: torch.Tensor) -> torch.Tensor:
    """``|piece|`` as float32 bit patterns (int32, non-negative): ordered exactly as the magnitudes."""
    return piece.float().view(torch.int32) & 0x7FFFFFFF


def _radix_select(keys_of, n_pieces: int, k: int, device: torch.device,
                  across_ranks: bool = False) -> tuple[int, int, int]:
    """The ``k``-th smallest (from 1) of the non-negative int32 keys that ``keys_of(p)`` gives for
    the pieces ``p < n_pieces`` (negative keys are left out), how many keys lie below it and how
    many equal it. One pass over the pieces per 8-bit digit, most significant first (4 passes),
    each a bincount of the digits of the keys that match the digits fixed so far; ``across_ranks``
    sums each pass's counts over the processes, so that the answer is over all ranks' keys."""
    prefix, below, shift = 0, 0, 31
    while shift > 0:
        width = min(_RADIX_BITS, shift)
        shift -= width
        counts = torch.zeros((1 << width) + 1, dtype=torch.int64, device=device)
        for p in range(n_pieces):
            key = keys_of(p)
            outside = (key >> (shift + width)) != prefix
            digit = (key >> shift).bitwise_and_((1 << width) - 1).masked_fill_(outside, 1 << width)
            del key, outside
            counts += torch.bincount(digit, minlength=(1 << width) + 1)
        if across_ranks:
            dist.all_reduce(counts)
        for value, count in enumerate(counts[:-1].tolist()):
            if below + count >= k:
                break
            below += count
        else:
            raise AssertionError(f"radix select: fewer than {k} keys")
        prefix = (prefix << width) | value
    return prefix, below, count


def reset_optimizer_slots(optimizer: torch.optim.Optimizer | None, parameter: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero, where ``mask`` is True, every per-element state tensor ``optimizer`` keeps for ``parameter``."""
    if optimizer is None:
        return
    for value in optimizer.state.get(parameter, {}).values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value.masked_fill_(mask, 0)


def group_magnitudes(weight: torch.Tensor, group_size: int, chunk_slots: int = SELECT_CHUNK_SLOTS) -> torch.Tensor:
    """``[ceil(L / G), K]``: each group's mean |W| over its labels (a partial last group over the
    labels it has), the score by which a grouped layer's slots are pruned. Computed over pieces of
    about ``chunk_slots`` weights, so that no fp32 copy of the whole ``[L, K]`` weight exists."""
    n_labels, fan_in = weight.shape
    whole, n_groups = n_labels // group_size, -(-n_labels // group_size)
    weight = weight.detach()
    out = torch.empty(n_groups, fan_in, dtype=torch.float32, device=weight.device)
    per_piece = max(1, chunk_slots // (group_size * fan_in))
    for start in range(0, whole, per_piece):
        stop = min(start + per_piece, whole)
        piece = weight[start * group_size : stop * group_size].view(stop - start, group_size, fan_in)
        out[start:stop] = piece.abs().sum(1, dtype=torch.float32).div_(group_size)
    if whole < n_groups:
        tail = weight[whole * group_size :]
        out[whole] = tail.abs().sum(0, dtype=torch.float32).div_(tail.shape[0])
    return out


class Rewirer:
    """Schedules and performs rewiring rounds of a :class:`FixedFanInLinear` layer, as the config's
    ``model.rewire`` section (``section``, validated by ``xmlsparse.config``) says.

    ``interval``: optimizer steps between rounds. ``total_steps``: steps planned for the run.
    ``fraction``: share of all slots pruned per round, unless ``threshold`` is given: then
    ``|W| < threshold`` is pruned instead, the threshold multiplied by ``threshold_decay`` after
    every round. ``stop``: share of ``total_steps`` after which rounds stop. ``new_weights``:
    ``zero`` | ``random``. ``seed`` (the run's) seeds every round's random numbers.
    """

    def __init__(self, section: RewireConfig, *, total_steps: int, seed: int,
                 select_chunk_slots: int = SELECT_CHUNK_SLOTS, world: World = SINGLE) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise XMLSparseError(f"rewire total_steps must be a positive integer, got {total_steps!r}")
        self.interval = section.interval
        self.select_chunk_slots = select_chunk_slots  # pieces of the pruning selection (tests use small ones)
        # With a label-sharded head, fraction mode prunes the smallest share of all ranks' slots,
        # as one process pruning the whole layer would (a share of each rank's would prune the
        # labels of every rank alike, whatever their magnitudes). Collective then.
        self.world = world
        self.total_steps = total_steps
        # The two rules are alternatives: a threshold, when given, replaces the fraction.
        self.fraction = section.fraction if section.threshold is None else None
        self.threshold = section.threshold
        self.threshold_decay = section.threshold_decay
        self.stop = section.stop
        self.new_weights = section.new_weights
        self.seed = seed
        self.rounds = 0

    def due(self, step: int) -> bool:
        """True when a round belongs after optimizer step ``step`` (counted from 1)."""
        return step > 0 and step % self.interval == 0 and step < self.stop * self.total_steps

    def current_threshold(self) -> float | None:
        """The magnitude below which the next round prunes (None in fraction mode)."""
        if self.threshold is None:
            return None
        return self.threshold * self.threshold_decay**self.rounds

    def maybe_rewire(
        self, layer: FixedFanInLinear, optimizer: torch.optim.Optimizer | None, step: int,
        average: WeightAverage | None = None,
    ) -> float | None:
        """Rewire when ``step`` is due; return the share of slots rewired, or None when not due."""
        if not self.due(step):
            return None
        return self.rewire(layer, optimizer, average)

    @torch.no_grad()
    def rewire(
        self, layer: FixedFanInLinear, optimizer: torch.optim.Optimizer | None = None,
        average: WeightAverage | None = None,
    ) -> float:
        """Run one round now; return the share of the layer's slots that were pruned and regrown.
        The optimizer's moments and the parameter average (when given) restart at the new slots."""
        weight, indices = layer.weight, layer.indices
        generator = torch.Generator(device=weight.device)
        generator.manual_seed(self._round_seed())
        threshold = self.current_threshold()
        self.rounds += 1
        if indices.shape[1] >= layer.in_features or weight.numel() == 0:
            return 0.0
        group = layer.group_size
        # A group's slot is scored by the mean |W| over its labels; a pruned slot is regrown for all of them.
        pruned = self._select_pruned(weight if group == 1 else group_magnitudes(weight, group, self.select_chunk_slots), threshold, generator)
        # Counted piece by piece: a bool tensor's sum() first makes an int64 copy (8 bytes a slot).
        n_pruned = sum(int(piece.sum()) for piece in pruned.view(-1).split(self.select_chunk_slots))
        if n_pruned:
            layer.redraw_connections(pruned, generator)
            by_label = pruned if group == 1 else pruned.repeat_interleave(group, dim=0)[: weight.shape[0]]
            if self.new_weights == "zero":
                weight.masked_fill_(by_label, 0)
            else:
                bound = 1.0 / math.sqrt(indices.shape[1])
                n_values = n_pruned if group == 1 else int(by_label.sum())
                values = torch.rand(n_values, generator=generator, device=weight.device) * (2 * bound) - bound
                weight.masked_scatter_(by_label, values.to(weight.dtype))
            reset_optimizer_slots(optimizer, weight, by_label)
            if average is not None:
                average.restart_slots(weight, by_label)
        return n_pruned / pruned.numel()

    def _select_pruned(
        self, weight: torch.Tensor, threshold: float | None, generator: torch.Generator
    ) -> torch.Tensor:
        """Boolean mask of the slots to prune, shaped like ``weight``.

        Fraction mode prunes exactly ``n_prune`` slots: every slot whose magnitude lies below the
        ``n_prune``-th smallest one, plus a random subset of those tied with it. Everything runs
        over pieces of ``select_chunk_slots`` slots (the k-th magnitude by a radix select on the
        float32 bit patterns), so no temporary grows with the weight besides the mask itself.
        """
        flat = weight.detach().reshape(-1)
        n_slots, device = flat.numel(), flat.device
        piece = self.select_chunk_slots
        bounds = [(s, min(s + piece, n_slots)) for s in range(0, n_slots, piece)]
        pruned = torch.empty(n_slots, dtype=torch.bool, device=device)
        if threshold is not None:
            for s, e in bounds:
                torch.lt(flat[s:e].abs().float(), threshold, out=pruned[s:e])
            return pruned.view_as(weight)
        across = self.world.distributed
        n_prune = round(self.fraction * (self._sum_over_ranks(n_slots, device) if across else n_slots))
        if n_prune == 0:
            return torch.zeros_like(weight, dtype=torch.bool)

        def bits(p: int) -> torch.Tensor:
            return _magnitude_bits(flat[bounds[p][0] : bounds[p][1]])

        kth, below, n_ties = _radix_select(bits, len(bounds), n_prune, device, across_ranks=across)
        for p, (s, e) in enumerate(bounds):
            torch.lt(bits(p), kth, out=pruned[s:e])
        missing = n_prune - below
        if across:  # this rank's quota of the ties, in rank order
            n_ties = sum(int((bits(p) == kth).sum()) for p in range(len(bounds)))
            ties_by_rank = [0] * self.world.size
            dist.all_gather_object(ties_by_rank, n_ties)
            missing = min(n_ties, max(0, missing - sum(ties_by_rank[: self.world.rank])))
        if missing <= 0:
            return pruned.view_as(weight)
        # Magnitudes tied at the cut (zeros of freshly regrown slots, say): a random subset of them.
        if n_ties <= piece:
            # Few enough to list: the ties in slot order and a random permutation of them.
            ties = torch.cat([(bits(p) == kth).nonzero().squeeze(1) + s for p, (s, _) in enumerate(bounds)])
            pick = torch.randperm(ties.numel(), generator=generator, device=device)[:missing]
            pruned[ties[pick]] = True
        elif missing == n_ties:
            for p, (s, e) in enumerate(bounds):
                pruned[s:e] |= bits(p) == kth
        else:
            # Too many to list: each tie gets a random 31-bit key, redrawn identically in every pass
            # from a seed per piece, and those with the ``missing`` smallest keys are pruned (equal
            # keys at that cut taken in slot order).
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
            piece_generator = torch.Generator(device=device)

            def tie_keys(p: int) -> torch.Tensor:
                s, e = bounds[p]
                piece_generator.manual_seed(seed + p)
                key = torch.randint(0, 2**31 - 1, (e - s,), generator=piece_generator, device=device, dtype=torch.int32)
                return key.masked_fill_(bits(p) != kth, -1)

            cut, below_cut, _ = _radix_select(tie_keys, len(bounds), missing, device)
            extra = missing - below_cut
            for p, (s, e) in enumerate(bounds):
                key = tie_keys(p)
                take = (key >= 0) & (key < cut)
                if extra > 0:
                    at_cut = key == cut
                    take |= at_cut & (at_cut.cumsum(0, dtype=torch.int32) <= extra)
                    extra -= min(extra, int(at_cut.sum()))
                pruned[s:e] |= take
        return pruned.view_as(weight)

    @staticmethod
    def _sum_over_ranks(count: int, device: torch.device) -> int:
        total = torch.tensor(count, dtype=torch.int64, device=device)
        dist.all_reduce(total)
        return int(total)

    def _round_seed(self) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{self.rounds}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to resume the same sequence of rounds."""
        return {"seed": self.seed, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters saved by :meth:`state_dict`."""
        missing = {"seed", "rounds"} - set(state)
        if missing:
            raise XMLSparseError(f"rewiring state lacks {', '.join(sorted(missing))}")
        self.seed = int(state["seed"])
        self.rounds = int(state["rounds"])
