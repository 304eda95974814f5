"""A fixed fan-in head whose labels form groups of G sharing one row of inputs: the layer against
the reference op, evaluation's label blocks, rewiring per group, and a training run."""

import pytest
import torch
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.config import RewireConfig, config_from_dict
from xmlsparse.data.batches import Batch
from xmlsparse.nn.model import build_model
from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.ops.fixed_fanin import reference
from xmlsparse.train.compact_adam import CompactAdam
from xmlsparse.train.rewiring import Rewirer, group_magnitudes


def grouped_layer(n_labels=45, group=4, n_inputs=23, fan_in=5, seed=0):
    return FixedFanInLinear(n_inputs, n_labels, fan_in, impl="reference", group_size=group,
                            generator=torch.Generator().manual_seed(seed))


def test_the_layer_reads_one_row_per_group():
    layer = grouped_layer()
    assert tuple(layer.indices.shape) == (12, 5) and tuple(layer.weight.shape) == (45, 5)
    rows = layer.indices.sort(dim=1).values
    assert bool((rows[:, 1:] != rows[:, :-1]).all())  # distinct inputs within each row
    h = torch.randn(6, 23)
    expanded = layer.indices.repeat_interleave(4, dim=0)[:45]
    want = reference.forward(h, expanded, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(layer(h), want)
    torch.testing.assert_close(layer.logits(h, 8, 20), want[:, 8:20])
    with pytest.raises(ValueError, match="no multiple of 4"):
        layer.logits(h, 6, 20)
    assert "group_size=4" in repr(layer)


def test_label_blocks_of_a_grouped_model_cover_every_label_once():
    config = config_from_dict({"data": {"dataset": "unused", "features": "dense"},
                               "model": {"intermediate": {"size": 16}, "head": {"fan_in": 5, "group_size": 4}}})
    model = build_model(config.model, 10, 45, "dense", impl="reference").eval()
    batch = Batch(x_dense=torch.randn(3, 10), y_indices=torch.zeros(0, dtype=torch.long),
                  y_ptr=torch.zeros(4, dtype=torch.long))
    whole = model(batch)
    blocks = list(model.label_blocks(batch, block=7))  # rounded down to a multiple of 4
    assert [start for start, _ in blocks] == list(range(0, 45, 4))
    torch.testing.assert_close(torch.cat([logits for _, logits in blocks], dim=1), whole)


@pytest.mark.parametrize("chunk_slots", [1, 4, 1 << 22], ids=["group-by-group", "two-groups", "one-piece"])
def test_group_magnitudes_average_over_each_groups_labels(chunk_slots):
    weight = torch.arange(10.0).view(5, 2) - 4  # rows [-4,-3] [-2,-1] [0,1] [2,3] [4,5]
    scores = group_magnitudes(weight, 2, chunk_slots)
    torch.testing.assert_close(scores, torch.tensor([[3.0, 2.0], [1.0, 2.0], [4.0, 5.0]]))
    assert weight.min() == -4  # the weights are read, not changed


@pytest.mark.parametrize("new_weights", ["zero", "random"])
def test_rewiring_prunes_and_regrows_whole_group_slots(new_weights):
    layer = grouped_layer(n_labels=45, group=4, n_inputs=40, fan_in=6)
    optimizer = CompactAdam(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 40)).sum().backward()
    optimizer.step()
    before_indices, before_weight = layer.indices.clone(), layer.weight.detach().clone()
    rewirer = Rewirer(RewireConfig(interval=1, fraction=0.25, new_weights=new_weights), total_steps=10, seed=3)
    share = rewirer.rewire(layer, optimizer)
    assert share == pytest.approx(round(0.25 * 12 * 6) / (12 * 6))
    rows = layer.indices.sort(dim=1).values
    assert bool((rows[:, 1:] != rows[:, :-1]).all())
    changed_weight = (layer.weight.detach() != before_weight)
    # A weight changes only at a pruned group slot, and then (zero) for every label of the group.
    pruned_groups = changed_weight.view(-1).new_zeros(12, 6)
    for label in range(45):
        pruned_groups[label // 4] |= changed_weight[label]
    state = optimizer.state[layer.weight]
    by_label = pruned_groups.repeat_interleave(4, dim=0)[:45]
    assert bool((state["exp_avg"][by_label] == 0).all()) and bool((state["exp_avg"][~by_label] != 0).any())
    if new_weights == "zero":
        assert bool((layer.weight.detach()[by_label] == 0).all())
    assert bool((layer.indices != before_indices).any())


def test_a_grouped_head_trains_and_evaluates(train_tiny_run):
    run, _ = train_tiny_run("model.head.group_size=8", "train.optimizer.moments=bfloat16",
                            "train.optimizer.head_update_in_backward=true")
    result = CliRunner().invoke(app, ["eval", str(run), "--buckets", "0"])
    assert result.exit_code == 0, result.output
    assert "P " in result.output
