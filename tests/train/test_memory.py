"""The memory probe wraps the training step from outside: it marks each phase where the step ends
it, measures the run's second step only, and leaves the step as it would run unmeasured."""

from functools import partial

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlsparse.config import config_from_dict
from xmlsparse.data.batches import BatchIterator
from xmlsparse.nn.model import build_model
from xmlsparse.train.losses import squared_hinge_loss
from xmlsparse.train.memory import RunMemory, StepMemory
from xmlsparse.train.trainer import train_step

N_POINTS, N_FEATURES, N_LABELS = 8, 10, 13


def problem():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N_POINTS, N_FEATURES)).astype(np.float32)
    Y = sp.random(N_POINTS, N_LABELS, density=0.3, format="csr", dtype=np.float32, random_state=1)
    batch = next(iter(BatchIterator(X, Y, N_POINTS, shuffle=False)))
    values = {"data": {"dataset": "d", "features": "dense"}, "model": {"intermediate": {"size": 12}, "head": {"fan_in": 4}}}
    model = build_model(config_from_dict(values).model, N_FEATURES, N_LABELS, "dense")
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), batch


@pytest.fixture
def events(monkeypatch):
    """What the probe records, in order; the CUDA counters it would read are left out."""
    found = []
    monkeypatch.setattr(StepMemory, "start", lambda self: found.append("start"))
    monkeypatch.setattr(StepMemory, "note", lambda self, name, tensor: found.append(f"{name} {tuple(tensor.shape)}"))
    monkeypatch.setattr(StepMemory, "mark", lambda self, phase: found.append(phase))
    return found


def traced_loss(events):
    def loss(logits, y_indices, y_ptr):
        events.append("loss")
        return squared_hinge_loss(logits, y_indices, y_ptr)

    return loss


def test_a_measured_step_marks_each_phase_where_it_ends_and_steps_as_unmeasured(events):
    model, optimizer, batch = problem()
    step = partial(train_step, model, batch, optimizer=optimizer, device=torch.device("cpu"), precision="fp32")
    loss = StepMemory(torch.device("cpu")).measure(step, traced_loss(events), optimizer)
    assert events == ["start", "loss", f"logits {(N_POINTS, N_LABELS)}", "forward_and_loss", "backward", "optimizer"]
    assert all(p.grad is None for p in model.parameters())  # the step zeroed them, as unmeasured

    reference, reference_optimizer, _ = problem()
    reference_loss = train_step(reference, batch, squared_hinge_loss, reference_optimizer, torch.device("cpu"), "fp32")
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))

    events.clear()
    step(traced_loss(events))  # the optimizer's hooks went with the measured step
    assert events == ["loss"]


def test_the_run_measures_its_second_step_on_cuda_only(events):
    model, optimizer, batch = problem()
    step = partial(train_step, model, batch, optimizer=optimizer, device=torch.device("cpu"), precision="fp32")
    on_cpu = RunMemory(torch.device("cpu"), model, optimizer)
    for number in range(3):
        on_cpu.around_step(number, step, squared_hinge_loss)
    assert events == [] and on_cpu.report()["step"] == {}

    # A CUDA run (its counters stubbed by ``events``): step 1 only, with the state at that step.
    run = RunMemory(torch.device("cuda"), model, optimizer)
    for number in range(3):
        run.around_step(number, step, squared_hinge_loss)
    assert events.count("start") == 1 and events[-1] == "optimizer"
    assert run.step_state is not None and run.report()["total"] == run.step_state["total"]
    assert set(run.report()) == {*run.step_state, "optimizer_state", "step"}
