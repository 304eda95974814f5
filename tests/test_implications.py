"""Label implications (xmlsparse.implications): the table read from a label matrix, top-k lists made
consistent with it against a dense brute force, the stored file, and a run that uses them end to end
(train, eval, predict)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.data.batches import split_validation
from xmlsparse.data.formats import load_split
from xmlsparse.errors import XMLSparseError
from xmlsparse.implications import LabelImplications, consistent_topk

from hierarchy import TREE_PARENT, WORDS_PER_LABEL, train, write_hierarchical_xc_text

runner = CliRunner()


def labels(rows: list[list[int]], n_labels: int, values: list[list[float]] | None = None) -> sp.csr_matrix:
    """A CSR label matrix with the given label ids per row, kept as given (no summing of duplicates)."""
    indptr = np.cumsum([0] + [len(row) for row in rows])
    indices = np.array([label for row in rows for label in row], dtype=np.int32)
    data = np.ones(len(indices), dtype=np.float32) if values is None else np.array(
        [value for row in values for value in row], dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_labels))


def table_of(implications: LabelImplications) -> dict[int, list[int]]:
    """The implications as {label: implied labels} (labels implying nothing left out)."""
    indptr, implied = implications.indptr, implications.implied
    return {d: implied[indptr[d]:indptr[d + 1]].tolist() for d in range(implications.n_labels)
            if indptr[d + 1] > indptr[d]}


def same_table(a: LabelImplications, b: LabelImplications) -> bool:
    return (np.array_equal(a.indptr, b.indptr) and np.array_equal(a.implied, b.implied)
            and np.array_equal(a.counts, b.counts))


def check_types(implications: LabelImplications, n_labels: int) -> None:
    assert implications.n_labels == n_labels
    for array in (implications.indptr, implications.implied, implications.counts):
        assert array.dtype == np.int64 and array.ndim == 1
    assert implications.indptr.shape == (n_labels + 1,) and implications.indptr[0] == 0
    assert implications.indptr[-1] == len(implications.implied)


# A hierarchy 0 ⊃ 1 ⊃ 2, label 3 apart from it, 4 seen once (with 0), 5 never seen, 6 on the points
# of 3 exactly (3 and 6 imply each other).
HIERARCHY_ROWS = [[0], [0, 1], [0, 1, 2], [0, 1, 2], [3, 6], [0, 3, 6], [0, 4]]
HIERARCHY_LABELS = 7


# ----------------------------------------------------------------------------- from_labels


def test_from_labels_reads_a_hand_made_hierarchy():
    implications = LabelImplications.from_labels(labels(HIERARCHY_ROWS, HIERARCHY_LABELS), min_support=1)
    check_types(implications, HIERARCHY_LABELS)
    np.testing.assert_array_equal(implications.counts, [6, 3, 2, 2, 1, 0, 2])
    # 1 -> 0; 2 -> 0, 1; 3 <-> 6 (3's points are 6's, so neither implies 0: point 4 lacks it);
    # 4 -> 0 on its one point; 5, never seen, implies nothing, and no label implies itself.
    assert table_of(implications) == {1: [0], 2: [0, 1], 3: [6], 4: [0], 6: [3]}
    np.testing.assert_array_equal(implications.indptr, [0, 0, 1, 3, 4, 5, 5, 6])


def test_min_support_drops_the_implications_of_rare_labels():
    Y = labels(HIERARCHY_ROWS, HIERARCHY_LABELS)
    assert table_of(LabelImplications.from_labels(Y, min_support=2)) == {1: [0], 2: [0, 1], 3: [6], 6: [3]}
    assert table_of(LabelImplications.from_labels(Y, min_support=3)) == {1: [0]}
    # The support bounds the implying label only: label 0 (6 points) is implied by 1 (3 points) at 3.
    none = LabelImplications.from_labels(Y, min_support=4)
    assert table_of(none) == {} and len(none.implied) == 0
    np.testing.assert_array_equal(none.indptr, np.zeros(HIERARCHY_LABELS + 1))
    np.testing.assert_array_equal(none.counts, [6, 3, 2, 2, 1, 0, 2])  # counts whatever the support


def test_blocks_of_labels_give_the_table_of_one_block():
    rng = np.random.default_rng(5)
    Y, _ = hierarchical_labels(rng, n_labels=45, n_points=150, noise=0.3)
    whole = LabelImplications.from_labels(Y, min_support=2)
    assert len(whole.implied) > 20
    for block in (1, 2, 7, 44, 45, 1000):
        assert same_table(LabelImplications.from_labels(Y, min_support=2, labels_per_block=block), whole), block
    assert same_table(LabelImplications.from_labels(labels(HIERARCHY_ROWS, HIERARCHY_LABELS), 1, labels_per_block=1),
                      LabelImplications.from_labels(labels(HIERARCHY_ROWS, HIERARCHY_LABELS), 1))


def test_from_labels_matches_a_brute_force_on_random_hierarchies():
    rng = np.random.default_rng(11)
    for _ in range(10):
        n_labels = int(rng.integers(20, 50))
        Y, _ = hierarchical_labels(rng, n_labels, n_points=int(rng.integers(30, 120)), noise=0.4)
        dense = Y.toarray() != 0
        for min_support in (1, 2, 3):
            expected = brute_force_table(dense, min_support)
            implications = LabelImplications.from_labels(Y, min_support)
            check_types(implications, n_labels)
            assert table_of(implications) == expected
            np.testing.assert_array_equal(implications.counts, dense.sum(axis=0))


def test_stored_values_count_as_presence():
    # The same points as HIERARCHY_ROWS with relevance values instead of ones.
    values = [[0.5 + i + j for j in range(len(row))] for i, row in enumerate(HIERARCHY_ROWS)]
    Y = labels(HIERARCHY_ROWS, HIERARCHY_LABELS, values)
    assert same_table(LabelImplications.from_labels(Y, 1),
                      LabelImplications.from_labels(labels(HIERARCHY_ROWS, HIERARCHY_LABELS), 1))
    # Other sparse formats and integer matrices read the same.
    for other in (Y.tocoo(), Y.tocsc(), sp.csr_matrix(Y.toarray().astype(np.int32) + (Y.toarray() > 0))):
        assert same_table(LabelImplications.from_labels(other, 1), LabelImplications.from_labels(Y, 1))


def test_duplicate_entries_count_as_presence():
    # Point 0 stores 1 twice and 2 twice: still the points of HIERARCHY_ROWS.
    rows = [list(row) for row in HIERARCHY_ROWS]
    rows[2] = [0, 1, 1, 2, 2]
    duplicated = LabelImplications.from_labels(labels(rows, HIERARCHY_LABELS), 1)
    np.testing.assert_array_equal(duplicated.counts, [6, 3, 2, 2, 1, 0, 2])
    assert table_of(duplicated) == {1: [0], 2: [0, 1], 3: [6], 4: [0], 6: [3]}


def test_a_label_without_points_implies_nothing_and_empty_matrices_work():
    Y = labels([[0, 1], [0, 1], [0]], 4)  # labels 2 and 3 never occur
    for min_support in (1, 2):
        implications = LabelImplications.from_labels(Y, min_support)
        assert table_of(implications) == {1: [0]}
        np.testing.assert_array_equal(implications.counts, [3, 2, 0, 0])
    empty = LabelImplications.from_labels(sp.csr_matrix((5, 3), dtype=np.float32), 1)
    check_types(empty, 3)
    assert len(empty.implied) == 0 and not empty.counts.any()
    no_points = LabelImplications.from_labels(sp.csr_matrix((0, 3), dtype=np.float32), 1)
    check_types(no_points, 3)
    assert len(no_points.implied) == 0


# ----------------------------------------------------------------------------- consistent_topk


def hierarchical_labels(rng: np.random.Generator, n_labels: int, n_points: int,
                        noise: float) -> tuple[sp.csr_matrix, np.ndarray]:
    """Points of a random tree over ``n_labels`` labels: each has a node and its ancestors, and with
    probability ``noise`` per draw (up to two) a random extra label. Returns (Y, parent)."""
    parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n_labels)])
    rows = []
    for _ in range(n_points):
        node, row = int(rng.integers(0, n_labels)), set()
        while node >= 0:
            row.add(node)
            node = int(parent[node])
        for _ in range(2):
            if rng.random() < noise:
                row.add(int(rng.integers(0, n_labels)))
        rows.append(sorted(row))
    return labels(rows, n_labels), parent


def brute_force_table(dense: np.ndarray, min_support: int) -> dict[int, list[int]]:
    counts = dense.sum(axis=0)
    table = {}
    for d in range(dense.shape[1]):
        if counts[d] < min_support or counts[d] == 0:
            continue
        implied = [a for a in range(dense.shape[1]) if a != d and np.all(dense[dense[:, d], a])]
        if implied:
            table[d] = implied
    return table


def dense_reference(implications: LabelImplications, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every label implied by a label gets at least its score, over the whole float64 score row; then
    the top-k by (score descending, count descending, label id ascending)."""
    n_labels = implications.n_labels
    out_scores, out_ids = [], []
    for row in scores.astype(np.float64):
        raised = row.copy()
        for d in range(n_labels):
            for a in implications.implied[implications.indptr[d]:implications.indptr[d + 1]]:
                raised[a] = max(raised[a], row[d])
        order = sorted(range(n_labels), key=lambda a: (-raised[a], -implications.counts[a], a))[:k]
        out_ids.append(order)
        out_scores.append(raised[order])
    return np.array(out_scores), np.array(out_ids, dtype=np.int64)


