"""Clustered label groups: the balanced 2-means order, and a run whose grouped head uses it, whose
predictions come back in the data set's label ids."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.label_groups import balanced_bisection_order, clustered_label_order
from xmlsparse.train.setup import LABEL_ORDER_FILE, load_run_inputs


def test_labels_of_one_cluster_share_a_group():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10
    cluster_of = rng.permutation(np.repeat(np.arange(4), 8))  # 32 labels, 8 per cluster, shuffled ids
    points = centres[cluster_of] + rng.normal(size=(32, 6)) * 0.1
    order = balanced_bisection_order(points, group_size=8, seed=1)
    assert sorted(order.tolist()) == list(range(32))
    for group in order.reshape(4, 8):
        assert len(set(cluster_of[group])) == 1


def test_a_partial_last_group_and_labels_without_points():
    X = sp.csr_matrix(np.eye(5, dtype=np.float32))
    Y = sp.csr_matrix((np.ones(4), ([0, 1, 2, 3], [0, 0, 3, 3])), shape=(5, 7))  # labels 1, 2, 4, 5, 6 unused
    order = clustered_label_order(X, Y, group_size=3)
    assert sorted(order.tolist()) == list(range(7)) and order.dtype == np.int64


def test_a_clustered_run_predicts_in_the_data_sets_label_ids(tmp_path):
    runner = CliRunner()
    data = tmp_path / "data"
    result = runner.invoke(app, ["synth", "--n-train", "400", "--n-test", "100", "--n-labels", "40",
                                 "--labels-per-point", "3", "--dim", "16", "--out", str(data)])
    assert result.exit_code == 0, result.output
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": str(data), "features": "dense"},
        "model": {"intermediate": {"size": 32}, "head": {"fan_in": 6, "group_size": 8, "grouping": "clustered"}},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
    }))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 0, result.output
    order = load_run_inputs(run).preprocess.label_order
    assert order is not None and not np.array_equal(order, np.arange(40))
    predictions = tmp_path / "pred.txt"
    result = runner.invoke(app, ["predict", str(run), str(data / "X.tst.npy"), "--top-k", "5", "--out", str(predictions)])
    assert result.exit_code == 0, result.output
    scores = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", "--predictions", str(predictions), "--truth", str(data / "Y.tst.npz"),
                                 "--buckets", "0", "--json", str(scores)])
    assert result.exit_code == 0, result.output
    final = json.loads((run / "final.json").read_text())["test"]
    assert json.loads(scores.read_text())["P@1"] == pytest.approx(final["P@1"])
    assert json.loads(scores.read_text())["P@5"] == pytest.approx(final["P@5"])

    np.save(run / LABEL_ORDER_FILE, np.zeros(40, dtype=np.int64))
    with pytest.raises(XMLSparseError, match="expected an order of the 40 label ids"):
        load_run_inputs(run)


def test_a_resumed_clustered_run_keeps_its_stored_label_order(tmp_path, monkeypatch):
    runner = CliRunner()
    data = tmp_path / "data"
    result = runner.invoke(app, ["synth", "--n-train", "300", "--n-test", "50", "--n-labels", "40",
                                 "--labels-per-point", "3", "--dim", "16", "--out", str(data)])
    assert result.exit_code == 0, result.output
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": str(data), "features": "dense"},
        "model": {"intermediate": {"size": 32}, "head": {"fan_in": 6, "group_size": 8, "grouping": "clustered"}},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
    }))
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(config), "--out", str(run)]).exit_code == 0
    stored = np.load(run / LABEL_ORDER_FILE)

    def no_new_clustering(*args, **kwargs):
        raise AssertionError("a resumed run clustered its labels again")

    monkeypatch.setattr("xmlsparse.train.setup.clustered_label_order", no_new_clustering)
    result = runner.invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(run / LABEL_ORDER_FILE), stored)
