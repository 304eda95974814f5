"""The exponential moving average of the parameters (``train.average``): the average itself, its
restart at rewired slots, and a run that validates, keeps in best.pt, resumes and tests it."""

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.config import AverageConfig, RewireConfig, config_from_dict, load_config
from xmlsparse.errors import XMLSparseError
from xmlsparse.evaluate import evaluate
from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.train.averaging import WeightAverage
from xmlsparse.train.checkpoint import load_checkpoint
from xmlsparse.train.rewiring import Rewirer
from xmlsparse.train.trainer import resume_run, start_run

from tiny_runs import tiny_config


def small_model(seed: int = 0) -> nn.Module:
    """Parameters of two layers and the buffers of a batch norm, in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@torch.no_grad()
def move(model: nn.Module, generator: torch.Generator) -> None:
    """A stand-in for an optimizer step: every parameter changes in place."""
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def averaged_by_hand(model: nn.Module, decay: float, steps: int, seed: int = 1) -> tuple[WeightAverage, dict]:
    """``steps`` updates of a WeightAverage of ``model`` with the parameters moved before each, and
    the float64 reference: avg <- d_t * avg + (1 - d_t) * param, d_t = min(decay, (1 + t) / (10 + t))."""
    average = WeightAverage(model, decay)
    reference = params_of(model)
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        move(model, generator)
        d = min(decay, (1 + t) / (10 + t))
        assert average.current_decay() == pytest.approx(d, abs=0, rel=1e-15)
        average.update()
        for name, param in model.named_parameters():
            reference[name] = d * reference[name] + (1 - d) * param.detach()
    return average, reference


def averages_of(average: WeightAverage) -> dict[str, torch.Tensor]:
    return dict(zip(average.names, average.averages))


# -- WeightAverage ---------------------------------------------------------------------------


def test_updates_follow_the_warm_up_decay_by_hand():
    model = small_model()
    # With decay 0.3 the first three updates use the warm-up (0.1, 2/11, 0.25), then 0.3.
    average, reference = averaged_by_hand(model, 0.3, steps=6)
    assert average.updates == 6
    assert average.current_decay() == 0.3
    got = averages_of(average)
    assert set(got) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for name, expected in reference.items():
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], expected, rtol=1e-13, atol=1e-13)
        # Not simply the current weights nor the initial ones.
        assert not torch.allclose(got[name], dict(model.named_parameters())[name].detach())


def test_warm_up_then_the_configured_decay():
    average = WeightAverage(small_model(), 0.999)
    decays = []
    for _ in range(5):
        decays.append(average.current_decay())
        average.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14], rel=1e-15)
    average.updates = 10_000
    assert average.current_decay() == 0.999


def test_applied_swaps_the_averages_in_and_restores_the_trained_values():
    model = small_model()
    average, _ = averaged_by_hand(model, 0.5, steps=4)
    trained = params_of(model)
    stored = {name: avg.clone() for name, avg in averages_of(average).items()}
    tensors = [param for param in model.parameters()]
    pointers = [param.data_ptr() for param in tensors]

    with average.applied():
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), stored[name]), name
        # Evaluation inside the block sees the average.
        x = torch.randn(5, 3, dtype=torch.float64)
        model.eval()
        inside = model(x)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    for name, avg in averages_of(average).items():
        assert torch.equal(avg, stored[name]), name
    # In place: the same tensors (an optimizer's references stay valid).
    assert [param for param in model.parameters()] == tensors
    assert [param.data_ptr() for param in model.parameters()] == pointers
    assert not torch.allclose(inside, model(x))

    with pytest.raises(RuntimeError, match="inside the block"):
        with average.applied():
            assert torch.equal(model[0].weight.detach(), stored["0.weight"])
            raise RuntimeError("inside the block")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    for name, avg in averages_of(average).items():
        assert torch.equal(avg, stored[name]), name


def test_model_state_holds_the_averages_and_the_live_buffers():
    model = small_model()
    average, reference = averaged_by_hand(model, 0.5, steps=3)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        model[1].num_batches_tracked.fill_(7)
    state = average.model_state(model)
    assert list(state) == list(model.state_dict())
    for name, expected in reference.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-13, atol=1e-13)
        assert not torch.equal(state[name], dict(model.named_parameters())[name].detach())
    for name, buffer in model.named_buffers():
        assert torch.equal(state[name], buffer), name
    assert state["1.running_mean"].tolist() == [1.0, 2.0, 3.0, 4.0] and int(state["1.num_batches_tracked"]) == 7
    # The state loads into a model of the same shape, which then computes with the averages.
    other = small_model(seed=5)
    other.load_state_dict(state)
    model.eval()
    other.eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    with average.applied():
        assert torch.equal(other(x), model(x))


def test_state_dict_round_trips_into_a_fresh_average():
    model = small_model()
    average, _ = averaged_by_hand(model, 0.9, steps=5)
    buffer = io.BytesIO()
    torch.save(average.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved["updates"] == 5 and set(saved["averages"]) == set(average.names)

    twin = copy.deepcopy(model)
    fresh = WeightAverage(twin, 0.9)
    assert fresh.updates == 0
    fresh.load_state_dict(saved)
    assert fresh.updates == 5
    for name in average.names:
        assert torch.equal(averages_of(fresh)[name], averages_of(average)[name]), name
    # Both go on alike: the same decay (the update count came back) on the same parameters.
    generator_a, generator_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        move(model, generator_a)
        move(twin, generator_b)
        assert fresh.current_decay() == average.current_decay()
        average.update()
        fresh.update()
    for name in average.names:
        assert torch.equal(averages_of(fresh)[name], averages_of(average)[name]), name


def test_loading_a_state_without_a_parameter_names_it():
    model = small_model()
    average, _ = averaged_by_hand(model, 0.9, steps=2)
    state = average.state_dict()
    lacking = {"updates": state["updates"],
               "averages": {name: avg.clone() for name, avg in state["averages"].items() if name != "0.bias"}}
    fresh = WeightAverage(copy.deepcopy(model), 0.9)
    before = {name: avg.clone() for name, avg in averages_of(fresh).items()}
    with pytest.raises(KeyError, match=r"0\.bias"):
        fresh.load_state_dict(lacking)
    assert fresh.updates == 0  # nothing was loaded
    for name, avg in averages_of(fresh).items():
        assert torch.equal(avg, before[name]), name


def test_restart_slots_takes_the_current_value_only_where_masked():
    model = small_model()
    average, _ = averaged_by_hand(model, 0.5, steps=3)
    before = {name: avg.clone() for name, avg in averages_of(average).items()}
    weight = model[0].weight
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = mask[3, 2] = True
    average.restart_slots(weight, mask)
    after = averages_of(average)
    assert torch.equal(after["0.weight"][mask], weight.detach()[mask])
    assert torch.equal(after["0.weight"][~mask], before["0.weight"][~mask])
    assert not torch.equal(before["0.weight"][mask], weight.detach()[mask])  # it really changed
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name]), name


def test_the_config_section():
    model = {"head": {"fan_in": 8}}
    assert config_from_dict({"data": {"dataset": "d"}, "model": model}).train.average is None
    config = config_from_dict({"data": {"dataset": "d"}, "model": model, "train": {"average": {"decay": 0.9}}})
    assert config.train.average == AverageConfig(decay=0.9)
    with pytest.raises(XMLSparseError, match="train.average.decay"):
        config_from_dict({"data": {"dataset": "d"}, "model": model, "train": {"average": {"decay": 1.0}}})


# -- rewiring --------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("new_weights", ["zero", "random"])
def test_rewiring_restarts_the_average_at_the_rewired_slots(new_weights, group_size):
    n_inputs, n_labels, fan_in = 50, 40, 7
    layer = FixedFanInLinear(n_inputs, n_labels, fan_in, generator=torch.Generator().manual_seed(0),
                             group_size=group_size)
    holder = nn.Sequential(nn.Linear(5, n_inputs), layer)
    average = WeightAverage(holder, 0.9)
    # The weights move away from their averages (by more than the pruned magnitudes: none is zero).
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in holder.parameters():
            param.add_(0.5 + torch.rand(param.shape, generator=generator))
    before = {name: avg.clone() for name, avg in averages_of(average).items()}
    weight_before, indices_before = layer.weight.detach().clone(), layer.indices.clone()

    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.2, new_weights=new_weights), total_steps=10, seed=4)
    fraction = rewirer.rewire(layer, None, average)
    n_rows = -(-n_labels // group_size)  # the share is of the index table's slots
    assert fraction == pytest.approx(0.2, abs=1 / (n_rows * fan_in))

    weight = layer.weight.detach()
    # The rewired slots, by label: their weights were reset (to zero, or to a fresh draw).
    rewired = weight == 0 if new_weights == "zero" else weight != weight_before
    assert rewired.any() and not rewired.all()
    assert torch.equal(weight[~rewired], weight_before[~rewired])
    changed = (layer.indices != indices_before).repeat_interleave(group_size, dim=0)[:n_labels]
    assert changed.any()
    assert not (changed & ~rewired).any()  # every slot with a new input was rewired

    after = averages_of(average)
    head = "1.weight"
    assert torch.equal(after[head][rewired], weight[rewired])
    assert torch.equal(after[head][changed], weight[changed])
    if new_weights == "zero":
        assert torch.all(after[head][changed] == 0)
    assert torch.equal(after[head][~rewired], before[head][~rewired])
    assert not torch.equal(after[head][~rewired], weight[~rewired])  # the kept slots keep their average
    for name in ("0.weight", "0.bias", "1.bias"):
        assert torch.equal(after[name], before[name]), name


# -- a run with train.average ------------------------------------------------------------------


AVERAGE = {"decay": 0.9}


@pytest.fixture(scope="module")
def whole_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted three-epoch run with the average: its directory and final.json."""
    folder = tmp_path_factory.mktemp("whole")
    run = folder / "run"
    trainer = start_run(load_config(tiny_config(folder, tiny_data, average=AVERAGE)), run)
    assert trainer.average is not None and trainer.average.decay == 0.9
    return run, trainer.fit()


