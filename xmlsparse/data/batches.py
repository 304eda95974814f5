"""Mini-batches of a split as torch tensors, cut with vectorised row slicing (no per-point loops).

Features come as CSR rows (bag of words, fed to ``EmbeddingBag`` as flat ids + weights + offsets)
or as dense rows; labels always stay sparse: flat label ids with CSR row pointers, so no dense
``B x L`` target matrix is ever built.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from xmlsparse.errors import XMLSparseError

Features = sp.spmatrix | sp.sparray | np.ndarray
T = TypeVar("T")


@dataclass
class Batch:
    """One mini-batch. Either the bag-of-words triple (``x_indices``, ``x_weights``, ``x_offsets``)
    or ``x_dense`` is set; labels are binary and given by their ids per point."""

    y_indices: torch.Tensor  # int64, flat label ids of all points, row after row
    y_ptr: torch.Tensor  # int64 [B + 1], CSR row pointers into y_indices
    x_indices: torch.Tensor | None = None  # int64, flat feature ids
    x_weights: torch.Tensor | None = None  # float32, the features' values (tf-idf), same length
    x_offsets: torch.Tensor | None = None  # int64 [B], start of each point in x_indices
    x_dense: torch.Tensor | None = None  # float32 [B, d]
    points: np.ndarray | None = None  # int64 [B], row numbers in the split; stays on the host

    @property
    def size(self) -> int:
        return self.y_ptr.numel() - 1

    @property
    def feature_kind(self) -> str:
        return "dense" if self.x_dense is not None else "bow"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> Batch:
        return dataclasses.replace(self, **{name: t.pin_memory() for name, t in self.tensors().items()})

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark the device tensors as used on ``stream`` so the allocator does not reuse them early."""
        for t in self.tensors().values():
            t.record_stream(stream)