def listed(scores: np.ndarray, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``width`` best labels (ties: lower id, as topk_of_batch), in a shuffled order."""
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    ids = ids[:, rng.permutation(width)]
    return ids, np.take_along_axis(scores, ids, axis=1)


def untied_boundary(scores: np.ndarray, width: int) -> np.ndarray:
    """``scores`` (integers with many ties) with every label outside a row's ``width`` best put
    below the ``width``-th best score: ties stay everywhere but across the list's end."""
    scores = scores.copy()
    order = np.argsort(-scores, axis=1, kind="stable")
    for row, ranked in zip(scores, order):
        lowest_listed = row[ranked[:width]].min()
        row[ranked[width:]] = np.minimum(row[ranked[width:]], lowest_listed - 1)
    return scores


@pytest.mark.parametrize("seed", range(6))
def test_consistent_topk_equals_the_dense_reference(seed):
    rng = np.random.default_rng(seed)
    n_labels = int(rng.integers(30, 61))
    Y, _ = hierarchical_labels(rng, n_labels, n_points=int(rng.integers(60, 200)), noise=0.3)
    implications = LabelImplications.from_labels(Y, min_support=int(rng.integers(1, 3)))
    assert len(implications.implied) > 0
    n_rows = 7
    for k in (1, 3, 5):
        for width in (k, k + 2, k + 6):
            # Distinct scores (any real-valued model), and integer scores full of exact ties; eighths,
            # so that float32 holds them exactly.
            for scores in (rng.permutation(n_rows * n_labels).reshape(n_rows, n_labels) / 8.0 - 20.0,
                           untied_boundary(rng.integers(-3, 4, size=(n_rows, n_labels)).astype(np.float64), width)):
                ids, values = listed(scores, width, rng)
                for dtype, id_dtype in ((torch.float64, torch.int64), (torch.float32, torch.int32)):
                    got_scores, got_ids = consistent_topk(
                        implications, torch.tensor(values, dtype=dtype), torch.tensor(ids, dtype=id_dtype), k)
                    want_scores, want_ids = dense_reference(implications, scores, k)
                    assert got_ids.dtype == id_dtype and got_scores.dtype == dtype
                    assert got_ids.shape == got_scores.shape == (n_rows, k)
                    np.testing.assert_array_equal(got_ids.numpy(), want_ids)
                    np.testing.assert_array_equal(got_scores.numpy().astype(np.float64), want_scores)


def test_consistent_topk_on_the_hand_made_hierarchy():
    implications = LabelImplications.from_labels(labels(HIERARCHY_ROWS, HIERARCHY_LABELS), min_support=1)
    # Row 0: label 2 is sure, its ancestors 1 and 0 rise to its score and, being more frequent, rank
    # first. Row 1: 6 rises to 3's score and ties with it (same count: lower id first), 0 to the
    # higher of 1's and 4's, and ranks before 1 (more frequent).
    scores = torch.tensor([[0.9, 0.2, 0.1, -1.0], [0.5, 0.8, 0.3, 0.7]])
    ids = torch.tensor([[2, 5, 0, 3], [5, 3, 4, 1]])
    got_scores, got_ids = consistent_topk(implications, scores, ids, 4)
    assert got_ids.tolist() == [[0, 1, 2, 5], [3, 6, 0, 1]]
    assert got_scores.tolist() == [pytest.approx([0.9, 0.9, 0.9, 0.2]), pytest.approx([0.8, 0.8, 0.7, 0.7])]
    # 3 and 6 at -1 in row 0, 5 at 0.5 and 4 at 0.3 in row 1 fall below the top 4; the top 3 is its head.
    top3_scores, top3_ids = consistent_topk(implications, scores, ids, 3)
    assert top3_ids.tolist() == [[0, 1, 2], [3, 6, 0]]
    assert torch.equal(top3_scores, got_scores[:, :3])
    # k beyond the lists' width is capped at it.
    capped_scores, capped_ids = consistent_topk(implications, scores, ids, 9)
    assert capped_ids.shape == capped_scores.shape == (2, 4)
    assert capped_ids.tolist() == [[0, 1, 2, 5], [3, 6, 0, 1]]


def test_an_empty_table_returns_the_lists_unchanged():
    rng = np.random.default_rng(3)
    n_labels = 40
    counts = rng.integers(0, 50, size=n_labels)
    empty = LabelImplications(np.zeros(n_labels + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), counts)
    scores = rng.permutation(7 * n_labels).reshape(7, n_labels).astype(np.float32)
    for k in (1, 3, 5):
        for width in (k, k + 4):
            order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
            values = np.take_along_axis(scores, order, axis=1)
            for id_dtype in (torch.int64, torch.int32):
                got_scores, got_ids = consistent_topk(empty, torch.tensor(values), torch.tensor(order, dtype=id_dtype), k)
                assert got_ids.dtype == id_dtype
                np.testing.assert_array_equal(got_ids.numpy(), order[:, :k])
                np.testing.assert_array_equal(got_scores.numpy(), values[:, :k])
    # Equal counts: ties stay in the order of a top-k (lower id first).
    flat = LabelImplications(np.zeros(n_labels + 1, dtype=np.int64), np.zeros(0, dtype=np.int64),
                             np.full(n_labels, 4, dtype=np.int64))
    tied = rng.integers(0, 3, size=(7, n_labels)).astype(np.float32)
    order = np.argsort(-tied, axis=1, kind="stable")[:, :5]
    values = np.take_along_axis(tied, order, axis=1)
    got_scores, got_ids = consistent_topk(flat, torch.tensor(values), torch.tensor(order), 5)
    np.testing.assert_array_equal(got_ids.numpy(), order)
    np.testing.assert_array_equal(got_scores.numpy(), values)


def test_a_tie_across_the_end_of_the_list_stays_as_the_list_chose():
    # No implications: labels 0 and 1 tie, the top-1 list (ties: lower id) holds 0. The whole row
    # ranked by count would put 1 first, but the list alone cannot see it, as documented.
    empty = LabelImplications(np.zeros(3, dtype=np.int64), np.zeros(0, dtype=np.int64), np.array([1, 2]))
    assert dense_reference(empty, np.array([[1.0, 1.0]]), 1)[1].tolist() == [[1]]
    _, got_ids = consistent_topk(empty, torch.tensor([[1.0]]), torch.tensor([[0]]), 1)
    assert got_ids.tolist() == [[0]]


def test_an_empty_table_keeps_the_labels_and_orders_ties_by_count():
    empty = LabelImplications(np.zeros(3, dtype=np.int64), np.zeros(0, dtype=np.int64), np.array([1, 2]))
    _, got_ids = consistent_topk(empty, torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]]), 2)
    assert got_ids.tolist() == [[1, 0]]


