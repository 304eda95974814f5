"""scripts/topk_ensemble.py: runs' saved top-k logits scored as one model. With lists as long as the
label set nothing is missing, and the scores must be those of the run itself and of `xmlsparse
ensemble`; shorter lists count a missing label at the list's lowest score."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xmlsparse.ensembles import create_ensemble
from xmlsparse.runs import evaluate_run_dir

from hierarchy import TREE_PARENT, train, write_hierarchical_xc_text

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "topk_ensemble.py"
N_LABELS = len(TREE_PARENT)
METRICS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@5")

spec = importlib.util.spec_from_file_location("topk_ensemble", SCRIPT)
topk_ensemble = importlib.util.module_from_spec(spec)
spec.loader.exec_module(topk_ensemble)


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """Two runs (BCE seed 0, softmax seed 1) of data whose labels are a tree node and its ancestors,
    scored with the implications the tree gives, and each run's full lists (k = L)."""
    folder = tmp_path_factory.mktemp("topk")
    data = folder / "data"
    data.mkdir()
    rng = np.random.default_rng(11)
    write_hierarchical_xc_text(data / "train.txt", rng, 400)
    write_hierarchical_xc_text(data / "test.txt", rng, 120)
    runs, lists = [], []
    for seed, loss in ((0, "bce"), (1, "softmax")):
        (folder / str(seed)).mkdir()
        runs.append(train(folder / str(seed), data, {"min_support": 1}, {"validation": 0.2},
                          {"seed": seed, "loss": loss}))
        lists.append(folder / f"run{seed}.npz")
        done = run_script("dump", runs[-1], lists[-1], "--top-k", N_LABELS)
        assert done.returncode == 0, done.stderr
    return runs, lists


def scored(run: Path, lists: list[Path], tmp_path: Path) -> dict[str, dict[str, float]]:
    out = tmp_path / "metrics.json"
    done = run_script("score", run, *lists, "--json", out)
    assert done.returncode == 0, done.stderr
    assert "first label exact on 100.0 % of points" in done.stdout
    return json.loads(out.read_text())


def test_one_full_list_scores_as_its_run(members, tmp_path):
    runs, lists = members
    result = scored(runs[0], lists[:1], tmp_path)
    for split in ("val", "test"):
        expected, table = evaluate_run_dir(runs[0], split, [1, 3, 5], buckets=3 if split == "test" else 0)
        assert {name: result[split][name] for name in METRICS} == pytest.approx(
            {name: expected[name] for name in METRICS}, abs=1e-12)
    # The frequency table of `xmlsparse eval`: its buckets, label counts and P@k / PSP@k.
    assert [row["bucket"] for row in result["test_by_frequency"]] == [row["bucket"] for row in table]
    for row, expected_row in zip(result["test_by_frequency"], table):
        assert {key: value for key, value in row.items() if key != "bucket"} == pytest.approx(
            {key: value for key, value in expected_row.items() if key != "bucket"}, abs=1e-12)


def test_full_lists_score_as_xmlsparse_ensemble(members, tmp_path):
    runs, lists = members
    final = create_ensemble(runs, tmp_path / "ensemble", buckets=0)
    result = scored(runs[1], lists, tmp_path)
    for split, key in (("val", "validation"), ("test", "test")):
        assert {name: result[split][name] for name in METRICS} == pytest.approx(
            {name: final[key][name] for name in METRICS}, abs=1e-12)


def test_a_label_missing_from_a_list_counts_at_that_lists_lowest_score():
    # Row 0: list A knows labels 0, 1, 2 (floor 1), list B labels 3, 0, 4 (floor 0). Means: label 3
    # (1 + 5) / 2 = 3, label 0 (3 + 1) / 2 = 2, label 1 (2 + 0) / 2 = 1, labels 2 and 4 0.5 (tied:
    # the lower id first). Row 1: both know label 5; labels 0 and 1 tie at 0.5, label 2 has 0.
    a = (np.array([[0, 1, 2], [5, 1, 2]]), np.array([[3.0, 2.0, 1.0], [4.0, 1.0, 0.0]]))
    b = (np.array([[3, 0, 4], [5, 0, 2]]), np.array([[5.0, 1.0, 0.0], [2.0, 1.0, 0.0]]))
    ids, scores, exact_first = topk_ensemble.mean_topk([a, b], n_labels=6, k=4)
    assert ids.tolist() == [[3, 0, 1, 2], [5, 0, 1, 2]]
    assert scores.tolist() == [[3.0, 2.0, 1.0, 0.5], [3.0, 0.5, 0.5, 0.0]]
    # Label 3 is missing from list A, label 5 is in both.
    assert exact_first.tolist() == [False, True]


def test_lists_that_do_not_fit_are_refused_in_one_line(members, tmp_path):
    runs, lists = members
    with np.load(lists[1]) as stored:
        arrays = dict(stored)
    arrays["val_rows"] = arrays["val_rows"] + 1
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, **arrays)
    arrays = {**arrays, "val_rows": arrays["val_rows"] - 1, "test_ids": arrays["test_ids"][:, :3]}
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, **arrays)
    not_lists = tmp_path / "not.npz"
    not_lists.write_text("label:score lines")
    for path, expected in ((shifted, "the same data and validation split"), (narrow, "at least 5 labels"),
                           (not_lists, "not a file of `topk_ensemble.py dump`")):
        done = run_script("score", runs[0], lists[0], path)
        assert done.returncode != 0 and done.stderr.startswith(f"error: {path}") and expected in done.stderr
        assert done.stderr.count("\n") == 1
    done = run_script("dump", runs[0], tmp_path / "wide.npz", "--top-k", N_LABELS + 1)
    assert done.returncode != 0 and f"the run has {N_LABELS} labels" in done.stderr
    assert not (tmp_path / "wide.npz").exists()
    done = run_script("dump", runs[0], tmp_path / "missing" / "lists.npz", "--top-k", N_LABELS)
    assert done.returncode != 0 and done.stderr.startswith("error: ") and "does not exist" in done.stderr
