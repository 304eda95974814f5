"""Checkpoints written atomically, so that a kill at any moment leaves the previous one intact,
in the foreground or from a background thread that writes a host copy while training goes on."""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmlsparse.atomic import atomic_write

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`: a kill mid-save leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state; with ``mmap`` only the tensors that are then read come off the disk
    (the model of a full checkpoint without its optimizer moments)."""
    return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)


class CheckpointWriteError(RuntimeError):
    """A checkpoint written in the background failed; raised in the training thread."""


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class CheckpointWriter:
    """Writes checkpoints through :func:`save_checkpoint`, in the foreground or in a background thread.

    In the background, :meth:`save` first copies the state to host memory and returns: the next
    optimizer step may then change the live tensors while the thread writes the copy, which is a
    consistent snapshot. A GPU's tensors go to pinned memory, which copies at full transfer speed;
    torch's caching host allocator keeps it for the next save once a write has freed it, so only the
    first save pays for pinning. At most one write is in flight; the next ``save`` and :meth:`wait`
    wait for it and raise its error here. The thread is not a daemon, so the interpreter waits for a
    write in flight before exiting.
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: CheckpointWriteError | None = None

    def save(self, files: Mapping[Path, dict[str, Any]]) -> None:
        """Write each state to its path, in order; once this returns the live state may change."""
        self.wait()
        if not self.background:
            self._write(files)
            return
        snapshot = self._host_copy(dict(files))
        self._thread = threading.Thread(target=self._write_recording_error, args=(snapshot,),
                                        name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Wait for the write in flight; raise :class:`CheckpointWriteError` if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @staticmethod
    def _write(files: Mapping[Path, dict[str, Any]]) -> None:
        for path, state in files.items():
            save_checkpoint(state, path)

    def _write_recording_error(self, files: dict[Path, dict[str, Any]]) -> None:
        try:
            self._write(files)
        except BaseException as error:  # every failure, not only OSError, must reach the training thread
            self._error = CheckpointWriteError(f"writing a checkpoint in the background failed: {error!r}")
            self._error.__cause__ = error

    def _host_copy(self, files: dict[Path, dict[str, Any]]) -> dict[Path, dict[str, Any]]:
        """A deep copy of ``files`` whose tensors live in host buffers. Tensors that share a storage
        (the model in both last.pt and best.pt, views) share one buffer, as ``torch.save`` would
        write them, so that the file holds what writing the live state would have written."""
        by_storage: dict[Any, torch.Tensor] = {}
        copies: dict[int, Any] = {}
        devices = set()
        for tensor in _tensors(files):
            if id(tensor) in copies:
                continue
            storage = tensor.untyped_storage()
            # Empty storages all have data pointer 0: each gets its own (empty) buffer.
            key = (tensor.device, storage.data_ptr()) if storage.nbytes() else id(tensor)
            buffer = by_storage.get(key)
            if buffer is None:
                buffer = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=tensor.is_cuda)
                source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
                buffer.copy_(source, non_blocking=True)
                by_storage[key] = buffer
                if tensor.is_cuda:
                    devices.add(tensor.device)
            host = torch.empty(0, dtype=tensor.dtype).set_(
                buffer.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
            )
            copies[id(tensor)] = host.requires_grad_(tensor.requires_grad)
        for device in devices:
            torch.cuda.synchronize(device)  # the non-blocking copies have landed before training goes on
        # deepcopy copies the containers (and their types, as an OrderedDict's _metadata) and takes
        # each tensor's host copy from the memo.
        return copy.deepcopy(files, copies)


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from (dropout, shuffling helpers)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
