import copy
import math

import pytest
import torch

from xmlsparse.config import RewireConfig, config_from_dict
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.rewiring import Rewirer
from xmlsparse.nn.sparse_linear import FixedFanInLinear

L, K, D = 333, 7, 50


def has_repeats(indices: torch.Tensor) -> bool:
    ordered = indices.sort(dim=1).values
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


def train_steps(layer, optimizer, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        optimizer.zero_grad()
        h = torch.randn(8, layer.in_features, generator=gen)
        layer(h).square().mean().backward()
        optimizer.step()


def trained(n_inputs=D, fan_in=K, amsgrad=False, seed=0):
    layer = FixedFanInLinear(n_inputs, L, fan_in, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, amsgrad=amsgrad)
    train_steps(layer, optimizer, 3, seed)
    return layer, optimizer


def smallest_slots(weight, n):
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[weight.detach().abs().flatten().argsort()[:n]] = True
    return mask.view_as(weight)


@pytest.mark.parametrize("new_weights", ["zero", "random"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_one_round_changes_exactly_the_pruned_slots(new_weights, amsgrad):
    layer, optimizer = trained(amsgrad=amsgrad)
    before = copy.deepcopy(layer)
    state_before = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    bias_state_before = {k: v.clone() for k, v in optimizer.state[layer.bias].items()}
    n_prune = round(0.1 * L * K)
    pruned = smallest_slots(layer.weight, n_prune)

    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.1, new_weights=new_weights), total_steps=10, seed=1)
    assert rewirer.maybe_rewire(layer, optimizer, 1) == n_prune / (L * K)

    kept = ~pruned
    assert torch.equal(layer.indices[kept], before.indices[kept])
    assert torch.equal(layer.weight[kept], before.weight[kept])
    assert torch.equal(layer.bias, before.bias)
    assert layer.indices.shape == (L, K) and not has_repeats(layer.indices)
    assert (layer.indices[pruned] != before.indices[pruned]).float().mean() > 0.5  # mostly new inputs
    if new_weights == "zero":
        assert torch.all(layer.weight[pruned] == 0)
    else:
        values = layer.weight[pruned].detach()
        assert float(values.abs().max()) <= 1 / math.sqrt(K) and float(values.abs().min()) > 0
    moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    state = optimizer.state[layer.weight]
    for name in moments:
        assert torch.all(state[name][pruned] == 0), name
        assert torch.equal(state[name][kept], state_before[name][kept]), name
        assert bool((state_before[name][pruned] != 0).all()), name  # they were really reset
    assert torch.equal(state["step"], state_before["step"])
    for name, value in optimizer.state[layer.bias].items():
        assert torch.equal(value, bias_state_before[name])


def test_many_rounds_keep_fan_in_and_rows_free_of_repeats():
    layer, optimizer = trained()
    rewirer = Rewirer(RewireConfig(interval=2, fraction=0.2), total_steps=200, seed=3)
    fractions = []
    for step in range(1, 61):
        train_steps(layer, optimizer, 1, seed=step)
        result = rewirer.maybe_rewire(layer, optimizer, step)
        if result is not None:
            fractions.append(result)
            assert layer.indices.shape == (L, K) and layer.weight.shape == (L, K)
            assert not has_repeats(layer.indices)
            assert int(layer.indices.min()) >= 0 and int(layer.indices.max()) < D
    assert len(fractions) == 30 and rewirer.rounds == 30
    assert all(abs(f - 0.2) < 1 / (L * K) for f in fractions)


def test_schedule_respects_interval_and_stop():
    rewirer = Rewirer(RewireConfig(interval=10, fraction=0.1, stop=0.5), total_steps=100, seed=0)
    assert [s for s in range(0, 101) if rewirer.due(s)] == [10, 20, 30, 40]
    layer, optimizer = trained()
    before = layer.indices.clone()
    assert rewirer.maybe_rewire(layer, optimizer, 15) is None
    assert rewirer.maybe_rewire(layer, optimizer, 50) is None
    assert torch.equal(layer.indices, before) and rewirer.rounds == 0
    assert rewirer.maybe_rewire(layer, optimizer, 40) is not None


def test_threshold_with_decay():
    layer, optimizer = trained()
    rewirer = Rewirer(RewireConfig(interval=1, threshold=0.05, threshold_decay=0.5), total_steps=10, seed=0)
    expected = float((layer.weight.detach().abs() < 0.05).float().mean())
    assert rewirer.rewire(layer, optimizer) == pytest.approx(expected)
    assert rewirer.current_threshold() == pytest.approx(0.025)
    train_steps(layer, optimizer, 2)
    expected = float((layer.weight.detach().abs() < 0.025).float().mean())
    assert rewirer.rewire(layer, optimizer) == pytest.approx(expected)


def test_ties_at_the_cut_still_prune_the_requested_fraction():
    layer, optimizer = trained()
    with torch.no_grad():
        layer.weight.fill_(0.5)
    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.3), total_steps=10, seed=0)
    assert rewirer.rewire(layer, optimizer) == round(0.3 * L * K) / (L * K)
    assert int((layer.weight == 0).sum()) == round(0.3 * L * K)
    # Right after, the zeros are the smallest: pruning 0.3 again picks among them only.
    assert rewirer.rewire(layer, optimizer) == round(0.3 * L * K) / (L * K)
    assert int((layer.weight == 0).sum()) == round(0.3 * L * K)


