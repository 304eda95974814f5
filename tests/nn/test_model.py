import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from xmlsparse.config import ACTIVATION_NAMES, CHOICES, Config, DataConfig, ModelConfig, config_from_dict, config_to_dict
from xmlsparse.data.batches import BatchIterator
from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.encoders import ACTIVATIONS, BowEncoder, DenseEncoder, make_activation
from xmlsparse.nn.model import XMCModel, build_model
from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.ops import IMPLS

N_POINTS, N_FEATURES, DENSE_DIM, N_LABELS = 6, 30, 12, 17


def split():
    rng = np.random.default_rng(0)
    X = sp.random(N_POINTS, N_FEATURES, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    Y = sp.random(N_POINTS, N_LABELS, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    dense = rng.standard_normal((N_POINTS, DENSE_DIM)).astype(np.float32)
    return X, dense, Y


def one_batch(kind):
    X, dense, Y = split()
    return next(iter(BatchIterator(X if kind == "bow" else dense, Y, batch_size=N_POINTS, shuffle=False)))


def section(encoder=None, intermediate=None, head=None):
    """A ``model:`` section as a config file writes it (no intermediate layer unless given)."""
    return {"encoder": encoder or {}, "intermediate": intermediate, "head": head or {}}


def model_config(values: dict, kind: str = "dense") -> ModelConfig:
    """The typed ``model`` section of ``values``, validated as a config file's is."""
    return config_from_dict({"data": {"dataset": "d", "features": kind}, "model": values}).model


def config(encoder=None, intermediate=None, head=None, kind="dense") -> ModelConfig:
    return model_config(section(encoder, intermediate, head), kind)


HEADS = {
    "fixed-fanin": {"type": "fixed-fanin", "fan_in": 5},
    "dense": {"type": "dense"},
    "bottleneck": {"type": "bottleneck", "rank": 4, "activation": "tanh"},
}


@pytest.mark.parametrize("kind", ["bow", "dense"])
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("intermediate", [None, {"size": 20, "activation": "gelu"}])
def test_every_encoder_and_head_gives_logits_of_the_right_shape(kind, head, intermediate):
    n_features = N_FEATURES if kind == "bow" else DENSE_DIM
    cfg = config({"type": kind, "dim": 8, "hidden": [9], "dropout": 0.1}, intermediate, HEADS[head], kind)
    model = build_model(cfg, n_features, N_LABELS, kind)
    batch = one_batch(kind)
    h = model.features(batch)
    assert h.shape == (N_POINTS, 20 if intermediate else 9)
    logits = model(batch)
    assert logits.shape == (N_POINTS, N_LABELS)
    torch.testing.assert_close(model.eval()(batch), model.head(model.features(batch)))
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_head_types_and_fan_in():
    model = build_model(config(head={"fan_in": 7}, intermediate={"size": 16}), DENSE_DIM, N_LABELS, "dense")
    assert isinstance(model.head, FixedFanInLinear)
    assert model.head.indices.shape == (N_LABELS, 7) and model.head.indices.dtype == torch.int32
    assert model.head.in_features == 16
    dense = build_model(config(head={"type": "dense"}), DENSE_DIM, N_LABELS, "dense")
    assert isinstance(dense.head, nn.Linear) and dense.intermediate is None
    bottleneck = build_model(config(head={"type": "bottleneck", "rank": 3}), DENSE_DIM, N_LABELS, "dense")
    assert [m.out_features for m in bottleneck.head if isinstance(m, nn.Linear)] == [3, N_LABELS]


def test_encoders_without_hidden_layers():
    batch = one_batch("dense")
    identity = DenseEncoder(DENSE_DIM, hidden=[], dropout=0.0)
    assert identity.out_dim == DENSE_DIM
    assert torch.equal(identity(batch), batch.x_dense)
    bow = BowEncoder(N_FEATURES, 8, hidden=[], activation="identity")
    bow_batch = one_batch("bow")
    X, _, _ = split()
    expected = torch.from_numpy(X.toarray()) @ bow.embedding.weight + bow.bias
    torch.testing.assert_close(bow(bow_batch), expected)


def test_a_saved_config_builds_the_same_model():
    # A run directory's config.yaml writes out every key, whatever the head type; read back, it
    # builds the model the run trained.
    cfg = config({"type": "bow", "dim": 8}, {"size": 32}, {"type": "dense"}, kind="bow")
    saved = config_from_dict(config_to_dict(Config(DataConfig("d"), cfg)))
    torch.manual_seed(0)
    model = build_model(cfg, N_FEATURES, N_LABELS, "bow")
    torch.manual_seed(0)
    reread = build_model(saved.model, N_FEATURES, N_LABELS, saved.data.features)
    assert isinstance(model.head, nn.Linear) and model.encoder.out_dim == 8
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reread.state_dict().values()))


