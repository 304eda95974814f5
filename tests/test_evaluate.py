"""Scoring streams over label blocks: the merged top-k equals a dense top-k of the full logits."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlsparse import evaluate as evaluate_module
from xmlsparse.config import ModelConfig, config_from_dict
from xmlsparse.data.batches import BatchIterator
from xmlsparse.metrics import topk_from_scores
from xmlsparse.nn.model import build_model


def model_config(values: dict) -> ModelConfig:
    """The typed ``model`` section of ``values`` over dense features."""
    return config_from_dict({"data": {"dataset": "d", "features": "dense"}, "model": values}).model


@pytest.mark.parametrize("head", [{"type": "fixed-fanin", "fan_in": 5}, {"type": "dense"}, {"type": "bottleneck", "rank": 4}])
def test_label_blocks_top_k_equals_dense_top_k(head):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((37, 12)).astype(np.float32)
    Y = sp.random(37, 101, density=0.05, format="csr", dtype=np.float32, random_state=1)
    model = build_model(model_config({"intermediate": {"size": 16}, "head": head}), 12, 101, "dense").eval()
    batch = next(iter(BatchIterator(X, Y, 37, shuffle=False)))
    with torch.no_grad():
        logits = model(batch)
        expected = topk_from_scores(logits, 7)
        blocks = list(model.label_blocks(batch, 10))
        assert [start for start, _ in blocks] == list(range(0, 101, 10))
        torch.testing.assert_close(torch.cat([b for _, b in blocks], dim=1), logits)
        _, ids = evaluate_module.topk_of_batch(model, batch, 7, block_elements=37 * 10)  # blocks of 10 labels
    assert torch.equal(ids, expected)


def test_ties_across_blocks_go_to_the_lower_label_id():
    model = build_model(model_config({"intermediate": None, "head": {"type": "dense"}}), 3, 25, "dense").eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 2.0] * 12 + [2.0]))  # ties everywhere
    X = np.ones((2, 3), dtype=np.float32)
    batch = next(iter(BatchIterator(X, sp.csr_matrix((2, 25), dtype=np.float32), 2, shuffle=False)))
    with torch.no_grad():
        _, ids = evaluate_module.topk_of_batch(model, batch, 5, block_elements=2 * 4)
    assert ids.tolist() == [[1, 3, 5, 7, 9]] * 2