def test_same_seed_same_rewiring_and_different_seed_differs():
    results = []
    for seed in (7, 7, 8):
        layer, optimizer = trained()
        rewirer = Rewirer(RewireConfig(interval=1, fraction=0.1, new_weights="random"), total_steps=100, seed=seed)
        for step in range(1, 4):
            rewirer.maybe_rewire(layer, optimizer, step)
        results.append((layer.indices.clone(), layer.weight.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])


def test_state_dict_round_trip_resumes_identically():
    layer, optimizer = trained()
    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.1), total_steps=100, seed=11)
    for step in range(1, 4):
        rewirer.maybe_rewire(layer, optimizer, step)
    saved = rewirer.state_dict()
    assert saved == {"seed": 11, "rounds": 3}
    layer_copy = copy.deepcopy(layer)
    optimizer_copy = torch.optim.Adam(layer_copy.parameters(), lr=1e-2)
    optimizer_copy.load_state_dict(optimizer.state_dict())

    resumed = Rewirer(RewireConfig(interval=1, fraction=0.1), total_steps=100, seed=0)
    resumed.load_state_dict(saved)
    for step in range(4, 7):
        rewirer.maybe_rewire(layer, optimizer, step)
        resumed.maybe_rewire(layer_copy, optimizer_copy, step)
    assert torch.equal(layer.indices, layer_copy.indices)
    assert torch.equal(layer.weight, layer_copy.weight)
    with pytest.raises(XMLSparseError, match="lacks rounds"):
        resumed.load_state_dict({"seed": 1})


def test_fan_in_one_below_inputs():
    layer, optimizer = trained(n_inputs=D, fan_in=D - 1)
    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.3), total_steps=100, seed=2)
    for _ in range(10):
        fraction = rewirer.rewire(layer, optimizer)
        assert fraction == round(0.3 * L * (D - 1)) / (L * (D - 1))
        assert not has_repeats(layer.indices)
        train_steps(layer, optimizer, 1)


def test_fan_in_equal_to_inputs_is_left_as_is():
    layer, optimizer = trained(n_inputs=D, fan_in=D)
    before = copy.deepcopy(layer)
    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.3), total_steps=100, seed=0)
    assert rewirer.maybe_rewire(layer, optimizer, 1) == 0.0
    assert torch.equal(layer.indices, before.indices) and torch.equal(layer.weight, before.weight)


def test_without_optimizer_and_indices_version_moves():
    layer = FixedFanInLinear(D, L, K)
    version = layer.indices._version  # caches of index-derived tables key on it
    assert Rewirer(RewireConfig(interval=1, fraction=0.5), total_steps=5, seed=0).rewire(layer, None) == round(0.5 * L * K) / (L * K)
    assert not has_repeats(layer.indices)
    assert layer.indices._version > version


def test_a_threshold_replaces_the_fraction():
    layer, optimizer = trained()
    # As config_from_dict gives it: the default fraction stays beside the threshold the config sets.
    section = config_from_dict({"data": {"dataset": "d"}, "model": {"rewire": {"interval": 1, "threshold": 0.05}}}).model.rewire
    assert section.fraction == 0.1
    expected = float((layer.weight.detach().abs() < 0.05).float().mean())
    assert Rewirer(section, total_steps=10, seed=0).rewire(layer, optimizer) == pytest.approx(expected)


def test_the_defaults_are_the_configs():
    rewirer = Rewirer(RewireConfig(), total_steps=10_000, seed=0)
    assert (rewirer.interval, rewirer.fraction, rewirer.stop) == (1000, 0.1, 0.66)
    assert [s for s in range(0, 10_001) if rewirer.due(s)] == [1000, 2000, 3000, 4000, 5000, 6000]


@pytest.mark.parametrize("total_steps", [0, 2.5, True])
def test_total_steps_must_be_a_positive_integer(total_steps):
    with pytest.raises(XMLSparseError, match="total_steps must be a positive integer"):
        Rewirer(RewireConfig(), total_steps=total_steps, seed=0)