class BatchIterator:
    """Mini-batches of the points of a split, in a shuffled order that depends only on
    ``(seed, epoch)``, so that a resumed run sees the same batches.

    ``points`` restricts the iteration to those rows (e.g. the training part after
    :func:`split_validation`) without copying the data. ``len()`` is the number of batches of a
    whole epoch; iteration starts at ``start_batch`` of the current epoch (set with
    :meth:`set_epoch`) and keeps starting there until the epoch is set again.
    """

    def __init__(
        self,
        X: Features,
        Y: sp.spmatrix | sp.sparray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        points: np.ndarray | None = None,
        epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise XMLSparseError(f"batch size must be a positive integer, got {batch_size!r}")
        if X.shape[0] != Y.shape[0]:
            raise XMLSparseError(
                f"features have {X.shape[0]} rows but labels have {Y.shape[0]}; "
                "they must describe the same points"
            )
        if sp.issparse(X):
            self.X: Features = X.tocsr()
        elif isinstance(X, np.ndarray) and X.ndim == 2:
            self.X = X
        else:
            raise XMLSparseError(
                f"features must be a scipy sparse matrix or a 2-d numpy array, got {type(X).__name__}"
                + (f" with {X.ndim} dimensions" if isinstance(X, np.ndarray) else "")
            )
        if not sp.issparse(Y):
            raise XMLSparseError(f"labels must be a scipy sparse matrix, got {type(Y).__name__}")
        self.Y = Y.tocsr()
        if not self.Y.has_canonical_format:  # the losses need each label at most once per point
            self.Y = self.Y.copy()
            self.Y.sum_duplicates()
        n_rows = X.shape[0]
        if points is None:
            self.points = np.arange(n_rows, dtype=np.int64)
        else:
            self.points = np.asarray(points, dtype=np.int64)
            in_range = self.points.size == 0 or (self.points.min() >= 0 and self.points.max() < n_rows)
            if self.points.ndim != 1 or not in_range:
                raise XMLSparseError(
                    f"points must be a 1-d array of row numbers in [0, {n_rows}), got {points!r}"
                )
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        n = self.points.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (it seeds the order) and the batch of that epoch to start from."""
        if not 0 <= start_batch <= len(self):
            raise XMLSparseError(f"start batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self) -> np.ndarray:
        """The row numbers of the current epoch in the order they are visited."""
        if not self.shuffle:
            return self.points
        rng = np.random.default_rng((self.seed, self.epoch))
        return self.points[rng.permutation(self.points.size)]

    def __iter__(self) -> Iterator[Batch]:
        return map(self.batch, self.batch_rows())

    def batch_rows(self) -> Iterator[np.ndarray]:
        """The row numbers of each batch of the current epoch, from ``start_batch`` on."""
        order = self.order()
        for index in range(self.start_batch, len(self)):
            yield order[index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, rows: np.ndarray) -> Batch:
        """The batch made of ``rows`` (row numbers of the split), in that order."""
        labels = self.Y[rows]
        batch = Batch(
            y_indices=torch.from_numpy(labels.indices.astype(np.int64)),
            y_ptr=torch.from_numpy(labels.indptr.astype(np.int64)),
            points=np.asarray(rows, dtype=np.int64),
        )
        if sp.issparse(self.X):
            features = self.X[rows]
            batch.x_indices = torch.from_numpy(features.indices.astype(np.int64))
            batch.x_weights = torch.from_numpy(features.data.astype(np.float32))
            batch.x_offsets = torch.from_numpy(features.indptr[:-1].astype(np.int64))
        else:
            batch.x_dense = torch.from_numpy(np.ascontiguousarray(self.X[rows], dtype=np.float32))
        return batch


class _Failure:
    """What the producer thread of :func:`background` raised, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()  # the producer's last item: the iterable is exhausted


def background(iterable: Iterable[T], depth: int = 3) -> Iterator[T]:
    """The items of ``iterable`` in the same order, produced by a worker thread up to ``depth``
    items ahead of the consumer.

    The thread starts with the first ``next()``. An exception raised by ``iterable`` is re-raised
    here, with its type, message and traceback, when the consumer asks for the item it was making.
    When the consumer stops early (``break``, an exception in its loop, ``close()``), the worker is
    stopped and joined before the generator finishes; this waits at most for the item being made.
    ``iterable`` is iterated (and its iterator closed) in the worker thread only, so the caller
    must not use it meanwhile.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise XMLSparseError(f"background queue depth must be a positive integer, got {depth!r}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        # Checking before every put bounds the puts after a stop to the one already under way;
        # the consumer's final drain frees a slot for it, so the worker cannot block for good.
        if stop.is_set():
            return False
        ready.put(item)
        return True

    def produce() -> None:
        source = iter(iterable)
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 (any failure must reach the consumer, or it waits forever)
            put(_Failure(error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # a generator source is finished in the thread that runs it
                close()

    worker = threading.Thread(target=produce, name="xmlsparse-background", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        # Drop the items made ahead (pinned host memory, say) and free a slot for a worker that is
        # blocked inside put(); it sees the stop before its next put and ends.
        while True:
            try:
                ready.get_nowait()
            except queue.Empty:
                break
        worker.join()


class Prefetcher:
    """Moves the batches of ``iterable`` to ``device``.

    On CUDA a worker thread (:func:`background`) iterates ``iterable`` and pins each batch, up to
    ``depth`` batches ahead, so that the training loop never waits for the host to assemble one;
    the consuming thread only issues each pinned batch's non-blocking copy on a side stream, one
    batch ahead of the batch in use, and makes the current stream wait for that copy before the
    batch is handed out. The batches come in the order ``iterable`` gives them; an error raised
    while making one is raised when that batch is asked for, and stopping early stops the worker.
    ``iterable`` (e.g. a :class:`BatchIterator` after its ``set_epoch``) must not be changed while
    the iteration runs. Elsewhere batches pass through as they are, in the calling thread.
    """

    def __init__(self, iterable: Iterable[Batch], device: torch.device | str, depth: int = 3) -> None:
        self.iterable = iterable
        self.device = torch.device(device)
        self.depth = depth

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            yield from self.iterable
            return
        copy_stream = torch.cuda.Stream(device=self.device)
        device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()

        def pinned() -> Iterator[Batch]:
            # Runs in the worker thread, whose current device is 0 until set: pinning there would
            # otherwise create a CUDA context on GPU 0 for a run on another GPU.
            torch.cuda.set_device(device_index)
            for host in self.iterable:
                yield host.pin_memory()

        def copy(host: Batch) -> Batch:
            with torch.cuda.stream(copy_stream):
                return host.to(self.device, non_blocking=True)

        hosts = background(pinned(), self.depth)
        try:
            host = next(hosts, None)
            upcoming = None if host is None else copy(host)
            while upcoming is not None:
                compute_stream = torch.cuda.current_stream(self.device)
                compute_stream.wait_stream(copy_stream)
                current = upcoming
                current.record_stream(compute_stream)  # allocated on copy_stream, used on this one
                failure: Exception | None = None
                try:
                    host = next(hosts, None)
                    upcoming = None if host is None else copy(host)
                except Exception as error:  # noqa: BLE001 (re-raised below, one batch later)
                    # The next batch failed; hand out the current one first, so the error comes
                    # where the failing batch is consumed, as without prefetching.
                    failure, upcoming = error, None
                yield current
                if failure is not None:
                    raise failure
        finally:
            hosts.close()


def split_validation(
    n_points: int, fraction: float, seed: int = 0, max_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n_points)`` points, at most ``max_points``, chosen at random
    (seeded) for validation. Returns sorted int64 row numbers ``(train_idx, val_idx)``; fraction 0
    gives an empty validation set. The points held out are a prefix of one seeded permutation, so
    a cap keeps a subset of the uncapped split's points."""
    if not 0.0 <= fraction < 1.0:
        raise XMLSparseError(f"validation fraction must be in [0, 1), got {fraction!r}")
    if max_points is not None and max_points < 1:
        raise XMLSparseError(f"at most {max_points!r} validation points: expected a count of at least 1")
    n_val = int(round(fraction * n_points))
    if max_points is not None:
        n_val = min(n_val, max_points)
    if fraction > 0 and not 0 < n_val < n_points:
        raise XMLSparseError(
            f"validation fraction {fraction} of {n_points} points leaves {n_val} for validation "
            f"and {n_points - n_val} for training; both need at least one"
        )
    perm = np.random.default_rng(seed).permutation(n_points)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)