def test_a_run_validates_keeps_and_tests_the_average(whole_run):
    run, final = whole_run
    assert json.loads((run / "final.json").read_text())["test"] == final["test"]
    assert final["test"]["P@1"] > 0.2
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 3
    assert last["average"]["updates"] == last["step"] > 0
    averages = last["average"]["averages"]
    names = list(averages)
    # One average per parameter of the model (the head's weight and bias among them), none for buffers.
    assert len(names) >= 4 and set(names) <= set(last["model"])
    assert "head.weight" in names and "head.bias" in names and "head.indices" not in names
    assert set(best["model"]) == set(last["model"])
    # best.pt holds averaged weights, not the trained ones of its epoch or of the end.
    assert any(not torch.equal(best["model"][name], last["model"][name]) for name in names)
    if best["epoch"] == last["epoch"]:
        for name in names:
            assert torch.equal(best["model"][name], averages[name]), name
            assert not torch.equal(best["model"][name], last["model"][name]), name
        for name, tensor in last["model"].items():
            if name not in averages:  # buffers (the head's indices) as they are
                assert torch.equal(best["model"][name], tensor), name

    # `xmlsparse eval RUN_DIR` reads best.pt: the averaged model's test metrics.
    out = run.parent / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(run), "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    for key in ("P@1", "P@3", "nDCG@5"):
        assert measured[key] == pytest.approx(final["test"][key])