def test_a_stored_zero_is_no_label():
    # As label_frequencies counts: point 1 stores label 1 with value 0, so 1 keeps implying 0.
    Y = sp.csr_matrix((np.array([1.0, 1.0, 1.0, 0.0]), np.array([0, 1, 0, 1]), np.array([0, 2, 4])), shape=(2, 2))
    implications = LabelImplications.from_labels(Y, 1)
    np.testing.assert_array_equal(implications.counts, [2, 1])
    assert table_of(implications) == {1: [0]}


# ----------------------------------------------------------------------------- save and load


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    Y, _ = hierarchical_labels(rng, 50, 120, noise=0.2)
    implications = LabelImplications.from_labels(Y, 2)
    path = tmp_path / "label_implications.npz"
    implications.save(path)
    loaded = LabelImplications.load(path, 50)
    assert same_table(loaded, implications)
    check_types(loaded, 50)
    # An empty table too.
    empty = LabelImplications.from_labels(sp.csr_matrix((3, 4), dtype=np.float32), 1)
    empty.save(tmp_path / "empty.npz")
    assert same_table(LabelImplications.load(tmp_path / "empty.npz", 4), empty)
    # Other integer dtypes on disk come back as int64.
    np.savez(tmp_path / "int32.npz", indptr=implications.indptr.astype(np.int32),
             implied=implications.implied.astype(np.int32), counts=implications.counts.astype(np.int32))
    narrow = LabelImplications.load(tmp_path / "int32.npz", 50)
    assert same_table(narrow, implications) and narrow.implied.dtype == np.int64


