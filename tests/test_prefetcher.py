"""The background producer behind the CUDA prefetcher: order, errors and clean stops, on CPU."""

import itertools
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlsparse.data.batches import BatchIterator, Prefetcher, background
from xmlsparse.errors import XMLSparseError


def make_split(n_points=37, n_features=30, n_labels=12, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n_points, n_features, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    Y = sp.random(n_points, n_labels, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    Y.data[:] = 1.0
    return X, Y


def wait_for_threads(count: int, timeout: float = 2.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def assert_same_batches(expected, got):
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.points, b.points)
        assert a.tensors().keys() == b.tensors().keys()
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, getattr(b, name))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_background_keeps_the_order_and_contents_of_the_batches(depth):
    X, Y = make_split()
    expected = list(BatchIterator(X, Y, batch_size=5, seed=2))
    assert_same_batches(expected, list(background(BatchIterator(X, Y, batch_size=5, seed=2), depth)))
    dense = np.random.default_rng(1).standard_normal((37, 6)).astype(np.float32)
    expected = list(BatchIterator(dense, Y, batch_size=4, seed=3))
    assert_same_batches(expected, list(background(BatchIterator(dense, Y, batch_size=4, seed=3), depth)))


def test_background_resumes_from_the_start_batch():
    X, Y = make_split()
    whole = list(BatchIterator(X, Y, batch_size=4, seed=5, epoch=2))
    iterator = BatchIterator(X, Y, batch_size=4, seed=5)
    iterator.set_epoch(2, start_batch=3)
    assert_same_batches(whole[3:], list(background(iterator, 2)))
    iterator.set_epoch(2, start_batch=len(iterator))
    assert list(background(iterator, 2)) == []


def test_background_of_nothing_and_of_plain_items():
    assert list(background([], 2)) == []
    assert list(background(range(1000), 3)) == list(range(1000))


def test_background_reraises_the_workers_error_where_its_item_is_consumed():
    before = threading.active_count()

    def source():
        yield from range(3)
        raise XMLSparseError("row 7 of the features is broken")

    got = []
    with pytest.raises(XMLSparseError, match="row 7 of the features is broken"):
        got.extend(background(source(), 2))  # keeps what was appended before the error
    assert got == [0, 1, 2]  # every item made before the failure is handed out first
    assert wait_for_threads(before) == before


def test_background_carries_the_errors_type_from_the_batch_iterator():
    X, Y = make_split()
    iterator = BatchIterator(X, Y, batch_size=4, shuffle=False)
    iterator.Y = iterator.Y[:10]  # rows past 10 no longer exist: scipy raises while slicing
    before = threading.active_count()
    got = []
    with pytest.raises(IndexError):
        got.extend(background(iterator, 2))
    assert [len(b.points) for b in got] == [4, 4]
    assert wait_for_threads(before) == before


def test_breaking_out_stops_and_joins_the_worker():
    before = threading.active_count()

    def consume_a_few():
        for i, _ in enumerate(background(itertools.count(), 2)):
            if i == 3:
                break

    consume_a_few()
    assert wait_for_threads(before) == before


def test_closing_releases_a_worker_blocked_on_a_full_queue():
    before = threading.active_count()
    items = background(itertools.count(), 1)
    assert next(items) == 0
    time.sleep(0.2)  # the worker has filled the one slot and now waits in put()
    assert threading.active_count() == before + 1
    started = time.monotonic()
    items.close()
    assert time.monotonic() - started < 1.0
    assert threading.active_count() == before  # close() joined the worker


def test_an_error_in_the_consumers_loop_stops_the_worker():
    before = threading.active_count()

    def train():
        for i in background(itertools.count(), 3):
            if i == 2:
                raise RuntimeError("the loss became nan")

    with pytest.raises(RuntimeError, match="nan"):
        train()
    assert wait_for_threads(before) == before


def test_a_generator_source_is_closed_when_the_consumer_stops():
    closed = threading.Event()

    def source():
        try:
            yield from itertools.count()
        finally:
            closed.set()

    items = background(source(), 2)
    next(items)
    items.close()
    assert closed.is_set()


def test_no_thread_starts_until_the_first_item_is_asked_for():
    before = threading.active_count()
    items = background(itertools.count(), 2)
    assert threading.active_count() == before
    del items


def test_background_depth_must_be_positive():
    with pytest.raises(XMLSparseError, match="depth"):
        next(background(range(3), 0))


def test_prefetcher_passes_batches_through_without_a_thread_off_cuda():
    X, Y = make_split()
    before = threading.active_count()
    got = []
    for batch in Prefetcher(BatchIterator(X, Y, batch_size=4, seed=1), "cpu"):
        assert threading.active_count() == before
        got.append(batch)
    assert_same_batches(list(BatchIterator(X, Y, batch_size=4, seed=1)), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetcher_on_cuda_matches_the_host_batches_resumes_and_stops_its_worker():
    X, Y = make_split()
    expected = list(BatchIterator(X, Y, batch_size=4, seed=1, epoch=1))
    iterator = BatchIterator(X, Y, batch_size=4, seed=1)
    iterator.set_epoch(1, start_batch=2)
    before = threading.active_count()
    got = [batch for batch in Prefetcher(iterator, "cuda")]
    torch.cuda.synchronize()
    assert len(got) == len(expected) - 2
    for a, b in zip(expected[2:], got):
        np.testing.assert_array_equal(a.points, b.points)
        for name, tensor in a.tensors().items():
            assert getattr(b, name).is_cuda and torch.equal(tensor, getattr(b, name).cpu())
    assert wait_for_threads(before) == before

    for i, _ in enumerate(Prefetcher(BatchIterator(X, Y, batch_size=4, seed=1), "cuda")):
        if i == 1:
            break
    assert wait_for_threads(before) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetcher_on_cuda_raises_the_assembly_error_at_the_failing_batch():
    X, Y = make_split()
    iterator = BatchIterator(X, Y, batch_size=4, shuffle=False)
    iterator.Y = iterator.Y[:10]
    before = threading.active_count()
    got = []
    with pytest.raises(IndexError):
        got.extend(Prefetcher(iterator, "cuda"))
    assert len(got) == 2
    assert wait_for_threads(before) == before
