"""The `xmlsparse` commands, run as a user runs them: help, datasets, synth, train, eval, predict."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_run(train_tiny_run) -> tuple[Path, Path]:
    return train_tiny_run("train.optimizer.lr=3e-3")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("datasets", "download-dataset", "synth", "train", "eval", "predict"):
        assert command in result.output


def test_datasets_lists_the_registry(tmp_path):
    result = invoke("datasets", "--root", str(tmp_path))
    assert result.exit_code == 0
    assert "amazon-670k" in result.output and "670,091" in result.output and "missing" in result.output


def test_eval_of_a_run_directory_matches_final_json(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "m.json"
    result = invoke("eval", str(run), "--json", str(out), "--save-predictions")
    assert result.exit_code == 0, result.output
    final = json.loads((run / "final.json").read_text())
    measured = json.loads(out.read_text())
    by_frequency = measured.pop("by_frequency")
    assert measured == pytest.approx({k: final["test"][k] for k in measured})
    assert len(by_frequency) == len(final["test_by_frequency"]) == 3
    for row, row_final in zip(by_frequency, final["test_by_frequency"]):
        assert row == pytest.approx(row_final)
    assert (run / "predictions-test.txt").is_file()
    result = invoke("eval", str(run), "--split", "val", "--k", "1,2", "--buckets", "0")
    assert result.exit_code == 0 and "by training label frequency" not in result.output


def test_eval_of_a_prediction_file_matches_the_run(trained_run, tmp_path):
    run, data = trained_run
    invoke("eval", str(run), "--save-predictions")
    out = tmp_path / "m.json"
    result = invoke("eval", "--predictions", str(run / "predictions-test.txt"), "--truth", str(data / "Y.tst.npz"),
                    "--train", str(data / "Y.trn.npz"), "--A", "0.55", "--B", "1.5", "--json", str(out))
    assert result.exit_code == 0, result.output
    from_file = json.loads(out.read_text())
    final = json.loads((run / "final.json").read_text())["test"]
    for key in ("P@1", "P@3", "P@5", "nDCG@5", "R@5"):
        assert from_file[key] == pytest.approx(final[key])
    assert set(from_file) >= {"PSP@1", "PSnDCG@5"}


def test_eval_of_a_prediction_file_prints_and_writes_the_frequency_table(trained_run, tmp_path):
    run, data = trained_run
    invoke("eval", str(run), "--save-predictions")
    files = ["--predictions", str(run / "predictions-test.txt"), "--truth", str(data / "Y.tst.npz")]
    out = tmp_path / "m.json"
    result = invoke("eval", *files, "--train", str(data / "Y.trn.npz"), "--A", "0.55", "--B", "1.5", "--json", str(out))
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    table = written["by_frequency"]
    lines = result.output.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("bucket")))
    assert lines[start].split() == ["bucket", "labels", "freq", "range", "P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5"]
    assert len(lines) == start + 4
    for line, row in zip(lines[start + 1 :], table):
        cells = line.split()
        assert cells[:3] == [row["bucket"], str(row["labels"]), f"{row['freq_min']}-{row['freq_max']}"]
        assert cells[3:] == [f"{100 * row[key]:.2f}" for key in ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")]
    assert [row["bucket"] for row in table] == ["head", "torso", "tail"]
    assert sum(row["labels"] for row in table) == 80
    for key in ("P@1", "P@5", "PSP@1", "PSP@5"):
        assert sum(row[key] for row in table) == pytest.approx(written[key])
    # The same buckets and values as the run's own test evaluation (the same training labels).
    for row, row_final in zip(table, json.loads((run / "final.json").read_text())["test_by_frequency"]):
        assert row == pytest.approx(row_final)

    five = invoke("eval", *files, "--train", str(data / "Y.trn.npz"), "--buckets", "5", "--json", str(out))
    assert five.exit_code == 0 and len(json.loads(out.read_text())["by_frequency"]) == 5
    without_train = invoke("eval", *files, "--json", str(out))
    assert without_train.exit_code == 0 and "by training label frequency" not in without_train.output
    assert "by_frequency" not in json.loads(out.read_text())


def test_predict_writes_top_k_lines(trained_run, tmp_path):
    run, data = trained_run
    out = tmp_path / "pred.txt"
    result = invoke("predict", str(run), str(data / "X.tst.npy"), "--top-k", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "150 80" and len(lines) == 151
    assert all(len(line.split()) == 3 for line in lines[1:])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval"], "give a RUN_DIR, or --predictions PRED --truth TEST"),
        (["eval", "nowhere", "--k", "1,x"], "--k '1,x': expected comma-separated positive integers"),
        (["eval", "nowhere"], "nowhere: not a run directory"),
        (["eval", "--predictions", "p.txt"], "--predictions needs --truth"),
        (["eval", "--predictions", "p.txt", "--truth", "t.txt", "--buckets", "2"], "--buckets 2 needs --train TRAIN"),
        (["eval", "nowhere", "--buckets", "-1"], "--buckets -1: expected a number of frequency buckets"),
        (["train", "missing.yaml"], "missing.yaml: config file not found"),
        (["train", "missing.yaml", "--device", "tpu"], "--device 'tpu': expected cpu, cuda or auto"),
        (["download-dataset", "nope"], "unknown data set 'nope'"),
        (["download-dataset", "eurlex-4k", "--variant", "xml"], "--variant 'xml': expected bow or raw"),
        (["synth", "--features", "pixels", "--like", "quickstart"], "features must be 'dense' or 'bow'"),
        (["synth", "--n-train", "10"], "is required when no data set to imitate"),
    ],
)
def test_bad_arguments_give_one_clear_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_predict_applies_the_training_preprocessing(tmp_path):
    """A BoW run with idf weighting: predicting the test file gives the same top-k as evaluating
    the run's test split, so new inputs go through the transform fitted on train."""
    data = tmp_path / "data"
    assert invoke("synth", "--n-train", "400", "--n-test", "120", "--n-labels", "60", "--labels-per-point", "3",
                  "--features", "bow", "--n-features", "300", "--out", str(data)).exit_code == 0
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": str(data), "features": "bow", "tfidf": True, "normalize": True},
        "model": {"encoder": {"dim": 32}, "intermediate": {"size": 48}, "head": {"fan_in": 6}, "rewire": None},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
    }))
    run = tmp_path / "run"
    assert invoke("train", str(config), "--out", str(run)).exit_code == 0
    assert invoke("eval", str(run), "--k", "1,3", "--save-predictions").exit_code == 0
    out = tmp_path / "pred.txt"
    result = invoke("predict", str(run), str(data / "X.tst.npz"), "--top-k", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    expected = [[token.split(":")[0] for token in line.split()] for line in (run / "predictions-test.txt").read_text().splitlines()[1:]]
    predicted = [[token.split(":")[0] for token in line.split()] for line in out.read_text().splitlines()[1:]]
    assert predicted == expected


XC_TRAIN = "3 4 3\n0 1:1\n1 2:1\n2 3:1\n"  # 3 points, 4 features, 3 labels


def xc_set(folder: Path, train: str, test: str) -> None:
    (folder / "train.txt").write_text(train)
    (folder / "test.txt").write_text(test)


def dense_set_with_nan(folder: Path) -> None:
    for split, n_points in (("trn", 3), ("tst", 2)):
        rows = np.ones((n_points, 2), np.float32)
        sp.save_npz(folder / f"Y.{split}.npz", sp.csr_matrix(np.eye(n_points, 3, dtype=np.float32)))
        np.save(folder / f"X.{split}.npy", rows)
    rows[1, 0] = np.nan
    np.save(folder / "X.tst.npy", rows)


def npz_set_with_text_labels(folder: Path) -> None:
    for split, n_points in (("trn", 3), ("tst", 2)):
        sp.save_npz(folder / f"X.{split}.npz", sp.csr_matrix(np.ones((n_points, 4), np.float32)))
        sp.save_npz(folder / f"Y.{split}.npz", sp.csr_matrix(np.eye(n_points, 3, dtype=np.float32)))
    (folder / "Y.tst.npz").write_text("2 3\n0:1\n1:1\n")


@pytest.mark.parametrize(
    ("make", "features", "message"),
    [
        (
            lambda d: xc_set(d, XC_TRAIN, "2 9 3\n0 1:1\n1 8:1\n"),
            "bow",
            "test.txt: the test split has 9 features but the training split",
        ),
        (lambda d: xc_set(d, XC_TRAIN, "2 4 7\n6 1:1\n1 2:1\n"), "bow", "test.txt: the test split has 7 labels"),
        (
            lambda d: xc_set(d, "3 4 3\n0 1:1\n1 2:nan\n2 3:1\n", XC_TRAIN),
            "bow",
            "train.txt line 3: value 'nan' of feature 2 is not finite",
        ),
        (dense_set_with_nan, "dense", "X.tst.npy: row 1 (counting from 0) holds nan in column 0"),
        (npz_set_with_text_labels, "bow", "Y.tst.npz: not an npz archive (it is text starting '2 3')"),
    ],
    ids=["test-features-beyond-train", "test-labels-beyond-train", "nan-in-text", "nan-in-npy", "text-named-npz"],
)
def test_bad_data_set_stops_train_before_a_run_directory(make, features, message, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": str(data), "features": features},
        "model": {"intermediate": {"size": 16}, "head": {"fan_in": 4}},
        "train": {"epochs": 1, "device": "cpu"},
    }))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not run.exists()
