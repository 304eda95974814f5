import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data import predictions
from xmlsparse.data.predictions import read_predictions, write_predictions
from xmlsparse.errors import XMLSparseError
from xmlsparse.metrics import topk_from_sparse_scores, topk_values_and_indices


def _random_topk(n=40, n_labels=30, k=5, dtype=np.float32):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((n, n_labels)).astype(dtype)
    scores[3, :] = 0.5  # a row of ties
    vals, idx = topk_values_and_indices(scores, k)
    idx[5, 2:] = -1  # a point with only two predictions
    idx[6, :] = -1  # and one with none
    return vals, idx


@pytest.mark.parametrize("suffix", [".txt", ".npz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip(tmp_path, suffix, dtype):
    vals, idx = _random_topk(dtype=dtype)
    path = tmp_path / f"pred{suffix}"
    write_predictions(path, idx, vals, n_labels=30)
    scores = read_predictions(path)
    assert scores.shape == (40, 30) and scores.has_sorted_indices
    np.testing.assert_array_equal(topk_from_sparse_scores(scores, 5), idx)
    dense = scores.toarray()
    valid = idx >= 0
    # exact: text holds enough digits to restore each value in its own precision
    np.testing.assert_array_equal(dense[np.nonzero(valid)[0], idx[valid]].astype(dtype), vals[valid])
    assert scores.nnz == valid.sum()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_text_layout_is_best_first_with_header(tmp_path):
    path = tmp_path / "pred.txt"
    write_predictions(path, np.array([[4, 1, -1], [-1, -1, -1]]), np.array([[0.75, 0.5, 0.0], [0, 0, 0]]))
    assert path.read_text() == "2 5\n4:0.75 1:0.5\n\n"


def test_text_without_header_and_empty_lines(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_text("3:0.5 1:0.25\n\n  \n0:1e-3 7:-2\n")
    scores = read_predictions(path)
    assert scores.shape == (4, 8)  # no header: L = max id + 1
    np.testing.assert_array_equal(scores.indptr, [0, 2, 2, 2, 4])
    np.testing.assert_array_equal(scores.indices, [1, 3, 0, 7])
    np.testing.assert_array_equal(scores.data, [0.25, 0.5, 1e-3, -2.0])
    assert read_predictions(path, n_labels=100).shape == (4, 100)


def test_text_with_header_keeps_its_label_count(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_text("2 50\n3:0.5\n\n")
    scores = read_predictions(path)
    assert scores.shape == (2, 50) and scores.nnz == 1
    with pytest.raises(XMLSparseError, match="header announces 50 labels, expected 40"):
        read_predictions(path, n_labels=40)


def test_npz_narrower_than_label_count_is_widened(tmp_path):
    path = tmp_path / "pred.npz"
    sp.save_npz(path, sp.csr_matrix(np.array([[0.0, 0.3], [0.9, 0.0]])))
    assert read_predictions(path, n_labels=10).shape == (2, 10)
    with pytest.raises(XMLSparseError, match=r"pred\.npz, row 0: label id 1 is out of range for 1 labels"):
        read_predictions(path, n_labels=1)


@pytest.mark.parametrize(
    "body, n_labels, message",
    [
        ("1:0.5\n2:abc\n", None, r"line 2: score 'abc' in '2:abc' is not a number"),
        ("1:0.5 x:0.3\n", None, r"line 1: label id 'x' in 'x:0.3' is not an integer"),
        ("1:0.5\n\n4\n", None, r"line 3: bad token '4', expected label:score"),
        ("1:0.5:2\n", None, r"line 1: bad token '1:0.5:2', expected label:score"),
        ("1:0.5\n0:1 -2:0.5\n", None, r"line 2: negative label id -2"),
        ("3 10\n1:0.5\n\n4:0.1 10:0.2\n", None, r"line 4: label id 10 is out of range for 10 labels \(0\.\.9\)"),
        ("1:0.5\n7:0.2\n", 5, r"line 2: label id 7 is out of range for 5 labels"),
        ("1:0.5\n2:0.1 0:0.3 2:0.2\n", None, r"line 2: label 2 is listed twice"),
        ("2 10\n1:0.5\n", None, r"header announces 2 points but 1 lines follow it"),
    ],
)
def test_bad_text_names_file_and_line(tmp_path, body, n_labels, message):
    path = tmp_path / "bad.txt"
    path.write_text(body)
    with pytest.raises(XMLSparseError, match=r"bad\.txt(, |: )" + message):
        read_predictions(path, n_labels=n_labels)


def test_unreadable_files(tmp_path):
    with pytest.raises(XMLSparseError, match=r"missing\.txt: cannot read prediction file"):
        read_predictions(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"1:0.5\n\xff\xfe\n")
    with pytest.raises(XMLSparseError, match=r"binary\.txt: not a UTF-8 text prediction file"):
        read_predictions(binary)
    not_sparse = tmp_path / "dense.npz"
    np.savez(not_sparse, a=np.zeros(3))
    with pytest.raises(XMLSparseError, match=r"dense\.npz: not a scipy sparse matrix"):
        read_predictions(not_sparse)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "pred.npz"

    def broken_save(file, matrix):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(predictions.sp, "save_npz", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(path, np.array([[0, 1]]), np.array([[0.9, 0.1]]))
    assert list(tmp_path.iterdir()) == []


def test_bad_topk_for_writing(tmp_path):
    with pytest.raises(XMLSparseError, match="same shape"):
        write_predictions(tmp_path / "p.txt", np.zeros((2, 3), dtype=np.int64), np.zeros((2, 2)))
    with pytest.raises(XMLSparseError, match="expected -1 \\(none\\) or 0..3"):
        write_predictions(tmp_path / "p.txt", np.array([[0, 4]]), np.zeros((1, 2)), n_labels=4)
    with pytest.raises(XMLSparseError, match="top-k row 1: label 2 is listed twice"):
        write_predictions(tmp_path / "p.txt", np.array([[0, 1], [2, 2]]), np.zeros((2, 2)))
    assert list(tmp_path.iterdir()) == []