def _stored(path: Path, indptr, implied, counts) -> Path:
    np.savez(path, indptr=np.asarray(indptr, dtype=np.int64), implied=np.asarray(implied, dtype=np.int64),
             counts=np.asarray(counts, dtype=np.int64))
    return path


@pytest.mark.parametrize("indptr, implied, counts", [
    ([0, 1, 2], [1, 0], [2, 2, 1]),  # a table of 2 labels for 3
    ([0, 1, 2, 2], [1, 0], [2, 2]),  # counts of 2 labels
    ([0, 1, 2, 2, 2], [1, 0], [2, 2, 1, 0]),  # 4 labels
    ([0, 1, 2, 2], [1, 3], [2, 2, 1]),  # label id 3 of 3 labels
    ([0, 1, 2, 2], [1, -1], [2, 2, 1]),  # a negative label id
    ([0, 1, 2, 3], [1, 0], [2, 2, 1]),  # indptr ends past the implied labels
    ([1, 1, 2, 2], [1, 0], [2, 2, 1]),  # indptr does not start at 0
    ([0, 2, 1, 2], [1, 0], [2, 2, 1]),  # indptr falls
])
def test_load_rejects_a_table_of_other_labels(tmp_path, indptr, implied, counts):
    path = _stored(tmp_path / "label_implications.npz", indptr, implied, counts)
    with pytest.raises(XMLSparseError, match=f"^{re.escape(str(path))}: expected the implications of 3 labels"):
        LabelImplications.load(path, 3)
    # The well-formed table loads.
    good = LabelImplications.load(_stored(tmp_path / "good.npz", [0, 1, 2, 2], [1, 0], [2, 2, 1]), 3)
    assert table_of(good) == {0: [1], 1: [0]}


