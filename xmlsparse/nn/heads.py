"""The head–tail split: a dense layer for the most frequent labels, a fixed fan-in layer for the rest.

The run's label order (``Preprocessing.label_order``) puts the most frequent training labels at the
first positions, so the head is one block of positions and the tail the rest; the logits come out
in position order and predictions are mapped back to the data set's label ids like any other run's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.sparse_linear import FixedFanInLinear


def dense_label_count(dense_head_labels: float, n_labels: int) -> int:
    """How many labels ``model.head.dense_head_labels`` gives the dense head: a share of the labels
    when under 1, else a count."""
    count = round(dense_head_labels * n_labels) if dense_head_labels < 1 else int(dense_head_labels)
    if count >= n_labels:
        raise XMLSparseError(
            f"model.head.dense_head_labels = {dense_head_labels} leaves none of the {n_labels} labels to the "
            "fixed fan-in tail; expected fewer"
        )
    return count


class HeadTailLinear(nn.Module):
    """``logits = [dense(h), tail(h)]``: labels ``[0, n_dense)`` by ``nn.Linear``, the others by a
    fixed fan-in layer (``tail``, grouped or not)."""

    def __init__(self, in_features: int, n_dense: int, tail: FixedFanInLinear) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, n_dense)
        self.tail = tail
        self.n_dense = n_dense
        self.out_features = n_dense + tail.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.dense(h), self.tail(h)], dim=-1)

    def label_blocks(self, h: torch.Tensor, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logits of positions start ..)`` in blocks of at most ``block`` labels that never
        straddle the two parts (the tail's begin at a group)."""
        weight, bias = self.dense.weight, self.dense.bias
        for start in range(0, self.n_dense, block):
            stop = min(start + block, self.n_dense)
            yield start, F.linear(h, weight[start:stop], bias[start:stop])
        group = self.tail.group_size
        tail_block = max(group, block // group * group)
        for start in range(0, self.tail.out_features, tail_block):
            stop = min(start + tail_block, self.tail.out_features)
            yield self.n_dense + start, self.tail.logits(h, start, stop)

    def extra_repr(self) -> str:
        return f"n_dense={self.n_dense}, out_features={self.out_features}"
