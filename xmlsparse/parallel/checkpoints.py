"""Checkpoints of a run trained by several processes: each rank writes its own shard (its head's
label range and the optimizer state of what it holds, beside the replicated layers) into a folder
named by the step, and rank 0 then writes a manifest naming that folder. A resume or an evaluation
reads only what a manifest names, so a kill -9 of any rank mid-write leaves the previous checkpoint
whole; older folders are removed once the new manifest is in place.

``checkpoints/last.json`` / ``best.json`` (the manifests) stand for ``last.pt`` / ``best.pt`` of a
one-process run; ``merged_model_state`` assembles the whole model from a manifest's shards, so that
``xmlsparse eval`` and ``predict`` load a sharded run on one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xmlsparse.atomic import write_json
from xmlsparse.errors import XMLSparseError
from xmlsparse.parallel.world import World
from xmlsparse.train.checkpoint import CheckpointWriter, load_checkpoint

# The head's tensors, split over the ranks by label (or group) rows; everything else is replicated.
HEAD_PREFIX = "head."


def manifest_path(checkpoint: Path) -> Path:
    """The manifest that stands for a one-process checkpoint path (``last.pt`` -> ``last.json``)."""
    return checkpoint.with_suffix(".json")


def _shard_folder(checkpoint: Path, step: int) -> Path:
    return checkpoint.parent / f"{checkpoint.stem}-step{step:010d}"


def save_sharded(writer: CheckpointWriter, world: World, files: dict[Path, dict[str, Any]], step: int) -> None:
    """Write this rank's shard of each checkpoint in ``files`` (one-process paths such as
    ``checkpoints/last.pt``), wait for every rank, then (rank 0) the manifests. Collective."""
    shards = {_shard_folder(path, step) / f"rank{world.rank}.pt": state for path, state in files.items()}
    for shard in shards:
        shard.parent.mkdir(parents=True, exist_ok=True)
    writer.save(shards)
    writer.wait()
    dist.barrier()
    if world.is_main:
        for path in files:
            folder = _shard_folder(path, step)
            write_json(manifest_path(path), {"world_size": world.size, "step": step, "folder": folder.name})
            for old in path.parent.glob(f"{path.stem}-step*"):
                if old.is_dir() and old != folder:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        entry = json.loads(manifest.read_text())
        return {"world_size": int(entry["world_size"]), "step": int(entry["step"]), "folder": str(entry["folder"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise XMLSparseError(f"{manifest}: unreadable checkpoint manifest ({error})") from None


def shard_paths(manifest: Path) -> list[Path]:
    """The shard files a manifest names, rank by rank; each must exist."""
    entry = read_manifest(manifest)
    paths = [manifest.parent / entry["folder"] / f"rank{rank}.pt" for rank in range(entry["world_size"])]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise XMLSparseError(f"{manifest}: the shards {', '.join(missing)} it names are missing")
    return paths


def load_rank_shard(manifest: Path, world: World, mmap: bool = False) -> dict[str, Any]:
    """This rank's shard of the checkpoint a manifest names; the world size must be the one it was written with."""
    paths = shard_paths(manifest)
    if len(paths) != world.size:
        raise XMLSparseError(
            f"{manifest} was written by {len(paths)} processes; resume it with the same number "
            f"(torchrun --nproc_per_node={len(paths)}), not {world.size}"
        )
    return load_checkpoint(paths[world.rank], mmap=mmap)


def merged_model_state(manifest: Path) -> dict[str, torch.Tensor]:
    """The whole model's state from a manifest's shards: the replicated layers from rank 0, the
    head's tensors concatenated over the ranks' label ranges."""
    shards = [load_checkpoint(path, mmap=True)["model"] for path in shard_paths(manifest)]
    merged = dict(shards[0])
    for key in merged:
        if key.startswith(HEAD_PREFIX):
            merged[key] = torch.cat([shard[key] for shard in shards])
    return merged
