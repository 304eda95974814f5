"""The head–tail split: the most frequent labels scored by a dense layer, the rest by a fixed
fan-in layer (grouped or not), one row of logits, predictions in the data set's label ids."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlsparse.config import config_from_dict
from xmlsparse.data.batches import Batch
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.heads import HeadTailLinear, dense_label_count
from xmlsparse.nn.model import build_model
from xmlsparse.train.setup import fit_preprocessing


def test_dense_label_count_takes_a_share_or_a_count():
    assert dense_label_count(0.1, 50) == 5 and dense_label_count(7, 50) == 7
    with pytest.raises(XMLSparseError, match="leaves none of the 50 labels"):
        dense_label_count(50, 50)
    with pytest.raises(XMLSparseError, match="a share under 1 or a whole number"):
        config_from_dict({"data": {"dataset": "x"}, "model": {"head": {"dense_head_labels": 2.5}}})
    with pytest.raises(XMLSparseError, match="splits a fixed-fanin head"):
        config_from_dict({"data": {"dataset": "x"}, "model": {"head": {"type": "dense", "dense_head_labels": 3}}})


def test_the_split_model_scores_every_label_once_in_blocks():
    config = config_from_dict({"data": {"dataset": "unused", "features": "dense"},
                               "model": {"intermediate": {"size": 16},
                                         "head": {"fan_in": 5, "group_size": 4, "dense_head_labels": 5}}})
    model = build_model(config.model, 10, 45, "dense", impl="reference").eval()
    assert isinstance(model.head, HeadTailLinear) and model.sparse_head is model.head.tail
    assert model.head.tail.out_features == 40 and model.n_labels == 45
    batch = Batch(x_dense=torch.randn(3, 10), y_indices=torch.zeros(0, dtype=torch.long),
                  y_ptr=torch.zeros(4, dtype=torch.long))
    whole = model(batch)
    blocks = list(model.label_blocks(batch, block=9))
    assert [start for start, _ in blocks] == [0, 5, 13, 21, 29, 37]  # the tail's blocks begin at its groups
    torch.testing.assert_close(torch.cat([logits for _, logits in blocks], dim=1), whole)


def test_the_dense_labels_come_first_in_the_label_order():
    Y = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0]], dtype=np.float32))
    train = XMCData(sp.csr_matrix(np.eye(3, dtype=np.float32)), Y, 3, 6)
    config = config_from_dict({"data": {"dataset": "x", "features": "bow", "tfidf": False},
                               "model": {"encoder": {"dim": 8}, "intermediate": None,
                                         "head": {"fan_in": 2, "dense_head_labels": 2}}})
    order = fit_preprocessing(config, train).label_order
    assert order.tolist() == [2, 4, 0, 1, 3, 5]  # label 2 (3 points), label 4 (2), then the rest by id


def test_a_split_run_predicts_in_the_data_sets_label_ids(train_tiny_run, prediction_scores):
    run, data = train_tiny_run("model.head.dense_head_labels=0.1")
    final = json.loads((run / "final.json").read_text())["test"]
    assert prediction_scores(run, data)["P@3"] == pytest.approx(final["P@3"])
