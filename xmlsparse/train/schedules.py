"""Learning-rate schedules: reduce-on-plateau on a validation metric (the paper), cosine with warmup."""

from __future__ import annotations

import math

import torch

from xmlsparse.config import ScheduleConfig


class Schedule:
    """One interface over torch's schedulers: ``after_step()`` each optimizer step,
    ``after_epoch(metrics)`` after each validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int) -> None:
        self.config = config
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
        if config.type == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=config.factor, patience=config.patience, min_lr=config.min_lr
            )
        elif config.type == "cosine":
            warmup = max(0, config.warmup_steps)
            base_lrs = [group["lr"] for group in optimizer.param_groups]

            def factor(step: int, base: float) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
                floor = config.min_lr / base if base > 0 else 0.0
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [lambda step, base=base: factor(step, base) for base in base_lrs]
            )
        else:
            self.scheduler = None

    def after_step(self) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics[self.config.metric])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)
