"""A run directory is self-contained: the config names its data by absolute paths, prediction reads
only the directory (so it can move), --resume keeps the run's own config, --overwrite replaces a
run, and training opens with a summary of the data, the model and its memory."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import sklearn.feature_extraction.text
import sklearn.preprocessing
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.config import config_from_dict, load_config
from xmlsparse.data.types import XMCData
from xmlsparse.data.synthetic import generate
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.setup import fit_preprocessing, load_run_inputs, with_absolute_data_paths
from xmlsparse.train.trainer import start_run

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def bow_data(tmp_path_factory) -> Path:
    """A small BoW set with count features (so idf applies) and a label map beside it."""
    folder = tmp_path_factory.mktemp("bow") / "data"
    generate(folder, n_train=400, n_test=120, n_labels=60, labels_per_point=3.0, features="bow", n_features=300,
             seed=1)
    (folder / "label_map.txt").write_text("".join(f"{i}\tlabel-{i}\n" for i in range(60)))
    return folder


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("dense") / "data", n_train=600, n_test=150, n_labels=80,
                    labels_per_point=3.0, dim=24, seed=3)


def write_config(path: Path, dataset: str, features: str, epochs: int = 1, **data) -> Path:
    encoder = {"dim": 32} if features == "bow" else {}
    path.write_text(yaml.safe_dump({
        "data": {"dataset": dataset, "features": features, **data},
        "model": {"encoder": encoder, "intermediate": {"size": 48}, "head": {"fan_in": 6},
                  "rewire": {"interval": 5}},
        "train": {"epochs": epochs, "batch_size": 32, "device": "cpu", "checkpoint": {"background": False}},
    }))
    return path


def test_a_moved_run_directory_predicts_the_same_from_another_working_directory(tmp_path, bow_data, monkeypatch):
    # Trained from a working directory that names the data by a relative path.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(bow_data, work / "data")
    monkeypatch.chdir(work)
    config = write_config(work / "c.yaml", "data", "bow", tfidf=True, normalize=True)
    assert invoke("train", str(config), "--out", "runs/bow").exit_code == 0

    run = work / "runs" / "bow"
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["dataset"] == saved["root"] == str(work / "data")  # the root: "data" by default
    stored = json.loads((run / "preprocessing.json").read_text())
    assert stored == {"features": "bow", "n_features": 300, "n_labels": 60, "normalize": True, "idf": "idf.npy",
                      "label_map": "label_map.txt", "label_order": None, "label_implications": None}
    assert (run / "label_map.txt").read_text() == (bow_data / "label_map.txt").read_text()

    # New inputs live apart from the training data, which then disappears with the old machine.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("X.tst.npz", "Y.tst.npz"):
        shutil.copy(bow_data / name, inputs / name)
    before = tmp_path / "before.txt"
    assert invoke("predict", "runs/bow", str(inputs / "X.tst.npz"), "--out", str(before)).exit_code == 0

    moved = tmp_path / "elsewhere" / "bow"
    moved.parent.mkdir()
    shutil.move(run, moved)
    shutil.rmtree(work)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    after = other / "after.txt"
    result = invoke("predict", str(moved), str(inputs / "X.tst.npz"), "--out", "after.txt")
    assert result.exit_code == 0, result.output
    assert after.read_text() == before.read_text()

    # eval needs the data: the error names what is missing and where to point the run at it.
    result = runner.invoke(app, ["eval", str(moved)])
    assert result.exit_code == 2
    assert str(work / "data") in result.output and str(moved / "config.yaml") in result.output


def test_predict_of_a_run_directory_from_before_the_stored_preprocessing(tmp_path, dense_data):
    """A run directory without preprocessing.json cannot predict; eval, which reads the training
    data anyway, stores it, and predict then works."""
    run = tmp_path / "run"
    start_run(load_config(write_config(tmp_path / "c.yaml", str(dense_data), "dense")), run).fit()
    (run / "preprocessing.json").unlink()
    result = runner.invoke(app, ["predict", str(run), str(dense_data / "X.tst.npy")])
    assert result.exit_code == 2
    assert f"{run / 'preprocessing.json'} is missing" in result.output and f"xmlsparse eval {run}" in result.output
    assert invoke("eval", str(run)).exit_code == 0
    assert load_run_inputs(run).n_labels == 80
    assert invoke("predict", str(run), str(dense_data / "X.tst.npy")).exit_code == 0
    result = runner.invoke(app, ["predict", str(run), str(dense_data / "Y.tst.npz")])
    assert result.exit_code == 2 and "reads dense feature rows (.npy)" in result.output


def test_stored_preprocessing_matches_the_fitted_transform_and_checks_its_file(tmp_path):
    counts = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 3, 1, 0], [1, 1, 0, 4]], dtype=np.float32))
    train = XMCData(counts, sp.csr_matrix(np.eye(3, dtype=np.float32)), 4, 3)
    config = config_from_dict({"data": {"dataset": "unused", "features": "bow", "tfidf": True, "normalize": True},
                               "model": {"intermediate": None}})
    fitted = fit_preprocessing(config, train)
    # sklearn's own transformer, which the stored idf must reproduce exactly.
    expected = sklearn.preprocessing.normalize(
        sklearn.feature_extraction.text.TfidfTransformer(norm=None).fit(counts).transform(counts).astype(np.float32)
    )
    assert np.array_equal(fitted(train).X.toarray(), expected.toarray())
    dense = fit_preprocessing(config_from_dict({"data": {"dataset": "unused", "features": "dense"},
                                                "model": {"intermediate": None}}), train)
    assert (dense.idf, dense.normalize) == (None, False)

    (tmp_path / "preprocessing.json").write_text(json.dumps(
        {"features": "bow", "n_features": 4, "n_labels": 3, "normalize": "yes", "idf": None, "label_map": None}
    ))
    with pytest.raises(XMLSparseError, match="preprocessing.json: key 'normalize' is 'yes', expected true or false"):
        load_run_inputs(tmp_path)
    (tmp_path / "preprocessing.json").write_text(json.dumps(
        {"features": "bow", "n_features": 4, "n_labels": 3, "normalize": True, "idf": "idf.npy", "label_map": None}
    ))
    np.save(tmp_path / "idf.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(XMLSparseError, match=r"idf.npy: expected 4 float idf weights, found float32 of shape \(5,\)"):
        load_run_inputs(tmp_path)


def test_data_paths_become_absolute_as_the_loader_would_find_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root" / "mine").mkdir(parents=True)
    (tmp_path / "here").mkdir()

    def absolute(dataset, root="root"):
        config = config_from_dict({"data": {"dataset": dataset, "root": root}, "model": {"intermediate": None}})
        data = with_absolute_data_paths(config).data
        return data.dataset, data.root

    assert absolute("here") == (str(tmp_path / "here"), str(tmp_path / "root"))
    assert absolute("mine") == (str(tmp_path / "root" / "mine"), str(tmp_path / "root"))  # found under the root
    assert absolute("amazon-670k")[0] == "amazon-670k"  # a registry name stays a name
    assert absolute("nowhere")[0] == "nowhere"  # left for the loader's error
    assert absolute({"train": "a/train.txt", "test": ["b/x.txt", "../c.txt"]})[0] == {
        "train": str(tmp_path / "a" / "train.txt"),
        "test": [str(tmp_path / "b" / "x.txt"), str(tmp_path.parent / "c.txt")],
    }


@pytest.fixture
def finished_run(tmp_path, dense_data) -> tuple[Path, Path]:
    config = write_config(tmp_path / "c.yaml", str(dense_data), "dense", epochs=2)
    run = tmp_path / "run"
    assert invoke("train", str(config), "--out", str(run)).exit_code == 0
    return run, config


def run_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["CONFIG"], "a resumed run keeps its own"),
        (["--out", "elsewhere"], "--out elsewhere with --resume"),
        (["--overwrite"], "--overwrite with --resume"),
        (["--set", "train.optimizer.lr=0.1"], "only train.epochs=N (more epochs than the run's) may be set"),
        (["--set", "train.epochs=2"], "plans 2 epochs already; a resume may only add epochs"),
        (["--set", "train.epochs=many"], "expected train.epochs=N, N a positive whole number"),
    ],
)
def test_resume_refuses_what_it_would_ignore(finished_run, extra, message):
    run, config = finished_run
    before = run_files(run)
    args = [str(config) if item == "CONFIG" else item for item in extra]
    result = runner.invoke(app, ["train", *args, "--resume", str(run)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert run_files(run) == before


def test_resume_of_a_finished_run_changes_nothing_and_more_epochs_continue_it(finished_run):
    run, _ = finished_run
    before = run_files(run)
    result = invoke("train", "--resume", str(run))
    assert result.exit_code == 0, result.output
    assert f"{run} is finished" in result.output and "--set train.epochs=N with N greater than 2" in result.output
    assert run_files(run) == before

    result = invoke("train", "--resume", str(run), "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run / "final.json").read_text())["epochs"] == 3


def test_train_needs_a_config_without_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "give a CONFIG to start a run, or --resume RUN_DIR" in result.output


def test_overwrite_replaces_a_run_only_once_its_config_and_data_load(finished_run, tmp_path):
    run, config = finished_run
    result = runner.invoke(app, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 2 and "already holds a run" in result.output and "--overwrite" in result.output

    (run / "predictions.txt").write_text("from the old run\n")
    before = run_files(run)
    result = runner.invoke(app, ["train", str(config), "--out", str(run), "--overwrite",
                                 "--set", f"data.dataset={tmp_path / 'gone'}"])
    assert result.exit_code == 2 and str(tmp_path / "gone") in result.output
    assert run_files(run) == before

    result = invoke("train", str(config), "--out", str(run), "--overwrite", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert not (run / "predictions.txt").exists()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_training_starts_with_a_summary_of_data_model_memory_and_run(tmp_path, dense_data, capsys):
    config = load_config(write_config(tmp_path / "c.yaml", str(dense_data), "dense", validation=0.1))
    run = tmp_path / "run"
    trainer = start_run(config, run)
    trainer.fit()
    log = capsys.readouterr().err.splitlines()
    summary, first_epoch = log[:4], log[4]
    labels_per_point = trainer.data.train.Y.nnz / 600
    assert summary[0] == (f"data:   {trainer.data.name}: 540 train / 60 validation / 150 test points, "
                          f"24 dense features, 80 labels, {labels_per_point:.2f} labels a point")
    # A dense encoder without hidden layers has no weights; the intermediate layer 24 x 48 + 48;
    # the head 80 x 6 weights + 80 biases (2,240 bytes), and an int32 index of 80 x 6 (1,920 bytes).
    assert summary[1] == ("model:  1,760 parameters (encoder 0, intermediate 1,200, head 560); "
                          "head 4.1 KiB (weights and bias 2.2 KiB, index 1.9 KiB)")
    model_bytes = 4 * (1200 + 560) + 4 * 480  # fp32 weights and biases, int32 index
    gradients, moments, logits = 4 * 1760, 2 * 4 * 1760, 32 * 80 * 4
    peak = model_bytes + gradients + moments + logits
    assert summary[2] == (f"device: cpu, fp32; estimated peak memory {peak / 1024:.1f} KiB "
                          f"(model {model_bytes / 1024:.1f} KiB, "
                          f"gradients {gradients / 1024:.1f} KiB, optimizer state {moments / 1024:.1f} KiB, "
                          f"one batch's logits {logits / 1024:.1f} KiB)")
    assert summary[3] == f"run:    {run}"
    assert first_epoch.startswith("epoch 1: ")
    assert log[-1] == "test evaluation: the best checkpoint (epoch 1) on 150 test points"
