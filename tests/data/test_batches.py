import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlsparse.data.batches import Batch, BatchIterator, Prefetcher, split_validation
from xmlsparse.errors import XMLSparseError


def make_split(n_points=23, n_features=40, n_labels=15, seed=0):
    """Random BoW features and labels; some points have no labels and some no features."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_points, n_features, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    Y = sp.random(n_points, n_labels, density=0.15, format="csr", dtype=np.float32, random_state=rng)
    Y.data[:] = 1.0
    keep_features, keep_labels = np.ones(n_points, np.float32), np.ones(n_points, np.float32)
    keep_features[3] = keep_labels[5] = 0
    X, Y = (sp.diags(keep_features) @ X).tocsr(), (sp.diags(keep_labels) @ Y).tocsr()
    for matrix in (X, Y):
        matrix.eliminate_zeros()
        matrix.sort_indices()
    assert X[3].nnz == 0 and Y[5].nnz == 0
    return X, Y


def labels_of(batch: Batch, row: int) -> list[int]:
    ptr = batch.y_ptr.tolist()
    return batch.y_indices[ptr[row] : ptr[row + 1]].tolist()


def visited(iterator: BatchIterator) -> np.ndarray:
    return np.concatenate([batch.points for batch in iterator])


def test_bow_batches_match_the_rows_they_name():
    X, Y = make_split()
    for batch in BatchIterator(X, Y, batch_size=4, seed=3):
        assert batch.feature_kind == "bow" and batch.x_dense is None
        assert batch.x_indices.dtype == torch.int64 and batch.x_weights.dtype == torch.float32
        assert batch.x_offsets.dtype == torch.int64 and batch.y_ptr.dtype == torch.int64
        assert batch.x_offsets.shape == (batch.size,) and batch.y_ptr.shape == (batch.size + 1,)
        bounds = batch.x_offsets.tolist() + [batch.x_indices.numel()]
        for row, point in enumerate(batch.points):
            start, stop = bounds[row], bounds[row + 1]
            assert batch.x_indices[start:stop].tolist() == X[point].indices.tolist()
            np.testing.assert_array_equal(batch.x_weights[start:stop].numpy(), X[point].data)
            assert labels_of(batch, row) == Y[point].indices.tolist()


def test_dense_batches_from_an_array_and_a_memmap(tmp_path):
    _, Y = make_split()
    dense = np.random.default_rng(1).standard_normal((Y.shape[0], 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", dense)
    for X in (dense, np.load(tmp_path / "x.npy", mmap_mode="r")):
        batches = list(BatchIterator(X, Y, batch_size=5, seed=0))
        for batch in batches:
            assert batch.feature_kind == "dense" and batch.x_indices is None
            assert batch.x_dense.dtype == torch.float32 and batch.x_dense.shape == (batch.size, 6)
            np.testing.assert_array_equal(batch.x_dense.numpy(), dense[batch.points])
            for row, point in enumerate(batch.points):
                assert labels_of(batch, row) == Y[point].indices.tolist()


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_point_once_per_epoch(drop_last):
    X, Y = make_split()
    iterator = BatchIterator(X, Y, batch_size=5, seed=0, drop_last=drop_last)
    batches = list(iterator)
    assert len(batches) == len(iterator) == (4 if drop_last else 5)
    order = visited(iterator)
    if drop_last:
        assert all(b.size == 5 for b in batches) and len(set(order)) == 20
    else:
        assert sorted(order) == list(range(23))
        assert [b.size for b in batches] == [5, 5, 5, 5, 3]


def test_order_depends_on_seed_and_epoch_only():
    X, Y = make_split()
    first = BatchIterator(X, Y, batch_size=4, seed=7)
    again = BatchIterator(X, Y, batch_size=4, seed=7)
    np.testing.assert_array_equal(visited(first), visited(again))
    np.testing.assert_array_equal(visited(first), visited(first))  # iterating twice repeats the epoch
    epoch0 = visited(first)
    first.set_epoch(1)
    assert not np.array_equal(visited(first), epoch0)
    other_seed = BatchIterator(X, Y, batch_size=4, seed=8)
    assert not np.array_equal(visited(other_seed), epoch0)
    resumed = BatchIterator(X, Y, batch_size=4, seed=7, epoch=1)
    np.testing.assert_array_equal(visited(resumed), visited(first))


def test_start_batch_gives_the_tail_of_the_same_order():
    X, Y = make_split()
    full = BatchIterator(X, Y, batch_size=4, seed=2)
    full.set_epoch(3)
    batches = list(full)
    resumed = BatchIterator(X, Y, batch_size=4, seed=2)
    resumed.set_epoch(3, start_batch=2)
    tail = list(resumed)
    assert len(tail) == len(batches) - 2
    for expected, got in zip(batches[2:], tail):
        np.testing.assert_array_equal(expected.points, got.points)
        assert torch.equal(expected.x_indices, got.x_indices)
        assert torch.equal(expected.y_indices, got.y_indices)
    resumed.set_epoch(3, start_batch=len(resumed))
    assert list(resumed) == []
    with pytest.raises(XMLSparseError, match="start batch"):
        resumed.set_epoch(3, start_batch=len(resumed) + 1)


def test_no_shuffle_keeps_row_order_and_points_restrict_rows():
    X, Y = make_split()
    assert visited(BatchIterator(X, Y, batch_size=6, shuffle=False)).tolist() == list(range(23))
    subset = np.array([20, 2, 11, 7])
    assert sorted(visited(BatchIterator(X, Y, batch_size=3, points=subset))) == sorted(subset)
    with pytest.raises(XMLSparseError, match="row numbers"):
        BatchIterator(X, Y, batch_size=3, points=np.array([0, 23]))


def test_bad_inputs_are_named():
    X, Y = make_split()
    with pytest.raises(XMLSparseError, match="same points"):
        BatchIterator(X[:10], Y, batch_size=4)
    with pytest.raises(XMLSparseError, match="batch size"):
        BatchIterator(X, Y, batch_size=0)
    with pytest.raises(XMLSparseError, match="labels must be a scipy sparse"):
        BatchIterator(X, Y.toarray(), batch_size=4)


def test_batch_to_and_prefetcher_on_cpu():
    X, Y = make_split()
    batch = next(iter(BatchIterator(X, Y, batch_size=4)))
    moved = batch.to("cpu")
    assert torch.equal(moved.x_indices, batch.x_indices) and moved.points is batch.points
    batches = list(BatchIterator(X, Y, batch_size=4, seed=1))
    prefetched = list(Prefetcher(BatchIterator(X, Y, batch_size=4, seed=1), "cpu"))
    assert len(prefetched) == len(batches)
    for a, b in zip(batches, prefetched):
        np.testing.assert_array_equal(a.points, b.points)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetcher_on_cuda_copies_every_batch():
    X, Y = make_split()
    expected = list(BatchIterator(X, Y, batch_size=4, seed=1))
    got = list(Prefetcher(BatchIterator(X, Y, batch_size=4, seed=1), "cuda"))
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert b.x_indices.is_cuda and b.y_ptr.is_cuda
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, getattr(b, name).cpu())


def test_split_validation_is_seeded_disjoint_and_complete():
    train, val = split_validation(100, 0.1, seed=4)
    assert len(val) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    again_train, again_val = split_validation(100, 0.1, seed=4)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(split_validation(100, 0.1, seed=5)[1], val)
    train, val = split_validation(100, 0.0, seed=4)
    assert len(val) == 0 and len(train) == 100
    with pytest.raises(XMLSparseError, match="fraction"):
        split_validation(100, 1.0)
    with pytest.raises(XMLSparseError, match="at least one"):
        split_validation(3, 0.01)


def test_split_validation_caps_the_points_held_out_with_a_subset_of_the_share():
    train, val = split_validation(1000, 0.1, seed=3, max_points=25)
    assert len(val) == 25 and len(train) == 975
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(1000))
    _, uncapped = split_validation(1000, 0.1, seed=3)
    assert set(val.tolist()) <= set(uncapped.tolist())
    # A cap above the share changes nothing.
    np.testing.assert_array_equal(split_validation(1000, 0.1, seed=3, max_points=100)[1], uncapped)
    with pytest.raises(XMLSparseError, match="at most 0 validation points"):
        split_validation(1000, 0.1, max_points=0)
