"""One Adam step with bfloat16 moments, as both of its forms take it: the step's scalars
(``AdamStep``) and the checks of the tensors it updates. The torch form and its dispatch are in
``xmlsparse.ops.adam``, the Triton kernel in ``xmlsparse.ops.adam_kernels``; both import this."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MOMENT_DTYPE = torch.bfloat16


@dataclass
class AdamStep:
    """One step's scalars for one parameter; ``seed`` picks the stochastic rounding bits."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    step: int
    seed: int

    @property
    def step_size(self) -> float:
        return self.lr / (1.0 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1.0 - self.beta2**self.step)


def check_state(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    """Raise ValueError unless the four tensors fit one update (shapes, device, dtypes, layout)."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.device != param.device or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, shaped {tuple(param.shape)} on {param.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if exp_avg.dtype != MOMENT_DTYPE or exp_avg_sq.dtype != MOMENT_DTYPE:
        raise ValueError(f"the moments must be {MOMENT_DTYPE}, got {exp_avg.dtype} and {exp_avg_sq.dtype}")
    if not param.is_contiguous() or param.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the parameter must be a contiguous float32 or bfloat16 tensor, got {param.dtype}")
