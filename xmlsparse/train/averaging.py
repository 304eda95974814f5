"""An exponential moving average of a model's parameters (``train.average``).

Validation, best.pt and the test run on the average instead of the last step's weights: on
small, tail-heavy data the weights of single steps vary from seed to seed enough that averaging
runs gains points (docs/benchmarks.md), and the average along one run keeps part of that gain at
the cost of one copy of the parameters.

torch's ``swa_utils.AveragedModel`` would deep-copy the module, and with it the fixed fan-in
head's gradient sink and the optimizer it holds; this keeps only the parameter tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The average of ``model``'s parameters, updated after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [param for _, param in model.named_parameters()]
        self.averages = [param.detach().clone() for param in self.params]
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: smaller at first, so that the initial model fades fast."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        torch._foreach_lerp_(self.averages, [param.detach() for param in self.params], weight)

    @torch.no_grad()
    def restart_slots(self, param: torch.Tensor, slots: torch.Tensor) -> None:
        """Set the average of ``param`` to its current value where ``slots`` is True (connections
        that rewiring has just given new inputs: the old input's average means nothing there)."""
        average = self.averages[next(i for i, p in enumerate(self.params) if p is param)]
        torch.where(slots, param.detach(), average, out=average)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model's parameters hold the average; the trained ones are back after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        # In place, one tensor at a time: the optimizer and the head's sink keep their references,
        # and the extra memory is the largest parameter, not the model.
        for param, average in zip(self.params, self.averages):
            held = param.detach().clone()
            param.copy_(average)
            average.copy_(held)
            del held

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averages in place of the parameters (buffers as they are)."""
        state = model.state_dict()
        state.update((name, average.detach()) for name, average in zip(self.names, self.averages))
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "averages": dict(zip(self.names, self.averages))}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.names) - set(state["averages"]))
        if missing:
            raise KeyError(f"the checkpoint's parameter average lacks {', '.join(missing)}")
        for name, average in zip(self.names, self.averages):
            average.copy_(state["averages"][name])
        self.updates = state["updates"]
