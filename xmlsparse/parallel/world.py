"""The processes of a run: which one this is, how many there are, and how the labels and each
global batch are split between them.

``torchrun`` starts one process per device and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
without them (or with one process) a run is a world of one and no process group is created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from xmlsparse.errors import XMLSparseError

# How long a collective waits for the other processes before it fails: a rank that died (or hangs)
# then ends the job with an error instead of a silent wait.
COLLECTIVE_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes the run directory's logs, metrics and final.json."""
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment; a world of one without it."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise XMLSparseError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them): {error}") from None
    if size < 1 or not 0 <= rank < size:
        raise XMLSparseError(f"RANK={rank} with WORLD_SIZE={size}: expected 0 <= RANK < WORLD_SIZE")
    return World(rank, size, local_rank)


def init_world(world: World, device: torch.device, timeout_seconds: float = COLLECTIVE_TIMEOUT_SECONDS) -> torch.device:
    """Join the process group of ``world`` (NCCL for CUDA devices, gloo on CPUs) and return this
    process's device (``cuda:LOCAL_RANK`` for CUDA)."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise XMLSparseError(f"rank {world.rank}: LOCAL_RANK {world.local_rank} but this machine has "
                                 f"{torch.cuda.device_count()} CUDA devices (one process per device)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_seconds),
                                device_id=device if device.type == "cuda" else None)
    return device


def leave_world(world: World) -> None:
    """Leave the process group once the work is done: a process that exits inside it can abort in
    gloo's threads at interpreter shutdown."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def label_ranges(n_labels: int, group_size: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` label ranges, one per rank, of whole groups of ``group_size``
    labels (the last group may be partial), as even as whole groups allow."""
    n_groups = -(-n_labels // group_size)
    if n_groups < world_size:
        raise XMLSparseError(
            f"{n_labels} labels in {n_groups} groups of {group_size} cannot be shared by {world_size} processes "
            f"(each needs at least one group): use at most {n_groups} processes"
        )
    bounds = [min(n_labels, (n_groups * rank // world_size) * group_size) for rank in range(world_size + 1)]
    bounds[-1] = n_labels
    return list(zip(bounds[:-1], bounds[1:]))


def batch_shares(batch_size: int, world_size: int) -> list[int]:
    """How many points of a global batch of ``batch_size`` each rank takes (the first ranks one more
    when it does not divide)."""
    return [len(part) for part in np.array_split(np.arange(batch_size), world_size)]


def rank_seed(seed: int, rank: int) -> int:
    """A seed for this rank's own random draws (rewiring, dropout): the run's seed on rank 0, so that
    a world of one draws as it always did."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] % (2**31 - 1))


@contextmanager
def peers_failures_named(world: World) -> Iterator[None]:
    """Turn a failed collective (a peer that died, or one silent past the timeout) into one clear
    error naming this rank, instead of a traceback from inside torch.distributed."""
    try:
        yield
    except XMLSparseError:
        raise
    except (dist.DistError, RuntimeError) as error:
        # gloo reports a closed connection as a plain RuntimeError; other RuntimeErrors (out of
        # memory, a shape) are this rank's own and pass through as they are.
        from_peers = isinstance(error, dist.DistError) or any(
            word in str(error) for word in ("gloo", "NCCL", "Connection", "Timed out", "timed out"))
        if not world.distributed or not from_peers:
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise XMLSparseError(
            f"rank {world.rank} of {world.size}: a collective with the other processes failed ({first_line}); "
            f"another process probably died (its own log says why) or did not answer within "
            f"{COLLECTIVE_TIMEOUT_SECONDS} s"
        ) from None
