import gzip
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data.formats import (
    XMCData,
    load_label_map,
    load_split,
    read_attentionxml,
    read_csr_npz,
    read_npy_features,
    read_npz_pair,
    read_split_text,
    read_xc_text,
    save_label_map,
    with_npy_features,
    write_npz_pair,
    write_xc_text,
)
from xmlsparse.errors import XMLSparseError


def write_text(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_bytes(text.encode())
    return path


def dense(matrix) -> list:
    return matrix.toarray().tolist()


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XMLSPARSE_CACHE_DIR", str(tmp_path / "cache"))


# --- the real data sets beside the repository ------------------------------------------------


@pytest.mark.parametrize("split, n_points", [("train", 4880), ("test", 2515)])
def test_bibtex_matches_its_headers(shared_datasets, split, n_points):
    path = shared_datasets / "bibtex" / f"{split}.txt"
    data = read_xc_text(path)
    assert (data.n_points, data.n_features, data.n_labels) == (n_points, 1836, 159)
    assert data.X.shape == (n_points, 1836) and data.Y.shape == (n_points, 159)
    assert data.X.dtype == np.float32 and data.Y.dtype == np.float32
    assert data.Y.has_sorted_indices and data.X.has_sorted_indices
    assert np.all(data.Y.data == 1.0)
    assert data.Y.getnnz(axis=1).min() >= 1  # every bibtex point has a label
    assert 2.3 < data.Y.nnz / n_points < 2.5  # 2.40 labels a point on average

    # the first point, parsed by hand from line 2
    first = path.read_text().split("\n")[1].split()
    labels = sorted(int(label) for label in first[0].split(","))
    features = {int(f): float(v) for f, v in (token.split(":") for token in first[1:])}
    assert data.Y[0].indices.tolist() == labels
    assert dict(zip(data.X[0].indices.tolist(), data.X[0].data.tolist())) == features


@pytest.mark.parametrize("split, n_points, n_unlabelled", [("train", 12920, 12), ("test", 3185, 2)])
def test_delicious_matches_its_headers(shared_datasets, split, n_points, n_unlabelled):
    path = shared_datasets / "delicious" / f"{split}.txt"
    data = read_xc_text(path)
    assert (data.n_points, data.n_features, data.n_labels) == (n_points, 500, 983)
    assert data.X.shape == (n_points, 500) and data.Y.shape == (n_points, 983)
    unlabelled = np.flatnonzero(data.Y.getnnz(axis=1) == 0)
    # the README counts 14 points without a label over both splits: 12 in train, 2 in test
    assert unlabelled.size == n_unlabelled
    lines = path.read_text().split("\n")[1:]
    assert unlabelled.tolist() == [i for i, line in enumerate(lines) if line.startswith(" ")]
    assert data.X[unlabelled].nnz > 0  # those points still have their features


def test_amazon_sample_attentionxml(shared_datasets):
    folder = shared_datasets / "amazon-670k-sample"
    train, label_map, vectorizer = read_attentionxml(folder / "train_texts.txt", folder / "train_labels.txt")
    label_lines = (folder / "train_labels.txt").read_text().split("\n")[:200]
    assert train.n_points == 200 and train.X.shape == (200, train.n_features)
    first_seen = list(dict.fromkeys(label for line in label_lines for label in line.split()))
    assert list(label_map) == first_seen and list(label_map.values()) == list(range(len(first_seen)))
    assert train.n_labels == len(label_map) == train.Y.shape[1]
    names = {i: label for label, i in label_map.items()}
    assert sorted(names[i] for i in train.Y[0].indices) == sorted(label_lines[0].split())
    assert train.X.dtype == np.float32 and train.X.has_sorted_indices
    assert np.allclose(sp.linalg.norm(train.X, axis=1), 1.0, atol=1e-5)  # tf-idf rows are l2-normalised

    with pytest.warns(UserWarning, match="test_labels.txt: dropped [0-9]+ label occurrences"):
        test, test_map, _ = read_attentionxml(
            folder / "test_texts.txt", folder / "test_labels.txt", label_map, vectorizer
        )
    assert test_map is label_map
    assert test.n_points == 200 and test.X.shape == (200, train.n_features) and test.Y.shape == (200, train.n_labels)


# --- hand-made edge cases -----------------------------------------------------------------------


def test_unlabelled_points_trailing_spaces_and_blank_last_line(tmp_path):
    path = write_text(tmp_path, "train.txt", "4 5 3\n0,2 1:1 3:0.5  \n 0:2\n1 \n2 4:1   \n\n")
    data = read_xc_text(path)
    assert (data.n_points, data.n_features, data.n_labels) == (4, 5, 3)
    assert dense(data.Y) == [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert dense(data.X) == [[0, 1, 0, 0.5, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]


def test_blank_lines_are_points_without_labels_or_features(tmp_path):
    path = write_text(tmp_path, "train.txt", "4 4 2\n0 1:1\n\n1 2:1\n\n")
    data = read_xc_text(path)
    assert data.n_points == 4
    assert dense(data.Y) == [[1, 0], [0, 0], [0, 1], [0, 0]]
    assert data.X.getnnz(axis=1).tolist() == [1, 0, 1, 0]


def test_label_listed_twice_counts_once(tmp_path):
    data = read_xc_text(write_text(tmp_path, "train.txt", "1 2 3\n2,0,2 1:1\n"))
    assert data.Y.indices.tolist() == [0, 2] and data.Y.data.tolist() == [1.0, 1.0]


def test_xc_text_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(50, 30, density=0.2, format="csr", dtype=np.float32, random_state=1)
    X.data = rng.standard_normal(X.nnz).astype(np.float32)
    Y = sp.random(50, 12, density=0.15, format="csr", dtype=np.float32, random_state=2)
    Y.data[:] = 1.0
    X = sp.csr_matrix(X.multiply(np.arange(50)[:, None] % 7 != 0))  # some points without features
    original = XMCData(X=X, Y=Y, n_features=40, n_labels=20)  # header counts beyond the largest ids
    path = tmp_path / "round.txt"
    write_xc_text(path, original)
    read = read_xc_text(path)
    assert (read.n_points, read.n_features, read.n_labels) == (50, 40, 20)
    assert (read.X[:, :30] != X).nnz == 0 and read.X[:, 30:].nnz == 0  # float32 values survive exactly
    assert (read.Y[:, :12] != Y).nnz == 0 and read.Y[:, 12:].nnz == 0
    assert [p.name for p in tmp_path.iterdir()] == ["round.txt"]


def test_write_failure_leaves_the_old_file(tmp_path):
    path = write_text(tmp_path, "keep.txt", "1 1 1\n0 0:1\n")
    broken = XMCData(X=sp.csr_matrix((3, 2), dtype=np.float32), Y=sp.csr_matrix((2, 2), dtype=np.float32),
                     n_features=2, n_labels=2)
    with pytest.raises(ValueError):
        write_xc_text(path, broken)
    assert path.read_text() == "1 1 1\n0 0:1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_split_format_keeps_relevance(tmp_path):
    features = write_text(tmp_path, "trn_X_Xf.txt", "3 6\n0:1 5:0.5\n\n2:1 \n")
    labels = write_text(tmp_path, "trn_X_Y.txt", "3 4\n0:1 3:0.25\n1:2\n\n")
    data = read_split_text(features, labels)
    assert (data.n_points, data.n_features, data.n_labels) == (3, 6, 4)
    assert dense(data.Y) == [[1, 0, 0, 0.25], [0, 2, 0, 0], [0, 0, 0, 0]]
    assert data.X.getnnz(axis=1).tolist() == [2, 0, 1]


def test_npz_pair_round_trip_sparse_and_dense(tmp_path):
    X = sp.random(20, 9, density=0.3, format="csr", dtype=np.float32, random_state=0)
    Y = sp.random(20, 7, density=0.3, format="csr", dtype=np.float32, random_state=1)
    write_npz_pair(tmp_path / "X.trn.npz", tmp_path / "Y.trn.npz", XMCData(X=X, Y=Y, n_features=9, n_labels=7))
    data = read_npz_pair(tmp_path / "X.trn.npz", tmp_path / "Y.trn.npz")
    assert (data.X != X).nnz == 0 and (data.Y != Y).nnz == 0 and (data.n_features, data.n_labels) == (9, 7)

    rows = np.arange(60, dtype=np.float64).reshape(20, 3)
    write_npz_pair(tmp_path / "X.tst.npy", tmp_path / "Y.tst.npz", XMCData(X=rows, Y=Y, n_features=3, n_labels=7))
    data = read_npz_pair(tmp_path / "X.tst.npy", tmp_path / "Y.tst.npz")
    assert data.X.dtype == np.float32 and np.array_equal(data.X, rows) and data.n_features == 3
    assert np.array_equal(read_npy_features(tmp_path / "X.tst.npy"), rows)


def test_with_npy_features_replaces_bow(tmp_path):
    bow = read_xc_text(write_text(tmp_path, "train.txt", "2 3 2\n0 1:1\n1 2:1\n"))
    np.save(tmp_path / "train.npy", np.ones((2, 5), dtype=np.float32))
    data = with_npy_features(bow, tmp_path / "train.npy", tmp_path / "train.txt")
    assert data.X.shape == (2, 5) and data.n_features == 5 and data.Y is bow.Y


def test_label_map_round_trip(tmp_path):
    label_map = {"b": 0, "a/1": 1, "ünï": 2}
    save_label_map(tmp_path / "label_map.txt", label_map)
    assert (tmp_path / "label_map.txt").read_text(encoding="utf-8") == "b\na/1\nünï\n"
    assert load_label_map(tmp_path / "label_map.txt") == label_map


SMALL_XC = b"3 5 4\n0,2 1:1 3:0.5\n 0:2\n3 4:1\n"
BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    "name, content",
    [
        ("train.txt", BOM + SMALL_XC),
        ("train.txt.gz", gzip.compress(SMALL_XC)),
        ("train.txt", gzip.compress(SMALL_XC)),  # compressed, though named as plain text
        ("train.txt.gz", gzip.compress(BOM + SMALL_XC)),
    ],
    ids=["bom", "gz", "gz-named-txt", "gz-bom"],
)
def test_byte_order_mark_and_gzip_are_read_transparently(tmp_path, name, content):
    expected = read_xc_text(write_text(tmp_path, "plain.txt", SMALL_XC.decode()))
    path = tmp_path / name
    path.write_bytes(content)
    for data in (read_xc_text(path), load_split(path), load_split(path)):  # the last one from the cache
        assert (data.n_points, data.n_features, data.n_labels) == (3, 5, 4)
        assert dense(data.X) == dense(expected.X) and dense(data.Y) == dense(expected.Y)


def test_gzip_split_files_and_attentionxml_with_a_byte_order_mark(tmp_path):
    (tmp_path / "trn_X_Xf.txt.gz").write_bytes(gzip.compress(BOM + b"2 3\n0:1\n1:1\n"))
    (tmp_path / "trn_X_Y.txt.gz").write_bytes(gzip.compress(b"2 2\n1:1\n0:3\n"))
    assert dense(load_split(tmp_path / "trn_X_Xf.txt.gz").Y) == [[0, 1], [3, 0]]  # the partner is found by name

    (tmp_path / "train_texts.txt").write_bytes(BOM + b"red apple\ngreen pear\n")
    (tmp_path / "train_labels.txt").write_bytes(BOM + b"fruit red\nfruit\n")
    _, label_map, vectorizer = read_attentionxml(tmp_path / "train_texts.txt", tmp_path / "train_labels.txt")
    assert list(label_map) == ["fruit", "red"] and "red" in vectorizer.vocabulary_


def test_load_split_dispatches_on_names(tmp_path):
    xc = write_text(tmp_path, "eurlex_train.txt", "2 3 2\n0 1:1\n1 2:1\n")
    assert dense(load_split(xc).Y) == [[1, 0], [0, 1]]

    write_text(tmp_path, "trn_X_Xf.txt", "2 3\n0:1\n1:1\n")
    write_text(tmp_path, "trn_X_Y.txt", "2 2\n1:1\n0:3\n")
    assert dense(load_split(tmp_path / "trn_X_Xf.txt").Y) == [[0, 1], [3, 0]]

    Y = sp.csr_matrix(np.eye(2, dtype=np.float32))
    write_npz_pair(tmp_path / "X.trn.npz", tmp_path / "Y.trn.npz", XMCData(X=Y, Y=Y, n_features=2, n_labels=2))
    assert load_split([tmp_path / "X.trn.npz", tmp_path / "Y.trn.npz"]).n_points == 2
    assert load_split(tmp_path / "X.trn.npz").n_labels == 2

    write_text(tmp_path, "train_texts.txt", "red apple\ngreen pear\n")
    write_text(tmp_path, "train_labels.txt", "fruit red\nfruit\n")
    write_text(tmp_path, "test_texts.txt", "red pear\n")
    write_text(tmp_path, "test_labels.txt", "red blue\n")
    train = load_split(tmp_path / "train_texts.txt")
    assert dense(train.Y) == [[1, 1], [1, 0]]
    with pytest.warns(UserWarning, match="dropped 1 label occurrences"):
        test = load_split([tmp_path / "test_texts.txt", tmp_path / "test_labels.txt"])
    assert dense(test.Y) == [[0, 1]] and test.n_features == train.n_features


# --- bad input: one XMLSparseError naming the file and the line or key ----------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5 4 3\n0 1:1\n1 2:1\n", "the header (line 1) says N=5 points but the body has only 2 lines"),
        ("2 4 3\n0 1:1\n1 2:1\n2 3:1\n", "line 4: the header (line 1) says N=2 points but the body goes on"),
        ("3 4 5\n0 1:1\n1,7 2:1\n0 3:1\n", "line 3: label id 7 >= L=5 from the header"),
        ("2 4 3\n0 1:1 9:1\n1 2:1\n", "line 2: feature id 9 >= D=4 from the header"),
        ("2 4 3\n0 1:1\n1 1:abc\n", "line 3: value 'abc' of feature 1 is not a number"),
        ("2 4 3\n0 1:1\nx,1 2:1\n", "line 3: label id 'x' is not a non-negative integer"),
        ("2 4 3\n0 1:1\n-1 2:1\n", "line 3: label id '-1' is not a non-negative integer"),
        ("2 4 3\n0 3:1 1:1\n1 2:1\n", "line 2: feature ids must be increasing and unique (1 after 3)"),
        ("2 4 3\n0 1:1\n1 two:1\n", "line 3: feature id 'two' is not a non-negative integer"),
        ("2 4 3\n0 1:1\n1 2:1 3\n", "line 3: token '3' is not 'feature_id:value'"),
        ("", "is empty; expected a header line 'N D L'"),
        ("2 4\n0 1:1\n1 2:1\n", "line 1: expected the header 'N D L' (points, features, labels), found '2 4'"),
        ("2 four 3\n0 1:1\n", "line 1: expected the header 'N D L'"),
        ("1 0 3\n0\n", "line 1: header field D=0; expected a positive count"),
        ("2 4 3\n0 1:1\n1 0:1 2:nan\n", "line 3: value 'nan' of feature 2 is not finite; expected a finite number"),
        ("2 4 3\n0 1:-inf\n1 2:1\n", "line 2: value '-inf' of feature 1 is not finite"),
        ("2 4 3\n0 1:1 3:1e999\n1 2:1\n", "line 2: value '1e999' of feature 3 is not finite"),
    ],
)
def test_bad_xc_text(tmp_path, text, expected):
    path = write_text(tmp_path, "bad.txt", text)
    with pytest.raises(XMLSparseError) as error:
        read_xc_text(path)
    assert str(error.value).startswith(str(path))
    assert expected in str(error.value)


