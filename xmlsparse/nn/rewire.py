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

from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.sparse_linear import FixedFanInLinear, redraw_distinct

NEW_WEIGHTS = ("zero", "random")


def reset_optimizer_slots(optimizer: torch.optim.Optimizer | None, parameter: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero, where ``mask`` is True, every per-element state tensor ``optimizer`` keeps for ``parameter``."""
    if optimizer is None:
        return
    for value in optimizer.state.get(parameter, {}).values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value.masked_fill_(mask, 0)


class Rewirer:
    """Schedules and performs rewiring rounds of a :class:`FixedFanInLinear` layer.

    ``interval``: optimizer steps between rounds. ``total_steps``: steps planned for the run.
    ``fraction``: share of all slots pruned per round, or ``threshold``: prune ``|W| < threshold``
    (exactly one of the two), the threshold multiplied by ``threshold_decay`` after every round.
    ``stop``: share of ``total_steps`` after which rounds stop. ``new_weights``: ``zero`` | ``random``.
    """

    def __init__(
        self,
        *,
        interval: int,
        total_steps: int,
        fraction: float | None = None,
        threshold: float | None = None,
        threshold_decay: float = 1.0,
        stop: float = 1.0,
        new_weights: str = "zero",
        seed: int = 0,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise XMLSparseError(f"rewire interval must be a positive number of optimizer steps, got {interval!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise XMLSparseError(f"rewire total_steps must be a positive integer, got {total_steps!r}")
        if (fraction is None) == (threshold is None):
            raise XMLSparseError(
                f"rewiring needs exactly one of fraction or threshold, got fraction={fraction!r}, threshold={threshold!r}"
            )
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise XMLSparseError(f"rewire fraction must be in (0, 1], got {fraction!r}")
        if threshold is not None and not threshold >= 0.0:
            raise XMLSparseError(f"rewire threshold must be >= 0, got {threshold!r}")
        if not 0.0 < threshold_decay <= 1.0:
            raise XMLSparseError(f"rewire threshold_decay must be in (0, 1], got {threshold_decay!r}")
        if not 0.0 <= stop <= 1.0:
            raise XMLSparseError(f"rewire stop must be in [0, 1], got {stop!r}")
        if new_weights not in NEW_WEIGHTS:
            raise XMLSparseError(
                f"rewire new_weights must be one of {', '.join(NEW_WEIGHTS)}, got {new_weights!r}"
            )
        self.interval = interval
        self.total_steps = total_steps
        self.fraction = fraction
        self.threshold = threshold
        self.threshold_decay = threshold_decay
        self.stop = stop
        self.new_weights = new_weights
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
        self, layer: FixedFanInLinear, optimizer: torch.optim.Optimizer | None, step: int
    ) -> float | None:
        """Rewire when ``step`` is due; return the share of slots rewired, or None when not due."""
        if not self.due(step):
            return None
        return self.rewire(layer, optimizer)

    @torch.no_grad()
    def rewire(self, layer: FixedFanInLinear, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Run one round now; return the share of the layer's slots that were pruned and regrown."""
        weight, indices = layer.weight, layer.indices
        generator = torch.Generator(device=weight.device)
        generator.manual_seed(self._round_seed())
        threshold = self.current_threshold()
        self.rounds += 1
        if indices.shape[1] >= layer.in_features or weight.numel() == 0:
            return 0.0
        pruned = self._select_pruned(weight, threshold, generator)
        n_pruned = int(pruned.sum())
        if n_pruned:
            redraw_distinct(indices, pruned, layer.in_features, generator)
            if self.new_weights == "zero":
                weight.masked_fill_(pruned, 0)
            else:
                bound = 1.0 / math.sqrt(indices.shape[1])
                values = torch.rand(n_pruned, generator=generator, device=weight.device) * (2 * bound) - bound
                weight.masked_scatter_(pruned, values.to(weight.dtype))
            reset_optimizer_slots(optimizer, weight, pruned)
        return n_pruned / pruned.numel()

    def _select_pruned(
        self, weight: torch.Tensor, threshold: float | None, generator: torch.Generator
    ) -> torch.Tensor:
        """Boolean mask of the slots to prune, shaped like ``weight``."""
        magnitude = weight.detach().abs().float().flatten()
        if threshold is not None:
            return (magnitude < threshold).view_as(weight)
        n_prune = round(self.fraction * magnitude.numel())
        if n_prune == 0:
            return torch.zeros_like(weight, dtype=torch.bool)
        kth = magnitude.kthvalue(n_prune).values
        pruned = magnitude < kth
        missing = n_prune - int(pruned.sum())
        if missing > 0:
            # Magnitudes tied at the cut (zeros of freshly regrown slots, say): a random subset of them.
            ties = (magnitude == kth).nonzero().squeeze(1)
            pick = torch.randperm(ties.numel(), generator=generator, device=ties.device)[:missing]
            pruned[ties[pick]] = True
        return pruned.view_as(weight)

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
