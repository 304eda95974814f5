import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data import storage, synthetic
from xmlsparse.data.synthetic import PRESETS, estimate_footprint, generate, resolve_shape
from xmlsparse.errors import XMLSparseError

from cli_checks import cli, error_line, tree

SMALL = dict(features="dense", dim=16, n_train=300, n_test=100, n_labels=50, labels_per_point=2.0)


def _load(folder, split):
    x_dense = folder / f"X.{split}.npy"
    X = np.load(x_dense) if x_dense.exists() else sp.load_npz(folder / f"X.{split}.npz")
    return X, sp.load_npz(folder / f"Y.{split}.npz")


@pytest.fixture(scope="module")
def quickstart_sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quickstart")
    return {kind: generate(folder / kind, like="quickstart", features=kind, seed=0) for kind in ("dense", "bow")}


@pytest.mark.parametrize("features", ["dense", "bow"])
def test_quickstart_files_shapes_and_meta(quickstart_sets, features):
    folder = quickstart_sets[features]
    preset = PRESETS["quickstart"]
    width = preset.dim if features == "dense" else preset.n_features
    suffix = "npy" if features == "dense" else "npz"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["meta.json", "Y.trn.npz", "Y.tst.npz", f"X.trn.{suffix}", f"X.tst.{suffix}"]
    )
    for split, n_points in (("trn", preset.n_train), ("tst", preset.n_test)):
        X, Y = _load(folder, split)
        assert X.shape == (n_points, width) and X.dtype == np.float32
        assert Y.shape == (n_points, preset.n_labels) and Y.dtype == np.float32
        assert Y.has_sorted_indices and np.all(Y.data == 1.0)
        assert np.diff(Y.indptr).min() >= 1
        norms = np.linalg.norm(X, axis=1) if features == "dense" else sp.linalg.norm(X, axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "synthetic" and meta["like"] == "quickstart" and meta["features"] == features
    assert (meta["n_train"], meta["n_test"], meta["n_labels"], meta["n_features"]) == (
        preset.n_train, preset.n_test, preset.n_labels, width
    )
    assert (meta["propensity_a"], meta["propensity_b"], meta["seed"], meta["scale"]) == (0.55, 1.5, 0, 1.0)
    Y = sp.load_npz(folder / "Y.trn.npz")
    assert meta["labels_per_point"] == pytest.approx(Y.nnz / Y.shape[0], abs=1e-3)


def test_labels_per_point_and_power_law(quickstart_sets):
    folder = quickstart_sets["dense"]
    Y = sp.load_npz(folder / "Y.trn.npz")
    assert Y.nnz / Y.shape[0] == pytest.approx(5.45, rel=0.03)
    freq = np.sort(np.asarray(Y.sum(axis=0)).ravel())[::-1]
    top_share = freq[: len(freq) // 100].sum() / freq.sum()
    assert top_share > 0.12  # 1% of the labels hold over 12x their even share
    assert freq[0] > 50 * max(np.median(freq), 1)
    # label ids carry no popularity order: the most frequent labels are spread over the id range
    top_ids = np.argsort(-np.asarray(Y.sum(axis=0)).ravel())[:50]
    assert top_ids.max() - top_ids.min() > Y.shape[1] // 2


def test_bow_word_frequencies_are_power_law(quickstart_sets):
    X, _ = _load(quickstart_sets["bow"], "trn")
    assert X.has_sorted_indices and X.data.min() > 0
    assert 20 < X.nnz / X.shape[0] < 100
    doc_freq = np.sort(np.bincount(X.indices, minlength=X.shape[1]))[::-1]
    assert doc_freq[: len(doc_freq) // 100].sum() / doc_freq.sum() > 0.2


def _nearest_centroid_p1(X_train, Y_train, X_test, Y_test) -> float:
    """P@1 of the label whose (normalised) mean training point is closest to each test point."""
    centroids = sp.csr_matrix(Y_train.T @ X_train) if sp.issparse(X_train) else np.asarray(Y_train.T @ X_train)
    if sp.issparse(centroids):
        norms = np.sqrt(np.asarray(centroids.multiply(centroids).sum(axis=1)).ravel())
        scores = (X_test @ (sp.diags(1 / np.maximum(norms, 1e-12)) @ centroids).T).toarray()
    else:
        scores = X_test @ (centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)).T
    top = scores.argmax(axis=1)
    return float(np.asarray(Y_test[np.arange(Y_test.shape[0]), top]).mean())


@pytest.mark.parametrize("features", ["dense", "bow"])
def test_features_carry_the_label_signal(quickstart_sets, features):
    folder = quickstart_sets[features]
    X_train, Y_train = _load(folder, "trn")
    X_test, Y_test = _load(folder, "tst")
    most_frequent = np.asarray(Y_train.sum(axis=0)).ravel().argmax()
    baseline_p1 = float(Y_test[:, most_frequent].mean())
    model_p1 = _nearest_centroid_p1(X_train, Y_train, X_test, Y_test)
    assert model_p1 > max(2 * baseline_p1, baseline_p1 + 0.3), (model_p1, baseline_p1)
    assert model_p1 < 0.95  # learnable, not trivial


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    sizes = dict(n_train=700, n_test=200, n_labels=300, labels_per_point=3.0)
    for features, extra in (("dense", {"dim": 32}), ("bow", {"n_features": 800})):
        first = generate(tmp_path / f"{features}-a", features=features, seed=7, **sizes, **extra)
        again = generate(tmp_path / f"{features}-b", features=features, seed=7, **sizes, **extra)
        other = generate(tmp_path / f"{features}-c", features=features, seed=8, **sizes, **extra)
        for path in sorted(first.iterdir()):
            assert path.read_bytes() == (again / path.name).read_bytes(), path.name
            if path.name.startswith(("X.", "Y.")):
                assert path.read_bytes() != (other / path.name).read_bytes(), path.name


def test_many_blocks_assemble_into_valid_matrices(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK_POINTS", 97)
    folder = generate(tmp_path, features="bow", n_train=1000, n_test=150, n_labels=400, n_features=600,
                      labels_per_point=4.0)
    for split, n_points in (("trn", 1000), ("tst", 150)):
        X, Y = _load(folder, split)
        X.check_format(full_check=True)
        Y.check_format(full_check=True)
        assert X.shape == (n_points, 600) and Y.shape == (n_points, 400)
        np.testing.assert_allclose(sp.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert Y.nnz / Y.shape[0] == pytest.approx(4.0, rel=0.1)


def test_failure_leaves_previous_set_intact_and_no_partial_files(tmp_path, monkeypatch):
    folder = generate(tmp_path, features="dense", dim=16, n_train=300, n_test=100, n_labels=50,
                      labels_per_point=2.0, seed=1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_dense_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, features="dense", dim=16, n_train=300, n_test=100, n_labels=50,
                 labels_per_point=2.0, seed=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    empty = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        generate(empty, features="dense", dim=16, n_train=300, n_test=100, n_labels=50, labels_per_point=2.0)
    assert not empty.exists()  # the folder the call created goes too


def test_features_of_the_other_kind_are_replaced(tmp_path):
    sizes = dict(n_train=100, n_test=50, n_labels=40, labels_per_point=2.0)
    generate(tmp_path, features="dense", dim=8, **sizes)
    generate(tmp_path, features="bow", n_features=300, **sizes)
    assert not (tmp_path / "X.trn.npy").exists() and not (tmp_path / "X.tst.npy").exists()
    assert sp.load_npz(tmp_path / "X.trn.npz").shape == (100, 300)


def test_small_copy_of_amazon_670k(tmp_path):
    start = time.perf_counter()
    folder = generate(tmp_path / "dense", like="amazon-670k", scale=0.001)
    assert time.perf_counter() - start < 10
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["n_train"], meta["n_test"], meta["n_labels"], meta["n_features"]) == (490, 153, 670, 768)
    assert (meta["name"], meta["propensity_a"], meta["propensity_b"]) == ("synthetic-amazon-670k", 0.6, 2.6)
    X, Y = _load(folder, "trn")
    assert X.shape == (490, 768) and Y.shape == (490, 670)
    assert Y.nnz / Y.shape[0] == pytest.approx(5.45, rel=0.1)

    bow = generate(tmp_path / "bow", like="amazon-670k", scale=0.001, features="bow")
    assert _load(bow, "tst")[0].shape == (153, 135_909)


def test_explicit_sizes_override_the_imitated_set():
    shape = resolve_shape("eurlex-4k", scale=0.5, n_labels=100, features="bow")
    assert (shape.n_train, shape.n_test, shape.n_labels, shape.n_features) == (7770, 1904, 100, 5000)
    assert shape.labels_per_point == 5.31


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"like": "amazon-9m"}, "amazon-9m"),
        ({"n_test": 10, "n_labels": 10, "labels_per_point": 2.0}, "n_train"),
        ({"like": "quickstart", "n_features": 100}, "n_features=100"),
        ({"like": "quickstart", "features": "bow", "dim": 64}, "dim=64"),
        ({"like": "quickstart", "labels_per_point": 5000.0}, "labels_per_point"),
        ({"like": "quickstart", "features": "tfidf"}, "tfidf"),
        ({"like": "quickstart", "scale": 0.0}, "scale"),
        ({"like": "quickstart", "n_train": 0}, "n_train"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(XMLSparseError, match=message):
        resolve_shape(**kwargs)


# ---------------------------------------------------------------- room, writability and clean-up


def must_not_run(*args):
    raise AssertionError("reached a step that the failed check should have prevented")


@pytest.mark.parametrize("short_of", ["disk", "memory"])
def test_a_set_larger_than_the_free_disk_or_memory_is_refused_before_any_work(tmp_path, monkeypatch, short_of):
    monkeypatch.setattr(storage, "free_disk_bytes", lambda path: 2**20 if short_of == "disk" else 2**50)
    monkeypatch.setattr(storage, "available_memory_bytes", lambda: 2**20 if short_of == "memory" else 2**50)
    monkeypatch.setattr(synthetic, "_build_models", must_not_run)  # refused before the models are built
    need = estimate_footprint(resolve_shape(like="quickstart"))
    needed, free = (need.disk_bytes, "1.0 MiB are free") if short_of == "disk" else (need.memory_bytes, "1.0 MiB are")
    out = tmp_path / "new" / "set"
    with pytest.raises(XMLSparseError) as caught:
        generate(out, like="quickstart")
    message = str(caught.value)
    assert f"about {storage.format_bytes(needed)} of {short_of}, but {free}" in message
    assert "4,000 train and 1,000 test points" in message
    assert tree(tmp_path) == []


def test_synth_like_amazon_3m_at_scale_100_is_refused_with_both_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "free_disk_bytes", lambda path: 10 * 2**30)
    monkeypatch.setattr(storage, "available_memory_bytes", lambda: 24 * 2**30)
    need = estimate_footprint(resolve_shape(like="amazon-3m", scale=100))
    assert need.disk_bytes > 700 * 2**30 and need.memory_bytes > 100 * 2**30
    line = error_line(cli("synth", "--like", "amazon-3m", "--scale", "100", "--out", tmp_path / "big"))
    assert f"about {storage.format_bytes(need.disk_bytes)} of disk, but 10.0 GiB are free at {tmp_path}" in line
    assert f"about {storage.format_bytes(need.memory_bytes)} of memory, but 24.0 GiB are available" in line
    assert "281,228,100 labels" in line
    assert tree(tmp_path) == []


def test_available_memory_reads_meminfo_or_else_the_free_pages(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684084 kB\nMemFree:         1000 kB\nMemAvailable:    2048 kB\n")
    monkeypatch.setattr(storage, "MEMINFO", meminfo)
    assert storage.available_memory_bytes() == 2 * 2**20
    monkeypatch.setattr(storage, "MEMINFO", tmp_path / "missing")
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        assert storage.available_memory_bytes() > 0
    else:
        assert storage.available_memory_bytes() is None


def test_memory_and_disk_estimates_bound_what_a_run_takes(tmp_path):
    # Many labels: the label and loading tables dominate, as they do at the full shapes. The peak
    # is tracemalloc's (numpy reports its buffers to it), not the resident size: that one also
    # grows with whatever the process imports or the allocator keeps, which varies by machine.
    script = textwrap.dedent(
        """
        import json, sys, tracemalloc
        from xmlsparse.data import synthetic
        sizes = dict(n_train=1000, n_test=300, n_labels=300_000, labels_per_point=5.0)
        tracemalloc.start()
        synthetic.generate(sys.argv[1], **sizes)
        grown = tracemalloc.get_traced_memory()[1]
        print(json.dumps({"grown": grown, **vars(synthetic.estimate_footprint(
            synthetic.resolve_shape(**sizes)))}))
        """
    )
    out = tmp_path / "set"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout)
    assert measured["grown"] <= measured["memory_bytes"] <= 2 * measured["grown"], measured
    written = sum(p.stat().st_size for p in out.iterdir())
    assert written <= measured["output_bytes"] <= 1.2 * written
    assert measured["disk_bytes"] >= measured["output_bytes"]


def test_progress_counts_every_point(tmp_path, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(synthetic, "tqdm", Bar)
    monkeypatch.setattr(synthetic, "BLOCK_POINTS", 64)
    generate(tmp_path, **SMALL)
    assert [(bar.total, bar.n) for bar in bars] == [(400, 400)]


def failing_after(calls: int, error: BaseException, real):
    """A stand-in for a block writer that raises ``error`` on call number ``calls``."""
    count = [0]

    def block(*args):
        count[0] += 1
        if count[0] == calls:
            raise error
        return real(*args)

    return block


@pytest.mark.parametrize("features", ["dense", "bow"])
def test_an_error_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, features):
    monkeypatch.setattr(synthetic, "BLOCK_POINTS", 64)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    writer = "_dense_block" if features == "dense" else "_bow_block"
    monkeypatch.setattr(synthetic, writer, failing_after(4, full, getattr(synthetic, writer)))
    sizes = {**SMALL, "features": features, "dim": 16 if features == "dense" else None}
    if features == "bow":
        sizes["n_features"] = 200
    out = tmp_path / "new" / "set"
    with pytest.raises(XMLSparseError, match=f"writing the synthetic set into {out} failed: No space left"):
        generate(out, **sizes)
    assert tree(tmp_path) == []


def test_synth_interrupted_mid_write_exits_130_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK_POINTS", 64)
    monkeypatch.setattr(synthetic, "_dense_block", failing_after(3, KeyboardInterrupt(), synthetic._dense_block))
    out = tmp_path / "set"
    result = cli("synth", "--n-train", 300, "--n-test", 100, "--n-labels", 50, "--labels-per-point", 2,
                 "--dim", 16, "--out", out)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == f"interrupted: {out} is as it was before"
    assert tree(tmp_path) == []


def test_synth_disk_full_mid_write_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK_POINTS", 64)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(synthetic, "_dense_block", failing_after(5, full, synthetic._dense_block))
    out = tmp_path / "set"
    line = error_line(cli("synth", "--n-train", 300, "--n-test", 100, "--n-labels", 50, "--labels-per-point", 2,
                          "--dim", 16, "--out", out))
    assert line == f"error: writing the synthetic set into {out} failed: No space left on device"
    assert tree(tmp_path) == []


@pytest.mark.parametrize("case", ["file", "under-a-file", "read-only", "under-read-only"])
def test_synth_out_that_cannot_be_written_fails_before_any_work(tmp_path, read_only_folder, monkeypatch, case):
    monkeypatch.setattr(synthetic, "check_room", must_not_run)  # the path is checked first
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    out, expected = {
        "file": (a_file, f"output folder {a_file} exists and is not a folder"),
        "under-a-file": (a_file / "set", f"output folder {a_file / 'set'} cannot be created: {a_file} is not a folder"),
        "read-only": (read_only_folder, f"output folder {read_only_folder} is not writable"),
        "under-read-only": (
            read_only_folder / "a" / "set",
            f"output folder {read_only_folder / 'a' / 'set'} cannot be created: {read_only_folder} is not writable",
        ),
    }[case]
    before = tree(tmp_path)
    line = error_line(cli("synth", "--like", "quickstart", "--out", out))
    assert line == f"error: {expected}"
    assert tree(tmp_path) == before and a_file.read_text() == "keep me"