def test_split_files_with_different_point_counts(tmp_path):
    features = write_text(tmp_path, "trn_X_Xf.txt", "3 4\n0:1\n1:1\n2:1\n")
    labels = write_text(tmp_path, "trn_X_Y.txt", "2 5\n0:1\n1:1\n")
    with pytest.raises(XMLSparseError, match="trn_X_Xf.txt has N=3 points but .*trn_X_Y.txt has N=2"):
        read_split_text(features, labels)


def test_split_label_file_errors_name_the_labels_file(tmp_path):
    features = write_text(tmp_path, "trn_X_Xf.txt", "2 4\n0:1\n1:1\n")
    labels = write_text(tmp_path, "trn_X_Y.txt", "2 4\n0:1\n4:1\n")
    with pytest.raises(XMLSparseError, match=r"trn_X_Y.txt line 3: label id 4 >= L=4 from the header"):
        read_split_text(features, labels)
    write_text(tmp_path, "trn_X_Xf.txt", "2 4\n0:1\n1 2:1\n")
    with pytest.raises(XMLSparseError, match=r"trn_X_Xf.txt line 3: token '1' is not 'feature_id:value'"):
        read_split_text(features, labels)


def test_npz_that_is_not_csr(tmp_path):
    sp.save_npz(tmp_path / "X.npz", sp.csc_matrix(np.eye(3, dtype=np.float32)))
    sp.save_npz(tmp_path / "Y.npz", sp.csr_matrix(np.eye(3, dtype=np.float32)))
    with pytest.raises(XMLSparseError, match=r"X.npz: key 'format' is 'csc'; expected a CSR matrix"):
        read_npz_pair(tmp_path / "X.npz", tmp_path / "Y.npz")


