"""`xmlsparse tune` on a tiny synthetic set: trial run directories scored on validation only, the
study continued from its sqlite file, best.yaml trainable, pruning recorded, bad spaces refused."""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.config import load_config
from xmlsparse.data.synthetic import generate
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.trainer import start_run
from xmlsparse.tune import check_space, default_space, load_space, tune_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tune")
    data = generate(folder / "data", n_train=600, n_test=150, n_labels=60, labels_per_point=3.0, dim=24, seed=3)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"dataset": str(data), "features": "dense", "validation": 0.2},
        "model": {
            "encoder": {"type": "dense", "dropout": 0.1},
            "intermediate": {"size": 48},
            "head": {"type": "fixed-fanin", "fan_in": 6},
            "rewire": {"interval": 5},
        },
        "train": {"epochs": 5, "batch_size": 32, "device": "cpu"},
    }))
    return path


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def test_tune_runs_trials_on_validation_writes_best_yaml_and_continues(tiny_config, tmp_path):
    out = tmp_path / "study"
    result = invoke("tune", str(tiny_config), "--trials", "3", "--set", "train.epochs=2", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert [row["trial"] for row in rows] == [0, 1, 2]
    assert (out / "study.db").is_file()
    for row in rows:
        run = out / f"trial-{row['trial']:03d}"
        assert row["run_dir"] == str(run)
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        # Each trial trained its own draw of the default space (dense features: no word dropout).
        assert set(row["params"]) == {"train.optimizer.lr", "train.optimizer.weight_decay", "model.encoder.dropout"}
        trained = load_config(run / "config.yaml")
        assert trained.train.optimizer.lr == row["params"]["train.optimizer.lr"]
        assert trained.model.encoder.dropout == row["params"]["model.encoder.dropout"]
        # Model selection never scores the test split (pruned trials write final.json too).
        final = json.loads((run / "final.json").read_text())
        assert not any(key.startswith("test") for key in final)
        if row["state"] == "COMPLETE":
            assert final["best_validation"]["P@3"] == row["value"]
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert row["value"] == max(line["val_P@3"] for line in metrics)
    completed = [row for row in rows if row["state"] == "COMPLETE"]
    best = max(completed, key=lambda row: row["value"])
    assert best["value"] == max(row["value"] for row in completed)
    # The table, the best trial marked, and the command that trains its config.
    assert "val P@3" in result.output and f"{best['trial']}*" in result.output
    assert f"xmlsparse train {out / 'best.yaml'}" in result.output

    # best.yaml is the best trial's resolved config and trains as it is, test evaluation included.
    config = load_config(out / "best.yaml")
    assert config.train.optimizer.lr == best["params"]["train.optimizer.lr"]
    assert config.train.optimizer.weight_decay == best["params"]["train.optimizer.weight_decay"]
    assert config.model.encoder.dropout == best["params"]["model.encoder.dropout"]
    assert config.train.epochs == 2
    assert "P@1" in start_run(config, tmp_path / "best").fit()["test"]

    # The same command continues the study with new draws; another setup is refused in one line.
    again = invoke("tune", str(tiny_config), "--trials", "1", "--set", "train.epochs=2", "--out", str(out))
    assert again.exit_code == 0, again.output
    rows = read_rows(out)
    assert [row["trial"] for row in rows] == [0, 1, 2, 3] and (out / "trial-003" / "config.yaml").is_file()
    assert rows[3]["params"] not in [row["params"] for row in rows[:3]]
    other = invoke("tune", str(tiny_config), "--trials", "1", "--set", "train.epochs=3", "--out", str(out))
    assert other.exit_code == 2
    assert other.stderr.splitlines() == [
        f"error: {out / 'study.db'} holds a study of another config or search space (it differs at "
        "config.train.epochs); tune again with the same CONFIG, --set and --space, or pick another --out"
    ]
    assert not (out / "trial-004").exists()


def test_pruned_trials_stop_early_and_are_recorded_as_pruned(tiny_config, tmp_path):
    out = tmp_path / "study"
    # Every validation score is below 2: this pruner stops every trial at its first report.
    result = tune_config(tiny_config, 2, out, ["train.epochs=3"], pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    assert [row["state"] for row in result.rows] == ["PRUNED", "PRUNED"]
    assert [row["state"] for row in read_rows(out)] == ["PRUNED", "PRUNED"]
    for row in result.rows:
        assert row["epochs"] == 1
        assert len((out / f"trial-{row['trial']:03d}" / "metrics.jsonl").read_text().splitlines()) == 1
    # No completed trial, so no best config yet.
    assert result.best is None and result.best_config is None and not (out / "best.yaml").exists()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.optimizer.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
         "space.yaml: unknown key 'train.optimizer.learning_rate'"),
        ({"train.epochs": {"type": "float", "low": 1, "high": 3}},
         "space.yaml: train.epochs = 1.0: expected int, got float"),
        ({"train.loss": {"type": "categorical", "choices": ["bce", "hinge"]}},
         "space.yaml: train.loss = 'hinge': expected one of squared-hinge, bce"),
        ({"model.encoder.dropout": {"type": "float", "low": 0.5, "high": 0.1}},
         "space.yaml: model.encoder.dropout: low = 0.5, high = 0.1: expected low < high"),
        ({"train.optimizer.lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}},
         "space.yaml: train.optimizer.lr: log = true needs low > 0, got low = 0.0"),
        ({"train.optimizer.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}},
         "space.yaml: train.optimizer.lr: type = 'uniform': expected one of float, int, categorical"),
        ({"train.early_stopping.metric": {"type": "categorical", "choices": ["P@1", "P@3"]}},
         "space.yaml: train.early_stopping.metric is the metric being optimised"),
    ],
)
def test_a_bad_space_gives_one_line_error_before_any_trial(tiny_config, tmp_path, monkeypatch, space, message):
    monkeypatch.chdir(tmp_path)
    Path("space.yaml").write_text(yaml.safe_dump(space))
    result = invoke("tune", str(tiny_config), "--trials", "2", "--out", "study", "--space", "space.yaml")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert not Path("study").exists()


def test_space_file_ranges_and_choices_and_switched_off_sections(tmp_path):
    path = tmp_path / "space.yaml"
    # `1e-4` without a dot is a string to PyYAML; it is still a bound.
    path.write_text("train.optimizer.lr: {type: float, low: 1e-4, high: 1.0e-2, log: true}\n"
                    "train.batch_size: {type: int, low: 16, high: 64}\n"
                    "train.loss: {type: categorical, choices: [bce, squared-hinge]}\n")
    space = load_space(path)
    assert (space["train.optimizer.lr"].low, space["train.optimizer.lr"].log) == (1e-4, True)
    assert space["train.batch_size"].extremes() == [16, 64]
    assert space["train.loss"].extremes() == ["bce", "squared-hinge"]
    check_space(space, {"data": {"dataset": "d"}, "model": {"intermediate": {"size": 64}}, "train": {"epochs": 2}},
                "space.yaml")
    # A key below a section the config turns off would turn it on.
    rewire = {"model.rewire.fraction": space["train.optimizer.lr"]}
    with pytest.raises(XMLSparseError, match="model.rewire is null"):
        check_space(rewire, {"model": {"rewire": None}}, "space.yaml")


def test_default_space_searches_word_dropout_for_bow_and_decay_by_optimizer(tiny_config):
    dense = load_config(tiny_config)
    assert "model.encoder.input_dropout" not in default_space(dense)
    bow = load_config(tiny_config, ["data.features=bow", "model.encoder.type=null", "train.optimizer.type=adamw"])
    space = default_space(bow)
    assert set(space) == {"train.optimizer.lr", "train.optimizer.weight_decay", "model.encoder.dropout",
                          "model.encoder.input_dropout"}
    # AdamW's decoupled decay spans the shipped recipes' 1.0; Adam's coupled decay stays far below.
    assert space["train.optimizer.weight_decay"].high > 1.0 > default_space(dense)["train.optimizer.weight_decay"].high


def test_help_lists_tune():
    assert "tune" in invoke("--help").output
