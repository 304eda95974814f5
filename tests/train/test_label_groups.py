"""Clustered label groups: the balanced 2-means order, and a run whose grouped head uses it, whose
predictions come back in the data set's label ids."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
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


def test_a_clustered_run_predicts_in_the_data_sets_label_ids(train_tiny_run, prediction_scores):
    run, data = train_tiny_run("model.head.group_size=8", "model.head.grouping=clustered")
    order = load_run_inputs(run).preprocess.label_order
    assert order is not None and not np.array_equal(order, np.arange(80))
    scores = prediction_scores(run, data)
    final = json.loads((run / "final.json").read_text())["test"]
    assert scores["P@1"] == pytest.approx(final["P@1"])
    assert scores["P@5"] == pytest.approx(final["P@5"])

    np.save(run / LABEL_ORDER_FILE, np.zeros(80, dtype=np.int64))
    with pytest.raises(XMLSparseError, match="expected an order of the 80 label ids"):
        load_run_inputs(run)


def test_a_resumed_clustered_run_keeps_its_stored_label_order(train_tiny_run, monkeypatch):
    run, _ = train_tiny_run("model.head.group_size=8", "model.head.grouping=clustered", "train.epochs=1")
    stored = np.load(run / LABEL_ORDER_FILE)

    def no_new_clustering(*args, **kwargs):
        raise AssertionError("a resumed run clustered its labels again")

    monkeypatch.setattr("xmlsparse.train.setup.clustered_label_order", no_new_clustering)
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(run / LABEL_ORDER_FILE), stored)
