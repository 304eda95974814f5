import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data.cache import CACHE_SUFFIX, load_cached
from xmlsparse.data.formats import load_split, read_xc_text, write_xc_text
from xmlsparse.data.types import XMCData


class CountingReader:
    """read_xc_text that counts how often the text is actually parsed."""

    def __init__(self, path: Path):
        self.path = path
        self.calls = 0

    def __call__(self) -> XMCData:
        self.calls += 1
        return read_xc_text(self.path)


def same(a: XMCData, b: XMCData) -> bool:
    def equal(m1, m2) -> bool:
        if isinstance(m1, np.ndarray) or isinstance(m2, np.ndarray):
            return np.array_equal(np.asarray(m1), np.asarray(m2))
        return m1.shape == m2.shape and (m1 != m2).nnz == 0

    return equal(a.X, b.X) and equal(a.Y, b.Y) and (a.n_features, a.n_labels) == (b.n_features, b.n_labels)


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("XMLSPARSE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def small_file(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "train.txt"
    path.write_text("3 5 4\n0,2 1:1 3:0.5\n 0:2\n3 4:1\n")
    return path


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    """About 20 MB of XC text: 30,000 points, ~60 features and 5 labels each."""
    rng = np.random.default_rng(0)
    n_points, n_features, n_labels = 30_000, 100_000, 5_000

    def random_rows(width: int, per_row: int) -> sp.csr_matrix:
        ids = np.sort(rng.integers(0, width, size=(n_points, per_row)), axis=1)
        keep = np.ones(ids.shape, dtype=bool)
        keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
        indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
        values = rng.integers(1, 40, size=int(indptr[-1])).astype(np.float32) / 8
        return sp.csr_matrix((values, ids[keep], indptr), shape=(n_points, width))

    labels = random_rows(n_labels, 5)
    labels.data[:] = 1.0
    path = tmp_path_factory.mktemp("big") / "train.txt"
    write_xc_text(path, XMCData(X=random_rows(n_features, 60), Y=labels, n_features=n_features, n_labels=n_labels))
    assert 15e6 < path.stat().st_size < 30e6
    return path


def test_second_load_is_at_least_ten_times_faster(big_file):
    read = CountingReader(big_file)
    start = time.perf_counter()
    parsed = load_cached([big_file], read)
    parse_seconds = time.perf_counter() - start

    cached_seconds = []
    for _ in range(3):
        start = time.perf_counter()
        cached = load_cached([big_file], read)
        cached_seconds.append(time.perf_counter() - start)
    assert read.calls == 1
    assert same(cached, parsed)
    assert cached.X.dtype == np.float32 and cached.Y.dtype == np.float32 and cached.Y.has_sorted_indices
    assert parse_seconds >= 10 * min(cached_seconds), (parse_seconds, cached_seconds)


def test_cache_sits_beside_the_source(small_file, private_cache_dir):
    read = CountingReader(small_file)
    first = load_cached([small_file], read)
    assert sorted(p.name for p in small_file.parent.iterdir()) == ["train.txt", "train.txt" + CACHE_SUFFIX]
    assert not private_cache_dir.exists()
    second = load_cached([small_file], read)
    assert read.calls == 1 and same(first, second)


def test_rebuilt_when_the_source_changes(small_file):
    read = CountingReader(small_file)
    load_cached([small_file], read)
    small_file.write_text("2 5 4\n1 0:1\n2 1:1\n")  # different size
    assert load_cached([small_file], read).n_points == 2 and read.calls == 2

    # same size, new content: the modification time tells
    stamp = small_file.stat().st_mtime_ns
    small_file.write_text("2 5 4\n3 0:1\n2 1:1\n")
    os.utime(small_file, ns=(stamp + 10**9, stamp + 10**9))
    assert load_cached([small_file], read).Y[0].indices.tolist() == [3] and read.calls == 3


def test_every_source_and_the_variant_count(tmp_path, small_file):
    other = tmp_path / "other.txt"
    other.write_text("x")
    read = CountingReader(small_file)
    load_cached([small_file, other], read)
    other.write_text("xy")
    load_cached([small_file, other], read)
    assert read.calls == 2
    load_cached([small_file, other], read, variant="another reader")
    assert read.calls == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_rebuilt(small_file, damage):
    read = CountingReader(small_file)
    expected = load_cached([small_file], read)
    cache = small_file.with_name(small_file.name + CACHE_SUFFIX)
    if damage == "garbage":
        cache.write_bytes(b"\x00not an npz archive at all")
    else:
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable data cache"):
        rebuilt = load_cached([small_file], read)
    assert same(rebuilt, expected) and read.calls == 2
    assert same(load_cached([small_file], read), expected) and read.calls == 2  # the cache was rewritten


def test_read_only_folder_uses_the_cache_dir(small_file, private_cache_dir):
    folder = small_file.parent
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        read = CountingReader(small_file)
        first = load_cached([small_file], read)
        second = load_cached([small_file], read)
        assert read.calls == 1 and same(first, second)
        assert [p.name for p in folder.iterdir()] == ["train.txt"]
        cached = list(private_cache_dir.iterdir())
        assert len(cached) == 1 and cached[0].name.startswith("train.txt.") and cached[0].name.endswith(CACHE_SUFFIX)
    finally:
        folder.chmod(stat.S_IRWXU)


def test_shared_data_set_is_cached_outside_its_folder(shared_datasets, private_cache_dir, tmp_path):
    # A read-only copy of its own: whether ../shared is writable where the tests run does not matter.
    folder = tmp_path / "bibtex"
    folder.mkdir()
    source = folder / "test.txt"
    shutil.copyfile(shared_datasets / "bibtex" / "test.txt", source)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        first = load_split(source)
        second = load_split(source)
        assert same(first, second) and first.n_points == 2515
        assert [p.name for p in folder.iterdir()] == ["test.txt"]
        assert len(list(private_cache_dir.glob("test.txt.*" + CACHE_SUFFIX))) == 1
    finally:
        folder.chmod(stat.S_IRWXU)


def test_dense_features_are_cached(tmp_path):
    source = tmp_path / "X.npy"
    source.write_bytes(b"stands for any source file")
    data = XMCData(
        X=np.arange(12, dtype=np.float32).reshape(4, 3),
        Y=sp.csr_matrix(np.eye(4, 2, dtype=np.float32)),
        n_features=3,
        n_labels=2,
    )
    assert same(load_cached([source], lambda: data), data)
    cached = load_cached([source], lambda: pytest.fail("the cache should have been used"))
    assert isinstance(cached.X, np.ndarray) and same(cached, data)