def test_param_groups_cover_every_parameter_once():
    for intermediate in (None, {"size": 16}):
        cfg = config({"dim": 8, "hidden": [6]}, intermediate, {"fan_in": 4}, kind="bow")
        model = build_model(cfg, N_FEATURES, N_LABELS, "bow")
        lrs = {"encoder": 0.1, "intermediate": 0.2, "head": 0.3}
        groups = model.param_groups(lrs)
        assert [g["name"] for g in groups] == (["encoder", "head"] if intermediate is None else list(lrs))
        assert all(g["lr"] == lrs[g["name"]] for g in groups)
        grouped = [id(p) for g in groups for p in g["params"]]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {id(p) for p in model.parameters()}
        torch.optim.Adam(groups)  # accepted as they are
    with pytest.raises(XMLSparseError, match="head"):
        model.param_groups({"encoder": 0.1, "intermediate": 0.2})
    with pytest.raises(XMLSparseError, match="decoder"):
        model.param_groups({"encoder": 0.1, "intermediate": 0.2, "head": 0.3, "decoder": 1.0})


def test_memory_report_counts_each_part():
    model = build_model(config({"dim": 8}, {"size": 16}, {"fan_in": 5}, kind="bow"), N_FEATURES, N_LABELS, "bow")
    report = model.memory_report()
    assert report["encoder"] == (N_FEATURES * 8 + 8) * 4
    assert report["intermediate"] == (8 * 16 + 16) * 4
    assert report["head_params"] == (N_LABELS * 5 + N_LABELS) * 4
    assert report["head_indices"] == N_LABELS * 5 * 4
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
    dense = build_model(config(head={"type": "dense"}), DENSE_DIM, N_LABELS, "dense")
    assert dense.memory_report()["head_indices"] == 0 and dense.memory_report()["encoder"] == 0


def test_xmc_model_composes_given_parts():
    model = XMCModel(DenseEncoder(DENSE_DIM), None, nn.Linear(DENSE_DIM, 3))
    assert model(one_batch("dense")).shape == (N_POINTS, 3)


@pytest.mark.parametrize(
    "values, kind, message",
    [
        (section({"activation": "swish"}), "dense", r"model\.encoder\.activation = 'swish': expected one of relu, gelu"),
        (section(head={"type": "bottleneck", "activation": "nope"}), "dense", r"model\.head\.activation"),
        (section(intermediate={"size": 8, "activation": "nope"}), "dense", r"model\.intermediate\.activation"),
        (section({"type": "bow"}), "dense", r"model\.encoder\.type = 'bow' but data\.features = 'dense'"),
        (section({"type": "sparse"}), "sparse", r"data\.features"),
        (section(head={"type": "lowrank"}), "dense", r"model\.head\.type.*fixed-fanin, dense, bottleneck"),
        (section(head={"fan_in": 0}), "dense", r"model\.head\.fan_in = 0: out of range, expected a value >= 1"),
        (section(head={"fanin": 3}), "dense", r"model\.head\.fanin"),
        (section({"dropout": 1.5}), "dense", r"model\.encoder\.dropout"),
        (section({"hidden": [4, -1]}), "dense", r"model\.encoder\.hidden"),
        (section(intermediate={"size": 0}), "dense", r"model\.intermediate\.size"),
        (section(head={"impl": "cuda", "fan_in": 4}), "dense", r"model\.head\.impl"),
    ],
)
def test_bad_config_names_the_key(values, kind, message):
    with pytest.raises(XMLSparseError, match=message):
        model_config(values, kind)


def test_a_fan_in_wider_than_the_dense_features_is_refused_once_their_width_is_known():
    # Without hidden layers or an intermediate one the head reads the feature columns, which only
    # the data tells: the config loads, and building the model refuses it.
    cfg = config(head={"fan_in": 100})
    with pytest.raises(XMLSparseError, match=r"model\.head\.fan_in = 100 exceeds the 12 inputs the head reads"):
        build_model(cfg, DENSE_DIM, N_LABELS, "dense")
    assert build_model(cfg, 100, N_LABELS, "dense").head.indices.shape == (N_LABELS, 100)


def test_build_model_checks_the_encoder_against_the_features_it_is_given():
    with pytest.raises(XMLSparseError, match=r"model\.encoder\.type = 'dense' but data\.features = 'bow'"):
        build_model(config({"type": "dense"}, {"size": 16}, {"fan_in": 4}), N_FEATURES, N_LABELS, "bow")


def test_the_lists_of_choices_agree_with_what_they_name():
    assert list(ACTIVATIONS) == list(ACTIVATION_NAMES)
    assert all(CHOICES[f"model.{part}.activation"] == ACTIVATION_NAMES for part in ("encoder", "intermediate", "head"))
    assert CHOICES["model.head.impl"] == IMPLS


def test_make_activation():
    assert isinstance(make_activation("gelu"), nn.GELU)
    with pytest.raises(XMLSparseError, match=r"'swish'.*identity"):
        make_activation("swish")