def test_npz_that_is_unreadable(tmp_path):
    sp.save_npz(tmp_path / "X.npz", sp.csr_matrix(np.eye(3, dtype=np.float32)))
    np.savez(tmp_path / "Y.npz", labels=np.ones(3))  # an npz, but not of a sparse matrix
    with pytest.raises(XMLSparseError, match=r"Y.npz: cannot read a sparse matrix"):
        read_npz_pair(tmp_path / "X.npz", tmp_path / "Y.npz")


def save_npy(path: Path, rows: np.ndarray) -> None:
    with path.open("wb") as f:  # np.save(path) would add '.npy' to a name that lacks it
        np.save(f, rows)


def save_csr(path: Path, rows: np.ndarray) -> None:
    sp.save_npz(path, sp.csr_matrix(rows))


def rows_with(value: float, row: int, column: int, dtype=np.float32) -> np.ndarray:
    rows = np.ones((5, 3), dtype=dtype)
    rows[row, column] = value
    return rows


@pytest.mark.parametrize(
    "name, write, expected",
    [
        (
            "X.trn.npy",
            lambda path: save_npy(path, rows_with(np.nan, 3, 1)),
            "X.trn.npy: row 3 (counting from 0) holds nan in column 1; expected finite feature values",
        ),
        (
            "X.trn.npy",  # finite in float64, infinite in the float32 that the model reads
            lambda path: save_npy(path, rows_with(1e300, 0, 2, np.float64)),
            "X.trn.npy: row 0 (counting from 0) holds inf in column 2; expected finite feature values",
        ),
        (
            "X.trn.npz",
            lambda path: save_csr(path, rows_with(-np.inf, 2, 0)),
            "X.trn.npz: row 2 (counting from 0) holds -inf in column 0; expected finite values",
        ),
        (
            "Y.trn.npz",
            lambda path: path.write_text("3 4 5\n0 1:1\n"),
            "Y.trn.npz: not an npz archive (it is text starting '3 4 5'); expected a CSR matrix saved by",
        ),
        (
            "Y.trn.npz",
            lambda path: path.write_bytes(gzip.compress(b"3 4 5\n0 1:1\n")),
            "Y.trn.npz: not an npz archive (it is gzip-compressed)",
        ),
        (
            "Y.trn.npz",
            lambda path: path.write_bytes(b"\x00\x01\x02 garbage"),
            "Y.trn.npz: not an npz archive (it is binary data starting",
        ),
        (
            "Y.trn.npz",
            lambda path: save_npy(path, np.eye(3)),
            "Y.trn.npz: not an npz archive (it is a .npy array)",
        ),
        ("Y.trn.npz", lambda path: path.write_bytes(b""), "Y.trn.npz: not an npz archive (the file is empty)"),
        (
            "X.trn.npy",
            lambda path: path.write_text("3 4 5\n0 1:1\n"),
            "X.trn.npy: not a .npy file (it is text starting '3 4 5'); expected a 2-D numeric array",
        ),
    ],
    ids=[
        "npy-nan", "npy-float32-overflow", "npz-inf", "npz-is-text", "npz-is-gzip", "npz-is-binary", "npz-is-npy",
        "npz-is-empty", "npy-is-text",
    ],
)
def test_bad_binary_file(tmp_path, name, write, expected):
    path = tmp_path / name
    write(path)
    read = read_npy_features if path.suffix == ".npy" else read_csr_npz
    with pytest.raises(XMLSparseError) as error:
        read(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "content",
    [
        # cut short: the end-of-stream marker is missing
        gzip.compress(b"4000 5 4\n" + b"0,2 1:1 3:0.5\n 0:2\n3 4:1\n1 2:1\n" * 1000)[:-40],
        b"\x1f\x8b" + b"not deflate data",
    ],
    ids=["truncated", "not-deflate"],
)
def test_damaged_gzip_text(tmp_path, content):
    path = tmp_path / "train.txt.gz"
    path.write_bytes(content)
    with pytest.raises(XMLSparseError, match=r"train.txt.gz: damaged gzip-compressed data \(.*\); expected a complete"):
        read_xc_text(path)


