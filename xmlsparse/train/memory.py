"""What the GPU memory of a training run is spent on: the state of each part and one step's peaks.

``state_bytes`` counts the tensors that live through the run: each part's weights, the head's index
table and its by-input copy (built by the Triton backward), and the optimizer state of each part.
``StepMemory`` measures one step with ``torch.cuda.max_memory_allocated``: the bytes allocated
when it starts (that state plus the batch) and, for each phase, the peak above that start, so that
the logits, the loss buffers and the backward's temporaries show up as what they cost. It wraps the
step from outside (the step's loss function and the optimizer's step hooks mark the phases), so the
training step itself knows nothing of it. ``RunMemory`` is what a run reports: its peak, and the
measured phases and state of its second step.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from xmlsparse.nn.model import XMCModel
from xmlsparse.train.losses import LossFn

T = TypeVar("T")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes_by_part(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of per-parameter optimizer state, keyed by each group's ``name`` (the model part)."""
    by_part: dict[str, int] = {}
    for index, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{index}")
        states = (optimizer.state.get(p, {}) for p in group["params"])
        by_part[name] = by_part.get(name, 0) + sum(_tensor_bytes(s.values()) for s in states)
    return by_part


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state (Adam: two moments the size of the weights)."""
    return sum(optimizer_state_bytes_by_part(optimizer).values())


def state_bytes(model: XMCModel, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of what lives through the run, by part (``optimizer_<part>`` for optimizer state)."""
    report = {key: value for key, value in model.memory_report().items() if key != "total"}
    sparse = model.sparse_head
    report["head_by_input_index"] = 0 if sparse is None else sparse.by_input.nbytes
    for part, size in optimizer_state_bytes_by_part(optimizer).items():
        report[f"optimizer_{part}"] = size
    report["total"] = sum(report.values())
    return report


class StepMemory:
    """Peak CUDA memory of the phases of one step: ``start()``, then ``mark(phase)`` after each
    phase. Resets the device's peak counter, so ``run_peak()`` folds earlier peaks back in."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.report: dict[str, int] = {}
        self._earlier_peak = 0
        self._start = 0

    def _fold_peak(self) -> int:
        torch.cuda.synchronize(self.device)
        peak = int(torch.cuda.max_memory_allocated(self.device))
        self._earlier_peak = max(self._earlier_peak, peak)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def start(self) -> None:
        self._fold_peak()
        self._start = int(torch.cuda.memory_allocated(self.device))
        self.report = {"allocated_at_step_start": self._start}

    def note(self, name: str, tensor: torch.Tensor) -> None:
        """Record the bytes of a step tensor (the logits, say)."""
        self.report[f"{name}_bytes"] = tensor.numel() * tensor.element_size()

    def mark(self, phase: str) -> None:
        """Record the peak of the phase that just ended, above the step's start."""
        self.report[f"{phase}_peak_above_start"] = self._fold_peak() - self._start

    def run_peak(self) -> int:
        """The run's peak so far, across the resets."""
        torch.cuda.synchronize(self.device)
        return max(self._earlier_peak, int(torch.cuda.max_memory_allocated(self.device)))

    def measure(self, step: Callable[[LossFn], T], loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> T:
        """Run ``step`` (one training step, given the loss function it is to use) measured phase by
        phase: ``forward_and_loss`` ends when ``loss_fn`` returns (the logits' bytes are noted then),
        ``backward`` when ``optimizer.step`` begins and ``optimizer`` when it returns (the gradients
        zeroed after it only free memory, so the phase's peak is the same)."""

        def measured_loss(logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(logits, y_indices, y_ptr)
            self.note("logits", logits)
            self.mark("forward_and_loss")
            return loss

        hooks = [
            optimizer.register_step_pre_hook(lambda *_: self.mark("backward")),
            optimizer.register_step_post_hook(lambda *_: self.mark("optimizer")),
        ]
        self.start()
        try:
            return step(measured_loss)
        finally:
            for hook in hooks:
                hook.remove()


class RunMemory:
    """The memory a run reports: its peak (``metrics.jsonl`` and ``final.json``) and ``final.json``'s
    ``memory``, the state by part and, on CUDA, the phases of the run's second step (the first has
    made the optimizer state), measured by ``StepMemory`` around that step."""

    MEASURED_STEP = 1  # optimizer steps counted from 0, as the trainer's ``step``

    def __init__(self, device: torch.device, model: XMCModel, optimizer: torch.optim.Optimizer) -> None:
        self.device = device
        self.model = model
        self.optimizer = optimizer
        self.step_memory = StepMemory(device)
        # State by part when the measured step ran (evaluation frees the by-input index later on).
        self.step_state: dict[str, int] | None = None

    def around_step(self, number: int, step: Callable[[LossFn], torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """Run the run's step ``number``, ``step(loss_fn)``, measuring it when it is the measured one."""
        if number != self.MEASURED_STEP or self.device.type != "cuda":
            return step(loss_fn)
        loss = self.step_memory.measure(step, loss_fn, self.optimizer)
        self.step_state = state_bytes(self.model, self.optimizer)
        return loss

    def peak_bytes(self) -> int:
        """The run's peak memory so far: allocated on CUDA, else the process's resident set."""
        if self.device.type == "cuda":
            return self.step_memory.run_peak()
        # ru_maxrss is in KiB on Linux.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def report(self) -> dict[str, Any]:
        """``final.json``'s ``memory``: the state by part (at the measured step, else now), the
        optimizer's state and the measured step's phases (empty when none was measured)."""
        return {
            **(self.step_state or state_bytes(self.model, self.optimizer)),
            "optimizer_state": optimizer_state_bytes(self.optimizer),
            "step": self.step_memory.report,
        }


def estimated_step_peak(
    model: XMCModel, moments: str, batch_size: int, n_labels: int, precision: str, averaged: bool = False,
) -> dict[str, int]:
    """Bytes a training step is expected to hold at its peak, known before any step runs: the model
    (weights and index tables), the weights' gradients, Adam's two moments per weight (4 bytes each
    as ``float32``, 2 as ``bfloat16``), one batch's logits (2 bytes each under ``bf16``, else 4) and,
    with ``averaged``, a copy of the weights for their average (``train.average``); ``total`` adds
    them. Activations below the head and the backward's temporaries are left out, so the peak that
    ``StepMemory`` measures is somewhat higher."""
    weights = [p for p in model.parameters() if p.requires_grad]
    gradients = _tensor_bytes(weights)
    sparse = model.sparse_head
    if sparse is not None and sparse.grad_weight_sink is not None:
        # The head takes its optimizer step inside the backward and never holds its whole gradient.
        gradients -= _tensor_bytes([sparse.weight])
    report = {
        "model": model.memory_report()["total"],
        "gradients": gradients,
        "optimizer_state": 2 * (4 if moments == "float32" else 2) * sum(p.numel() for p in weights),
        "logits": batch_size * n_labels * (2 if precision == "bf16" else 4),
        "parameter_average": _tensor_bytes(list(model.parameters())) if averaged else 0,
    }
    report["total"] = sum(report.values())
    return report