def test_load_of_an_unreadable_file_names_it(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(XMLSparseError, match=f"^{re.escape(str(missing))}: cannot read the label implications"):
        LabelImplications.load(missing, 3)
    text = tmp_path / "text.npz"
    text.write_text("not an archive\n")
    with pytest.raises(XMLSparseError, match=f"^{re.escape(str(text))}: cannot read the label implications"):
        LabelImplications.load(text, 3)
    partial = tmp_path / "partial.npz"
    np.savez(partial, indptr=np.zeros(4, dtype=np.int64), counts=np.zeros(3, dtype=np.int64))
    with pytest.raises(XMLSparseError, match=f"^{re.escape(str(partial))}: cannot read the label implications"):
        LabelImplications.load(partial, 3)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def hierarchical_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hierarchy") / "data"
    folder.mkdir()
    rng = np.random.default_rng(7)
    write_hierarchical_xc_text(folder / "train.txt", rng, 360)
    write_hierarchical_xc_text(folder / "test.txt", rng, 90)
    return folder


def predicted_lists(path: Path) -> list[list[int]]:
    """The label ids of each line of a label:score prediction file, best first."""
    lines = path.read_text().splitlines()
    header = lines[0].split()
    assert len(header) == 2 and int(header[0]) == len(lines) - 1
    return [[int(pair.split(":")[0]) for pair in line.split()] for line in lines[1:]]


def test_a_run_with_implications_stores_uses_and_predicts_with_them(tmp_path, hierarchical_data):
    run = train(tmp_path, hierarchical_data, {"min_support": 1})
    stored = json.loads((run / "preprocessing.json").read_text())
    assert stored["label_implications"] == "label_implications.npz"
    assert stored["label_order"] is None  # model positions are the data set's label ids
    n_labels = len(TREE_PARENT)
    implications = LabelImplications.load(run / "label_implications.npz", n_labels)

    # The table of the training rows outside the validation split, which hold every ancestor.
    train_split = load_split(hierarchical_data / "train.txt")
    train_rows, val_rows = split_validation(train_split.n_points, 0.1, 0)
    assert len(val_rows) == 36
    assert same_table(implications, LabelImplications.from_labels(train_split.Y[train_rows], 1))
    table = table_of(implications)
    for label, parent in enumerate(TREE_PARENT):
        if parent >= 0 and implications.counts[label] > 0:
            assert parent in table[label]
            if TREE_PARENT[parent] >= 0:
                assert TREE_PARENT[parent] in table[label]

    # eval reproduces the run's test metrics, both using the stored table.
    final = json.loads((run / "final.json").read_text())["test"]
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(run), "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    for key in ("P@1", "P@3", "nDCG@5"):
        assert measured[key] == pytest.approx(final[key], abs=1e-9)

    # predict: every listed label's implied labels that are more frequent stand before it.
    predictions = tmp_path / "pred.txt"
    result = runner.invoke(app, ["predict", str(run), str(hierarchical_data / "test.txt"), "--top-k", "3",
                                 "--out", str(predictions)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lists = predicted_lists(predictions)
    assert len(lists) == 90 and all(len(row) == 3 and len(set(row)) == 3 for row in lists)
    checked = 0
    for row in lists:
        for position, d in enumerate(row):
            for a in table.get(d, []):
                if implications.counts[a] > implications.counts[d]:
                    assert a in row[:position], (row, d, a)
                    checked += 1
    assert checked > 0
    # The same lists as the step applied to the model's plain top-3 of the test points.
    from xmlsparse.evaluate import predict_topk
    from xmlsparse.runs import load_run_model

    config, inputs, model, device = load_run_model(run)
    test = inputs.preprocess(load_split(hierarchical_data / "test.txt"))
    batch_size = config.train.eval_batch_size
    plain_ids, plain_scores = predict_topk(model, test, 3, batch_size, device)
    _, consistent_ids = consistent_topk(implications, torch.from_numpy(plain_scores), torch.from_numpy(plain_ids), 3)
    assert consistent_ids.tolist() == lists
    assert plain_ids.tolist() != lists  # the tiny model's own lists break the implications
    with_table, _ = predict_topk(model, test, 3, batch_size, device, implications=implications)
    assert with_table.tolist() == lists


def test_a_run_without_implications_stores_none(tmp_path, hierarchical_data):
    run = train(tmp_path, hierarchical_data, None)
    assert not (run / "label_implications.npz").exists()
    stored = json.loads((run / "preprocessing.json").read_text())
    assert "label_implications" in stored and stored["label_implications"] is None
    from xmlsparse.train.setup import load_run_inputs

    assert load_run_inputs(run).preprocess.implications is None


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "implied_predictions.py"


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def data_whose_table_depends_on_the_split(folder: Path, hierarchical_data: Path) -> Path:
    """The hierarchical data plus a point for each leaf without its ancestors (the leaf implies its
    parent only while that point is held out) and a 22nd label seen once, with label 0 (an
    implication of support 1)."""
    folder.mkdir()
    n_labels = len(TREE_PARENT)
    leaves = [label for label in range(n_labels) if label not in TREE_PARENT]
    head, *lines = (hierarchical_data / "train.txt").read_text().splitlines()
    _, n_features, _ = map(int, head.split())
    lines += [f"{leaf} {leaf * WORDS_PER_LABEL}:1 {leaf * WORDS_PER_LABEL + 1}:1" for leaf in leaves]
    lines.append(f"0,{n_labels} 0:1 {n_features - 1}:1")
    (folder / "train.txt").write_text("\n".join([f"{len(lines)} {n_features} {n_labels + 1}", *lines]) + "\n")
    head, *lines = (hierarchical_data / "test.txt").read_text().splitlines()
    (folder / "test.txt").write_text("\n".join([f"{head.rsplit(' ', 1)[0]} {n_labels + 1}", *lines]) + "\n")
    return folder


def precision_at(ids: np.ndarray, truth: sp.csr_matrix, k: int) -> float:
    return float(np.mean([truth[row, ids[row, :k]].sum() / k for row in range(ids.shape[0])]))


def test_the_script_scores_saved_lists_with_the_table_of_the_runs_split(tmp_path, hierarchical_data):
    # A run without implications, its validation split capped and seeded: the script must read both
    # from the run's config.yaml to rebuild the table the run would have used.
    data = data_whose_table_depends_on_the_split(tmp_path / "data", hierarchical_data)
    run = train(tmp_path, data, None, {"validation_max_points": 20, "validation_seed": 3})
    saved = tmp_path / "pred.npz"
    result = runner.invoke(app, ["predict", str(run), str(data / "test.txt"), "--top-k", "5", "--out", str(saved)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output

    from xmlsparse.evaluate import predict_topk
    from xmlsparse.runs import load_run_model

    config, inputs, model, device = load_run_model(run)
    test = inputs.preprocess(load_split(data / "test.txt"))
    train_labels = load_split(data / "train.txt").Y

    def table(seed: int, max_points: int | None, min_support: int) -> LabelImplications:
        rows, _ = split_validation(train_labels.shape[0], 0.1, seed, max_points=max_points)
        return LabelImplications.from_labels(train_labels[rows], min_support)

    def expected(implications: LabelImplications) -> dict[str, float]:
        ids, _ = predict_topk(model, test, 5, config.train.eval_batch_size, device, implications=implications)
        return {f"P@{k}": precision_at(ids, test.Y, k) for k in (1, 3, 5)}

    def scored(*flags: str) -> tuple[int, dict[str, float]]:
        out = tmp_path / "scored.json"
        done = run_script(saved, data / "train.txt", data / "test.txt", "--config", run / "config.yaml", "--json", out,
                          *flags)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split(" implications")[0].replace(",", "")), json.loads(out.read_text())

    # The run has no eval.implications, so the key's default min_support (2) applies.
    own, uncapped = table(3, 20, 2), table(3, None, 1)
    # The data is built so that the seed, the cap and the support each change the table.
    for other in (table(0, 20, 2), table(3, None, 2), table(3, 20, 1)):
        assert not same_table(own, other)
    for flags, want in [((), own), (("--validation-max-points", "0", "--min-support", "1"), uncapped)]:
        count, metrics = scored(*flags)
        assert count == len(want.implied), flags
        for key, value in expected(want).items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), (flags, key)


def test_the_script_names_a_missing_config_in_one_line(tmp_path, hierarchical_data):
    missing = tmp_path / "nowhere.yaml"
    done = run_script(tmp_path / "pred.txt", hierarchical_data / "train.txt", hierarchical_data / "test.txt",
                      "--config", missing)
    assert done.returncode != 0
    assert done.stderr.strip() == f"error: {missing}: config file not found"