def test_features_and_labels_with_different_row_counts(tmp_path):
    np.save(tmp_path / "X.trn.npy", np.zeros((4, 2), dtype=np.float32))
    sp.save_npz(tmp_path / "Y.trn.npz", sp.csr_matrix(np.eye(3, dtype=np.float32)))
    with pytest.raises(XMLSparseError, match=r"X.trn.npy has 4 rows but .*Y.trn.npz has 3"):
        read_npz_pair(tmp_path / "X.trn.npy", tmp_path / "Y.trn.npz")


def test_npy_features_must_be_a_matrix(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(XMLSparseError, match=r"X.npy: expected a 2-D numeric array .* found shape \(5,\)"):
        read_npy_features(tmp_path / "X.npy")


def test_attentionxml_files_with_different_line_counts(tmp_path):
    texts = write_text(tmp_path, "train_texts.txt", "a b\nc d\ne f\n")
    labels = write_text(tmp_path, "train_labels.txt", "x\ny\n")
    with pytest.raises(XMLSparseError, match=r"train_texts.txt has 3 lines but .*train_labels.txt has 2"):
        read_attentionxml(texts, labels)


def test_attentionxml_test_split_needs_training_files(tmp_path):
    texts = write_text(tmp_path, "test_texts.txt", "a b\n")
    write_text(tmp_path, "test_labels.txt", "x\n")
    with pytest.raises(XMLSparseError, match=r"test_texts.txt: AttentionXML text needs the training files"):
        load_split(texts)


def test_label_map_with_a_repeated_label(tmp_path):
    path = write_text(tmp_path, "label_map.txt", "a\nb\na\n")
    with pytest.raises(XMLSparseError, match=r"label_map.txt line 3: label 'a' repeats line 1"):
        load_label_map(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(XMLSparseError, match=r"nothing.txt: file not found"):
        read_xc_text(tmp_path / "nothing.txt")
    with pytest.raises(XMLSparseError, match=r"cannot tell the data format of .*a.csv, .*b.csv"):
        load_split([tmp_path / "a.csv", tmp_path / "b.csv"])