def test_a_run_split_after_one_epoch_ends_like_the_uninterrupted_one(tmp_path, tiny_data, whole_run):
    whole_dir, whole = whole_run
    run = tmp_path / "split"
    config = tiny_config(tmp_path, tiny_data, average=AVERAGE, checkpoint={"background": False})
    split = start_run(load_config(config), run)
    assert split._train_epoch()
    trained = params_of(split.model)
    averaged = {name: avg.clone() for name, avg in averages_of(split.average).items()}
    split._end_epoch()
    # Validation ran on the average and left the trained weights as they were.
    for name, param in split.model.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    data, cfg = split.data, split.config
    with split.average.applied():
        val = evaluate(split.model, data.train, cfg.eval.k, cfg.train.eval_batch_size, split.device,
                       split.precision, data.inv_propensity, points=data.val_rows)
    assert {key: split.last_record[f"val_{key}"] for key in val} == val
    # best.pt of epoch 1 holds the average of that moment, not the trained weights.
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == 1 and best["best_score"] == val["P@3"]
    for name in averaged:
        assert torch.equal(best["model"][name], averaged[name]), name
    assert any(not torch.equal(best["model"][name], trained[name]) for name in averaged)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["average"]["updates"] == split.step == last["step"]
    steps_after_one_epoch = split.step
    del split

    resumed = resume_run(run)
    assert resumed.average.updates == steps_after_one_epoch
    for name, avg in averages_of(resumed.average).items():
        assert torch.equal(avg, averaged[name]), name
    final = resumed.fit()
    assert final["test"] == whole["test"]
    assert final["best_validation"] == whole["best_validation"]
    for name in ("best.pt", "last.pt"):
        expected, got = (load_checkpoint(r / "checkpoints" / name) for r in (whole_dir, run))
        assert got["epoch"] == expected["epoch"]
        for key, tensor in expected["model"].items():
            assert torch.equal(got["model"][key], tensor), (name, key)
    expected, got = (load_checkpoint(r / "checkpoints" / "last.pt")["average"] for r in (whole_dir, run))
    assert got["updates"] == expected["updates"]
    for key, tensor in expected["averages"].items():
        assert torch.equal(got["averages"][key], tensor), key


