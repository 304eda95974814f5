import math

import pytest
import torch

from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.sparse_linear import FixedFanInLinear, redraw_distinct, sample_distinct_indices
from xmlsparse.ops.fixed_fanin import reference


def has_repeats(indices: torch.Tensor) -> bool:
    ordered = indices.sort(dim=1).values
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


@pytest.mark.parametrize("n_inputs, k", [(50, 7), (50, 49), (50, 50), (1000, 1), (7, 7), (129, 72)])
def test_sampled_indices_are_distinct_and_in_range(n_inputs, k):
    gen = torch.Generator().manual_seed(0)
    indices = sample_distinct_indices(333, n_inputs, k, generator=gen)
    assert indices.dtype == torch.int32 and indices.shape == (333, k)
    assert int(indices.min()) >= 0 and int(indices.max()) < n_inputs
    assert not has_repeats(indices)


def test_sampling_is_uniform_over_inputs():
    # 20000 rows x 5 of 40 inputs: every input expected 2500 times; 5 sigma is about 240.
    indices = sample_distinct_indices(20000, 40, 5, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(indices.reshape(-1).long(), minlength=40).double()
    assert (counts - 2500).abs().max() < 250
    # Dense regime (ranking path) too.
    indices = sample_distinct_indices(20000, 40, 30, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(indices.reshape(-1).long(), minlength=40).double()
    assert (counts - 15000).abs().max() < 500


def test_sampling_is_chunked_and_seeded():
    # Rows per chunk not dividing 333.
    first = sample_distinct_indices(333, 500, 9, generator=torch.Generator().manual_seed(3), chunk_elements=37)
    again = sample_distinct_indices(333, 500, 9, generator=torch.Generator().manual_seed(3), chunk_elements=37)
    assert torch.equal(first, again)
    assert not has_repeats(first)
    dense = sample_distinct_indices(333, 20, 19, generator=torch.Generator().manual_seed(3), chunk_elements=37)
    assert not has_repeats(dense)


@pytest.mark.parametrize("n_inputs", [12, 1000])
def test_redraw_keeps_settled_slots_and_avoids_them(n_inputs):
    gen = torch.Generator().manual_seed(4)
    indices = sample_distinct_indices(200, n_inputs, 10, generator=gen)
    free = torch.rand(200, 10, generator=gen) < 0.3
    before = indices.clone()
    redraw_distinct(indices, free, n_inputs, gen)
    assert torch.equal(indices[~free], before[~free])
    assert not has_repeats(indices)
    assert int(indices.max()) < n_inputs


def test_sampling_rejects_too_large_fan_in():
    with pytest.raises(XMLSparseError, match="fan_in \\(11\\) must not exceed"):
        sample_distinct_indices(3, 10, 11)


def test_layer_shapes_buffers_and_state_dict():
    layer = FixedFanInLinear(50, 333, 7, generator=torch.Generator().manual_seed(0))
    assert layer.indices.dtype == torch.int32 and layer.indices.shape == (333, 7)
    assert "indices" in dict(layer.named_buffers())
    assert {name for name, _ in layer.named_parameters()} == {"weight", "bias"}
    assert not has_repeats(layer.indices)
    state = layer.state_dict()
    assert set(state) == {"indices", "weight", "bias"}
    other = FixedFanInLinear(50, 333, 7, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.indices, layer.indices)
    other.load_state_dict(state)
    assert torch.equal(other.indices, layer.indices) and torch.equal(other.weight, layer.weight)
    assert "fan_in=7" in repr(layer) and "in_features=50" in repr(layer)


def test_layer_is_seeded():
    a = FixedFanInLinear(40, 30, 5, generator=torch.Generator().manual_seed(9))
    b = FixedFanInLinear(40, 30, 5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@torch.no_grad()
def test_initialisation_matches_a_dense_layer_of_the_same_fan_in():
    layer = FixedFanInLinear(4096, 5000, 64, generator=torch.Generator().manual_seed(5))
    bound = 1 / math.sqrt(64)
    assert float(layer.weight.abs().max()) <= bound and float(layer.bias.abs().max()) <= bound
    assert abs(float(layer.weight.var()) - bound**2 / 3) < 0.02 * bound**2 / 3
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 5000)
    h = torch.randn(128, 4096)
    sparse_var = float((layer(h) - layer.bias).var())
    dense_var = float((dense(h[:, :64]) - dense.bias).var())
    assert abs(sparse_var / dense_var - 1) < 0.05


def test_forward_calls_the_op_and_backpropagates():
    layer = FixedFanInLinear(30, 45, 6, impl="reference", generator=torch.Generator().manual_seed(2))
    h = torch.randn(2, 4, 30, requires_grad=True)
    z = layer(h)
    assert z.shape == (2, 4, 45)
    expected = reference.forward(h.detach().reshape(8, 30), layer.indices, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(z.detach().reshape(8, 45), expected)
    z.square().sum().backward()
    assert h.grad.shape == h.shape and layer.weight.grad.shape == (45, 6) and layer.bias.grad.shape == (45,)


def test_bf16_layer_keeps_int32_indices():
    layer = FixedFanInLinear(30, 45, 6).to(torch.bfloat16)
    assert layer.indices.dtype == torch.int32 and layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(3, 30, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_features=10, out_features=5, fan_in=11), "fan_in \\(11\\) must not exceed in_features \\(10\\)"),
        (dict(in_features=10, out_features=0, fan_in=2), "out_features must be a positive integer"),
        (dict(in_features=10, out_features=5, fan_in=2, impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(XMLSparseError, match=message):
        FixedFanInLinear(**kwargs)


def test_wrong_input_width_is_named():
    with pytest.raises(ValueError, match="expected inputs with 30 features"):
        FixedFanInLinear(30, 5, 2)(torch.randn(2, 31))
