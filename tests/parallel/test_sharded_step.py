"""Two gloo processes on the CPU: the label-sharded step (activations all-gathered, each rank's
labels and share of the loss, grad h summed back, DDP summing the replicated layers' gradients)
equals one process's step on the same batch, for plain and grouped heads and a batch the ranks
share unevenly; rewiring's selection over the ranks equals one process's; and the sharded top-k
equals the one-process top-k, also made consistent with label implications that cross the ranks."""

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmlsparse.config import load_config
from xmlsparse.data.batches import BatchIterator
from xmlsparse.evaluate import topk_of_batch, with_implications
from xmlsparse.implications import LabelImplications
from xmlsparse.nn.model import build_model
from xmlsparse.parallel.sharded import ShardedBatches, ShardedModel, shard_model_state
from xmlsparse.parallel.world import World, label_ranges, leave_world
from xmlsparse.train.losses import loss_fn
from xmlsparse.train.rewiring import Rewirer, group_magnitudes
from xmlsparse.train.trainer import _share_of_mean

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
N_FEATURES, N_LABELS, BATCH = 12, 70, 7  # 7 points: shares 4 and 3


def _config(group: int, intermediate: bool = True):
    middle = "model.intermediate.size=32" if intermediate else "model.intermediate=null"
    return load_config(QUICKSTART, ["model.encoder.dropout=0", middle, f"model.head.fan_in={16 if intermediate else 8}",
                                    f"model.head.group_size={group}", "model.head.impl=reference"])


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(BATCH, N_FEATURES)).astype(np.float32)
    Y = sp.random(BATCH, N_LABELS, density=0.1, format="csr", random_state=1)
    Y.data[:] = 1
    return X, Y


def _implications() -> LabelImplications:
    """Labels on a binary tree (the parent of j is j // 2), each point a label and its ancestors:
    every label implies its ancestors, most of which lie in the other rank's range."""
    rows = []
    for label in range(1, N_LABELS):
        chain = [label]
        while chain[-1] > 1:
            chain.append(chain[-1] // 2)
        rows.append(chain)
    indptr = np.cumsum([0] + [len(row) for row in rows])
    Y = sp.csr_matrix((np.ones(indptr[-1]), np.concatenate(rows), indptr), shape=(len(rows), N_LABELS))
    return LabelImplications.from_labels(Y, 1)


def _full_model(group: int, intermediate: bool):
    torch.manual_seed(0)
    return build_model(_config(group, intermediate).model, N_FEATURES, N_LABELS, "dense").double()


def _worker(rank: int, init_file: str, group: int, intermediate: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = World(rank=rank, size=2)
        start, stop = label_ranges(N_LABELS, group, 2)[rank]
        full = _full_model(group, intermediate)
        local = build_model(_config(group, intermediate).model, N_FEATURES, stop - start, "dense").double()
        local.load_state_dict(shard_model_state(full.state_dict(), (start, stop), group))
        X, Y = _data()
        iterator = BatchIterator(X.astype(np.float64), Y, BATCH, shuffle=False)
        batch = ShardedBatches(iterator, world, (start, stop)).batch(np.arange(BATCH))
        batch.x_dense = batch.x_dense.double()
        sharded = ShardedModel(local, world, (start, stop), torch.device("cpu"))
        logits = sharded(batch)
        loss = _share_of_mean(loss_fn("squared-hinge", impl="reference"), (stop - start) / N_LABELS)(
            logits, batch.y_indices, batch.y_ptr)
        loss.backward()

        whole = iterator.batch(np.arange(BATCH))
        whole.x_dense = whole.x_dense.double()
        full_logits = full(whole)
        full_loss = loss_fn("squared-hinge", impl="reference")(full_logits, whole.y_indices, whole.y_ptr)
        full_loss.backward()

        torch.testing.assert_close(logits, full_logits[:, start:stop])
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, full_loss.detach())
        full_params = dict(full.named_parameters())
        for name, param in local.named_parameters():
            want = full_params[name].grad
            if name.startswith("head."):
                want = want[start:stop]
            torch.testing.assert_close(param.grad, want, msg=f"{name} on rank {rank}")

        # Rewiring in fraction mode prunes the smallest share of all ranks' slots, as one process would.
        section = _config(group, intermediate).model.rewire
        sharded_pruned = Rewirer(section, total_steps=10, seed=0, world=world)._select_pruned(
            group_magnitudes(local.head.weight, group), None, torch.Generator())
        whole_pruned = Rewirer(section, total_steps=10, seed=0)._select_pruned(
            group_magnitudes(full.head.weight, group), None, torch.Generator())
        assert sharded_pruned.any()
        assert torch.equal(sharded_pruned, whole_pruned[start // group : -(-stop // group)])

        sharded.eval()
        full.eval()
        vals, ids = sharded.topk(batch, 5)
        want_vals, want_ids = topk_of_batch(full, whole, 5)
        torch.testing.assert_close(ids, want_ids)
        torch.testing.assert_close(vals, want_vals.to(vals.dtype))
        # The implications apply to the merged lists, where both ranks' labels are.
        implications = _implications()
        _, consistent_ids = with_implications(sharded.topk, implications)(batch, 5)
        _, want_consistent = with_implications(partial(topk_of_batch, full), implications)(whole, 5)
        assert torch.equal(consistent_ids, want_consistent) and not torch.equal(want_consistent, want_ids)
    finally:
        leave_world(World(rank=rank, size=2))  # together: a rank leaving alone can abort the other in gloo


@pytest.mark.parametrize("group, intermediate", [(1, True), (16, True), (1, False)],
                         ids=["plain", "grouped-G16", "nothing-replicated-learns"])
def test_the_sharded_step_equals_the_one_process_step(group, intermediate, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), group, intermediate), nprocs=2, join=True)