def test_finish_tests_best_pt_as_saved_and_without_it_the_average(tmp_path, tiny_data):
    """best.pt of epoch 1 while the average has moved on (a second epoch trained, not validated):
    the test scores best.pt's weights as they are; with no best.pt, it scores the current average."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, tiny_data, average=AVERAGE, checkpoint={"background": False})
    trainer = start_run(load_config(config), run)
    assert trainer._train_epoch()
    trainer._end_epoch()
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == 1
    assert trainer._train_epoch()
    data, cfg = trainer.data, trainer.config

    def test_metrics(model: nn.Module) -> dict[str, float]:
        return evaluate(model, data.test, cfg.eval.k, cfg.train.eval_batch_size, trainer.device, trainer.precision,
                        data.inv_propensity)

    with trainer.average.applied():
        current_average = test_metrics(trainer.model)
    saved = copy.deepcopy(trainer.model)
    saved.load_state_dict(best["model"])
    of_best = test_metrics(saved)
    assert of_best != current_average  # the two candidates are told apart

    # First without best.pt (moved aside): the test runs on the average, and the trained weights
    # are back after it.
    best_path = run / "checkpoints" / "best.pt"
    aside = tmp_path / "best.pt"
    best_path.rename(aside)
    trained = params_of(trainer.model)
    final = trainer.finish()
    for key in ("P@1", "P@3", "P@5", "nDCG@5"):
        assert final["test"][key] == pytest.approx(current_average[key]), key
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
    # Then with it: best.pt's weights as saved (already averaged; no second average on top).
    aside.rename(best_path)
    (run / "final.json").unlink()
    final = trainer.finish()
    for key in ("P@1", "P@3", "P@5", "nDCG@5"):
        assert final["test"][key] == pytest.approx(of_best[key]), key
