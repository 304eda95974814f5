"""The label-sharded model of one rank and the batches it reads.

Every rank holds the whole encoder and intermediate layer (under DistributedDataParallel) and the
head of its label range ``[start, stop)`` (indices, weights, bias and their optimizer state). A
step: each rank computes the activations ``h`` of its share of the global batch; they are
all-gathered, so every rank scores its labels for all the batch's points and takes its part of
the loss (its pairs of the mean over ``B x L``); the gradient of ``h`` is summed over the ranks
and each rank carries its own points' rows back through its replicated layers, whose gradients
DDP then sums. The sum of the ranks' losses and gradients is the one-process step's.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch.nn.parallel import DistributedDataParallel

from xmlsparse.config import Config
from xmlsparse.data.batches import Batch, BatchIterator
from xmlsparse.errors import XMLSparseError
from xmlsparse.evaluate import topk_of_batch
from xmlsparse.nn.model import XMCModel, build_model
from xmlsparse.parallel.collectives import gather_rows, merge_topk_across_ranks, sum_hook
from xmlsparse.parallel.world import World, batch_shares


def check_shardable(config: Config) -> None:
    """Refuse, before any work, what several processes do not train: only a fixed fan-in head
    (plain or grouped) is sharded, without a dense head part, and its loss must be a sum over labels."""
    head = config.model.head
    if head.type != "fixed-fanin":
        raise XMLSparseError(f"model.head.type = {head.type!r}: several processes shard a fixed-fanin head only")
    if head.dense_head_labels:
        raise XMLSparseError("model.head.dense_head_labels: a head-tail split is not sharded over several processes")
    if config.train.loss == "softmax":
        raise XMLSparseError("train.loss = softmax normalises over all labels, which several processes hold in parts; "
                             "use bce or squared-hinge")


def shard_model_state(state: dict[str, torch.Tensor], label_range: tuple[int, int], group_size: int) -> dict[str, torch.Tensor]:
    """The state of one rank's model from the whole model's: the head's rows of ``label_range``
    (its index rows by group), everything else as it is."""
    start, stop = label_range
    rows = {"head.weight": slice(start, stop), "head.bias": slice(start, stop),
            "head.indices": slice(start // group_size, -(-stop // group_size))}
    return {key: value[rows[key]] if key in rows else value for key, value in state.items()}


def sharded_model_for(config: Config, n_features: int, n_labels: int, label_range: tuple[int, int],
                      device: torch.device) -> XMCModel:
    """This rank's model: drawn as the one-process model is (the whole model on the CPU, from the
    seeded generator), then cut to the rank's labels, so that N processes start where one does."""
    whole = build_model(config.model, n_features, n_labels, config.data.features)
    state = shard_model_state(whole.state_dict(), label_range, config.model.head.group_size)
    del whole
    model = build_model(config.model, n_features, label_range[1] - label_range[0], config.data.features)
    model.load_state_dict(state)
    return model.to(device)


class _Body(torch.nn.Module):
    """The replicated layers: ``h = intermediate(encoder(batch))``."""

    def __init__(self, model: XMCModel) -> None:
        super().__init__()
        self.encoder, self.intermediate = model.encoder, model.intermediate

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.encoder(batch)
        return h if self.intermediate is None else self.intermediate(h)


class ShardedModel:
    """Calls like an ``XMCModel`` (``logits = model(batch)``), for a batch of :class:`ShardedBatches`:
    the logits of this rank's labels for every point of the global batch."""

    def __init__(self, model: XMCModel, world: World, label_range: tuple[int, int], device: torch.device) -> None:
        self.model, self.world, self.label_range = model, world, label_range
        body: torch.nn.Module = _Body(model)
        # A model whose encoder and intermediate layer learn nothing (a dense encoder without hidden
        # layers, no intermediate) has no gradients to sum, and DDP refuses such a module.
        if any(p.requires_grad for p in body.parameters()):
            body = DistributedDataParallel(body, device_ids=[device.index] if device.type == "cuda" else None)
            body.register_comm_hook(None, sum_hook)
        self.body = body

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def features(self, batch: Batch) -> torch.Tensor:
        """``h`` of every point of the global batch, gathered from the ranks' shares."""
        return gather_rows(self.body(batch), batch_shares(batch.size, self.world.size))

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.model.head(self.features(batch))

    def label_blocks(self, batch: Batch, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``XMCModel.label_blocks`` over this rank's labels (global label ids) for every point of
        the global batch."""
        start = self.label_range[0]
        for first, logits in self.model.head_blocks(self.features(batch), block):
            yield start + first, logits

    @torch.no_grad()
    def topk(self, batch: Batch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k scores and label ids of every point of the global batch over all ranks' labels:
        this rank's top-k over its label blocks, then the ranks' top-k merged."""
        return merge_topk_across_ranks(*topk_of_batch(self, batch, k), k)


class ShardedBatches:
    """The batches of one rank: the global batches of ``iterator`` (the same on every rank, from the
    seed and the epoch), of which this rank's features are its share of the points and its labels
    are those in its label range for every point of the global batch, renumbered from 0."""

    def __init__(self, iterator: BatchIterator, world: World, label_range: tuple[int, int]) -> None:
        self.iterator, self.world = iterator, world
        self.start, self.stop = label_range

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self) -> Iterator[Batch]:
        return map(self.batch, self.iterator.batch_rows())

    def batch(self, rows: np.ndarray) -> Batch:
        shares = batch_shares(rows.size, self.world.size)
        first = sum(shares[: self.world.rank])
        own = self.iterator.batch(rows[first : first + shares[self.world.rank]])
        labels = sp.csr_matrix(self.iterator.Y[rows][:, self.start : self.stop])
        labels.sort_indices()
        own.y_indices = torch.from_numpy(labels.indices.astype(np.int64))
        own.y_ptr = torch.from_numpy(labels.indptr.astype(np.int64))
        own.points = np.asarray(rows, dtype=np.int64)
        return own
