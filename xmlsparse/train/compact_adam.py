"""``CompactAdam``: Adam/AdamW whose two moments are bfloat16, kept unbiased by stochastic rounding.

Half the optimizer memory of torch's Adam (4 bytes a weight instead of 8), one fused pass a tensor
on CUDA (``xmlsparse.ops.adam``), and an opt-in for layers that update their weight inside their
own backward (the fixed fan-in head, through ``AdamGradSink``: its weight gradient then lives only
inside the backward, in bf16). Per parameter the state is ``step`` (a Python int,
so that no step waits for the device), ``exp_avg`` and ``exp_avg_sq`` (bf16, shaped like the
parameter; the rewirer zeroes the slots it regrows). The stochastic rounding bits of a step are a
function of (seed, parameter position, step), so a resumed run repeats them.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from xmlsparse.ops.adam import apply_adam_
from xmlsparse.ops.adam_step import MOMENT_DTYPE, AdamStep
from xmlsparse.ops.fixed_fanin.plan import Blocks

MOMENTS = ("exp_avg", "exp_avg_sq")


class CompactAdam(torch.optim.Optimizer):
    """Adam (``decoupled=False``: L2 penalty added to the gradient) or AdamW (``decoupled=True``)
    with bf16 moments; parameters must be float32 or bfloat16 and contiguous."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        seed: int = 0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "decoupled": decoupled}
        super().__init__(params, defaults)
        self.seed = seed

    def _positions(self):
        """``(position, group, param)`` over every parameter, numbered across the groups."""
        params = ((group, p) for group in self.param_groups for p in group["params"])
        for position, (group, param) in enumerate(params):
            yield position, group, param

    def _locate(self, param: torch.Tensor) -> tuple[int, dict[str, Any]]:
        for position, group, p in self._positions():
            if p is param:
                return position, group
        raise ValueError("the parameter is not managed by this optimizer")

    def begin_step(self, param: torch.Tensor) -> tuple[AdamStep, torch.Tensor, torch.Tensor]:
        """Advance ``param``'s step; return the step's scalars and its moments (made on first use)."""
        return self._begin(param, *self._locate(param))

    def _begin(
        self, param: torch.Tensor, position: int, group: dict[str, Any]
    ) -> tuple[AdamStep, torch.Tensor, torch.Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            for name in MOMENTS:
                state[name] = torch.zeros_like(param, dtype=MOMENT_DTYPE, memory_format=torch.contiguous_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        # Philox keys and torch seeds: any distinct 31-bit value per (seed, position, step).
        seed = (self.seed * 1_000_003 + position * 65_537 + state["step"]) % (2**31 - 1)
        step = AdamStep(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["decoupled"],
                        state["step"], seed)
        return step, state["exp_avg"], state["exp_avg_sq"]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim protocol)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for position, group, param in self._positions():
            if param.grad is None:
                continue  # no gradient, or a weight its layer updated in its backward
            step, exp_avg, exp_avg_sq = self._begin(param, position, group)
            apply_adam_(param, param.grad.contiguous(), exp_avg, exp_avg_sq, step)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the moments stay bf16 (torch casts floating state to the parameter's
        dtype, which would double their memory)."""
        saved = {pid: dict(s) for pid, s in state_dict["state"].items()}
        moments = {pid: {name: s.pop(name) for name in MOMENTS if name in s} for pid, s in saved.items()}
        super().load_state_dict({**state_dict, "state": saved})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, param in zip(saved_ids, params):
            for name, value in moments.get(pid, {}).items():
                self.state[param][name] = value.to(device=param.device, dtype=MOMENT_DTYPE)


class AdamGradSink:
    """``CompactAdam``'s step of a fixed fan-in layer's weight, taken inside the layer's backward
    (a ``FusedGradWeightSink`` of ``xmlsparse.ops.fixed_fanin``): each range of labels takes its
    step as soon as its gradient exists, so the ``[L, K]`` gradient never does, and the
    optimizer's own ``step`` skips the weight (its ``grad`` stays None)."""

    # bf16 ranges: half the bytes, and Adam divides them by sqrt(v), so their 8 bits of precision
    # carry into the update.
    dtype = torch.bfloat16

    def __init__(self, optimizer: CompactAdam, param: torch.Tensor) -> None:
        optimizer._locate(param)  # fails now, not in the middle of a backward
        self.optimizer = optimizer
        self.param = param
        self._state: tuple[AdamStep, torch.Tensor, torch.Tensor] | None = None

    def open(self) -> None:
        self._state = self.optimizer.begin_step(self.param)

    def take(self, start: int, stop: int, grad: torch.Tensor) -> None:
        step, exp_avg, exp_avg_sq = self._state
        rows = slice(start, stop)
        apply_adam_(self.param[rows], grad, exp_avg[rows], exp_avg_sq[rows], step,
                    offset=start * self.param.shape[1])

    def take_fused(self, grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor,
                   grad_bias: torch.Tensor | None, blocks: Blocks) -> None:
        from xmlsparse.ops.adam_kernels import grad_weight_adam_

        step, exp_avg, exp_avg_sq = self._state
        grad_weight_adam_(grad_out, h_t, indices, self.param, exp_avg, exp_avg_sq, grad_bias, step, blocks)
