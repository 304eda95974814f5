import json
import time

import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data import synthetic
from xmlsparse.data.synthetic import PRESETS, generate, resolve_shape
from xmlsparse.errors import XMLSparseError


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
    assert list(empty.iterdir()) == []


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
