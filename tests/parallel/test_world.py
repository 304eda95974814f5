"""How the labels, each global batch and the seeds are shared by the processes of a run, and what
several processes refuse before any work."""

from pathlib import Path

import pytest
import torch.distributed

from xmlsparse.config import load_config
from xmlsparse.errors import XMLSparseError
from xmlsparse.parallel.sharded import check_shardable
from xmlsparse.parallel.world import World, batch_shares, label_ranges, peers_failures_named, rank_seed, world_from_env

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_label_ranges_are_whole_groups_covering_every_label_once():
    assert label_ranges(10, 1, 3) == [(0, 3), (3, 6), (6, 10)]
    ranges = label_ranges(333, 16, 4)  # 21 groups, the last partial
    assert ranges[0][0] == 0 and ranges[-1][1] == 333
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % 16 == 0 for start, _ in ranges)
    assert [-(-(stop - start) // 16) for start, stop in ranges] == [5, 5, 5, 6]


def test_too_many_processes_for_the_groups_are_refused():
    with pytest.raises(XMLSparseError, match="cannot be shared by 4 processes .* at most 3 processes"):
        label_ranges(40, 16, 4)


def test_batch_shares_add_up_and_differ_by_at_most_one():
    assert batch_shares(7, 2) == [4, 3]
    assert batch_shares(128, 4) == [32] * 4
    assert sum(batch_shares(5, 8)) == 5


def test_rank_seeds_keep_rank_zero_and_differ_by_rank():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, rank) for rank in range(8)}) == 8


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world_from_env() == World(rank=2, size=4, local_rank=0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(XMLSparseError, match="expected 0 <= RANK < WORLD_SIZE"):
        world_from_env()


@pytest.mark.parametrize("override, message", [
    ("model.head.type=dense", "shard a fixed-fanin head only"),
    ("model.head.dense_head_labels=10", "head-tail split is not sharded"),
    ("train.loss=softmax", "normalises over all labels"),
])
def test_what_several_processes_do_not_shard_is_refused(override, message):
    with pytest.raises(XMLSparseError, match=message):
        check_shardable(load_config(QUICKSTART, [override]))
    check_shardable(load_config(QUICKSTART))


def test_a_failed_collective_becomes_one_error_naming_the_rank():
    world = World(rank=1, size=2)
    with pytest.raises(XMLSparseError, match=r"rank 1 of 2: a collective .* failed \(.*Connection closed by peer.*\); another process probably died"):
        with peers_failures_named(world):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(XMLSparseError, match="rank 1 of 2"):
        with peers_failures_named(world):
            raise torch.distributed.DistBackendError("NCCL watchdog timeout")
    with pytest.raises(RuntimeError, match="out of memory"):  # this rank's own error stays itself
        with peers_failures_named(world):
            raise RuntimeError("CUDA out of memory")
