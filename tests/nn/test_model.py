import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from xmlsparse.data.batches import BatchIterator
from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.encoders import BowEncoder, DenseEncoder, make_activation
from xmlsparse.nn.model import XMCModel, build_model
from xmlsparse.nn.sparse_linear import FixedFanInLinear

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


def config(encoder=None, intermediate=None, head=None):
    return {"encoder": encoder or {}, "intermediate": intermediate, "head": head or {}}


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
    cfg = config({"type": kind, "dim": 8, "hidden": [9], "dropout": 0.1}, intermediate, HEADS[head])
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


def test_full_config_section_as_the_schema_writes_it():
    cfg = {
        "encoder": {"type": "bow", "dim": 8, "hidden": [], "dropout": 0.0, "activation": "relu"},
        "intermediate": {"size": 32, "activation": "relu"},
        "head": {"type": "dense", "fan_in": 64, "rank": 64, "activation": "relu", "impl": "auto"},
        "rewire": {"interval": 1000, "fraction": 0.1},
    }
    model = build_model(cfg, N_FEATURES, N_LABELS, "bow")
    assert isinstance(model.head, nn.Linear) and model.encoder.out_dim == 8


def test_param_groups_cover_every_parameter_once():
    for intermediate in (None, {"size": 16}):
        cfg = config({"dim": 8, "hidden": [6]}, intermediate, {"fan_in": 4})
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
    model = build_model(config({"dim": 8}, {"size": 16}, {"fan_in": 5}), N_FEATURES, N_LABELS, "bow")
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
    "cfg, kind, message",
    [
        (config({"activation": "swish"}), "dense", r"model\.encoder\.activation.*'swish'.*relu, gelu"),
        (config(head={"type": "bottleneck", "activation": "nope"}), "dense", r"model\.head\.activation"),
        (config(intermediate={"size": 8, "activation": "nope"}), "dense", r"model\.intermediate\.activation"),
        (config({"type": "bow"}), "dense", r"model\.encoder\.type is 'bow'.*'dense'"),
        (config({"type": "sparse"}), "sparse", r"data\.features"),
        (config(head={"type": "lowrank"}), "dense", r"model\.head\.type.*fixed-fanin, dense, bottleneck"),
        (config(head={"fan_in": 100}), "dense", r"model\.head\.fan_in = 100 exceeds the 12 inputs"),
        (config(head={"fan_in": 0}), "dense", r"model\.head\.fan_in must be a positive integer"),
        (config(head={"fanin": 3}), "dense", r"model\.head\.fanin"),
        (config({"dropout": 1.5}), "dense", r"model\.encoder\.dropout"),
        (config({"hidden": [4, -1]}), "dense", r"model\.encoder\.hidden"),
        (config(intermediate={"size": 0}), "dense", r"model\.intermediate\.size"),
        (config(head={"impl": "cuda", "fan_in": 4}), "dense", r"model\.head\.impl"),
    ],
)
def test_bad_config_names_the_key(cfg, kind, message):
    with pytest.raises(XMLSparseError, match=message):
        build_model(cfg, DENSE_DIM, N_LABELS, kind)


def test_make_activation():
    assert isinstance(make_activation("gelu"), nn.GELU)
    with pytest.raises(XMLSparseError, match=r"'swish'.*identity"):
        make_activation("swish")
