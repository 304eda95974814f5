"""End-to-end training on a tiny synthetic set: run directory, checkpoints, resume after SIGKILL and
SIGINT and from a last.pt older than best.pt, NaN, a failed checkpoint write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.config import load_config
from xmlsparse.evaluate import evaluate
from xmlsparse.train import checkpoint
from xmlsparse.train.checkpoint import CheckpointWriteError, load_checkpoint
from xmlsparse.train.trainer import TrainingDiverged, resume_run, start_run

from tiny_runs import tiny_config

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "xmlsparse", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )


def test_run_directory_holds_config_metrics_checkpoints_and_final(tmp_path, tiny_data):
    run = tmp_path / "run"
    final = start_run(load_config(tiny_config(tmp_path, tiny_data)), run).fit()
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    for key in ("loss", "val_P@1", "val_P@3", "lr", "rewired_fraction", "epoch_seconds", "samples_per_second",
                "peak_memory_bytes"):
        assert key in lines[0]
    for line in lines:
        # Where an epoch's time goes: the steps, validation, and the training thread's checkpointing.
        assert line["step_seconds"] == line["epoch_seconds"] > 0
        assert line["validation_seconds"] > 0 and line["checkpoint_seconds"] > 0
        parts = line["step_seconds"] + line["validation_seconds"] + line["checkpoint_seconds"]
        assert parts <= line["epoch_wall_seconds"] <= parts + 5
    # 34 steps an epoch, rewiring every 10 steps until 66 % of 102 steps: rounds at 10..60.
    assert sum(line["rewired_fraction"] for line in lines) == pytest.approx(0.6, abs=0.05)
    assert json.loads((run / "final.json").read_text())["test"] == final["test"]
    memory = final["memory"]
    # Adam keeps two fp32 moments per weight: twice the parameters' bytes.
    n_params = memory["encoder"] + memory["intermediate"] + memory["head_params"]
    assert memory["optimizer_state"] >= 2 * n_params
    # The model learns: far above the 1/L chance level after three epochs.
    assert final["test"]["P@1"] > 0.2
    with pytest.raises(Exception, match="already holds a run"):
        start_run(load_config(tiny_config(tmp_path, tiny_data)), run)

    # best.pt is what evaluation needs: the model, its epoch and validation score, no optimizer state.
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert set(best) == {"model", "epoch", "best_score"}
    assert final["best_validation"] == {"P@3": best["best_score"]}
    assert final["best_epoch"] == best["epoch"]
    assert "optimizer" in load_checkpoint(run / "checkpoints" / "last.pt")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(run), "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    for key in ("P@1", "P@3", "nDCG@5"):
        assert measured[key] == pytest.approx(final["test"][key])


def test_a_run_still_improving_at_its_last_epoch_says_how_to_continue(tmp_path, tiny_data, capsys, monkeypatch):
    run = tmp_path / "run"
    start_run(load_config(tiny_config(tmp_path, tiny_data, epochs=1)), run).fit(test=False)
    # The first epoch always improves on no score at all.
    assert f"still improved in the last epoch (1): more epochs may help; continue with --resume {run}" \
        in capsys.readouterr().err

    # Validation scores that never change after the first epoch: the epoch limit (patience 0) or
    # early stopping (patience 1) ends the run after epochs without improvement, and neither hints.
    first: dict[str, float] = {}

    def unchanging(*args, **kwargs):
        if not first:
            first.update(evaluate(*args, **kwargs))
        return dict(first)

    monkeypatch.setattr("xmlsparse.train.trainer.evaluate", unchanging)
    for name, patience in (("limit", 0), ("stopped", 1)):
        config = tiny_config(tmp_path, tiny_data, epochs=3, early_stopping={"patience": patience})
        start_run(load_config(config), tmp_path / name).fit(test=False)
        assert "more epochs may help" not in capsys.readouterr().err


def test_bf16_moments_and_head_update_in_backward_train_and_resume(tmp_path, tiny_data):
    optimizer = {"lr": 3.0e-3, "moments": "bfloat16", "head_update_in_backward": True}
    whole_run = start_run(load_config(tiny_config(tmp_path, tiny_data, optimizer=optimizer)), tmp_path / "whole")
    assert whole_run.model.head.grad_weight_sink is not None
    whole = whole_run.fit()
    memory = whole["memory"]
    # Two bf16 moments per weight: the parameters' bytes, half of torch's Adam state.
    n_params = memory["encoder"] + memory["intermediate"] + memory["head_params"]
    assert memory["optimizer_state"] == n_params
    assert memory["optimizer_head"] == memory["head_params"]
    assert whole["test"]["P@1"] > 0.2

    # One epoch, its checkpoint (written in the foreground here), then a new process's worth of
    # objects resumes from it.
    split = start_run(load_config(tiny_config(tmp_path, tiny_data, optimizer=optimizer,
                                              checkpoint={"background": False})), tmp_path / "split")
    assert split._train_epoch()
    split._end_epoch()
    del split
    resumed = resume_run(tmp_path / "split").fit()
    assert resumed["test"] == whole["test"]


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, epochs=6)
    whole = run_cli("train", str(config), "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = run_cli("train", str(config), "--out", str(tmp_path / "killed"))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (tmp_path / "killed" / "final.json").exists()

    resumed = run_cli("train", "--resume", str(tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    expected = json.loads((tmp_path / "whole" / "final.json").read_text())["test"]
    assert json.loads((tmp_path / "killed" / "final.json").read_text())["test"] == expected


def test_sigint_saves_and_exits_cleanly_then_resumes(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, epochs=40)
    run = tmp_path / "run"
    process = run_cli("train", str(config), "--out", str(run))
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert "--resume" in process.stderr.read()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] > 0
    trainer = resume_run(run)
    assert trainer.step == state["step"] and trainer.epoch == state["epoch"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    run = tmp_path / "run"
    trainer = start_run(load_config(tiny_config(tmp_path, tiny_data, epochs=2)), run)
    trainer._train_epoch()
    trainer._end_epoch()
    trainer.checkpoints.wait()
    good = (run / "checkpoints" / "last.pt").read_bytes()

    def nan_loss(logits, y_indices, y_ptr):
        return logits.sum() * float("nan")

    trainer.loss = nan_loss
    with pytest.raises(TrainingDiverged, match="loss became nan.*checkpoint, .*last.pt, is kept"):
        trainer.fit()
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not (run / "final.json").exists()


def test_nan_loss_before_any_checkpoint_says_none_exists(tmp_path, tiny_data):
    run = tmp_path / "run"
    trainer = start_run(load_config(tiny_config(tmp_path, tiny_data, epochs=2)), run)
    trainer.loss = lambda logits, y_indices, y_ptr: logits.sum() * float("nan")
    with pytest.raises(TrainingDiverged, match="no full checkpoint was written yet") as error:
        trainer.fit()
    assert "is kept" not in str(error.value)
    assert not (run / "checkpoints" / "last.pt").exists()


def test_resume_from_a_last_checkpoint_older_than_best_ends_like_an_uninterrupted_run(tmp_path, tiny_data):
    """With a full checkpoint every second epoch, a kill after epoch 3 leaves last.pt of epoch 2 and
    best.pt of epoch 3: the resume trains epoch 3 again (finding the same best score, so rewriting
    best.pt), replaces its metrics line, and ends where the uninterrupted run does."""
    every_two = {"every_epochs": 2}
    config = tiny_config(tmp_path, tiny_data, epochs=5, checkpoint=every_two)
    whole = start_run(load_config(config), tmp_path / "whole").fit()

    run = tmp_path / "killed"
    trainer = start_run(load_config(config), run)
    for _ in range(3):
        assert trainer._train_epoch()
        trainer._end_epoch()
    trainer.checkpoints.wait()
    del trainer  # the process is gone: what it wrote is all that is left
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 3
    (run / "checkpoints" / ".last.pt.killed.tmp").write_bytes(b"a write cut short")

    resumed = resume_run(run)
    assert not (run / "checkpoints" / ".last.pt.killed.tmp").exists()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    final = resumed.fit()
    assert final["test"] == whole["test"] and final["best_validation"] == whole["best_validation"]

    def trajectory(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k.startswith(("epoch", "step", "loss", "val_", "lr", "rewired"))
                 and not k.endswith("seconds")} for line in lines]

    assert trajectory(run) == trajectory(tmp_path / "whole")
    assert [line["epoch"] for line in trajectory(run)] == [1, 2, 3, 4, 5]
    for name in ("best.pt", "last.pt"):
        expected, got = (load_checkpoint(r / "checkpoints" / name) for r in (tmp_path / "whole", run))
        assert got["epoch"] == expected["epoch"] and got["best_score"] == expected["best_score"]
        for key, tensor in expected["model"].items():
            assert torch.equal(got["model"][key], tensor), (name, key)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 5  # written at the end, off the interval


def test_a_failed_background_checkpoint_write_stops_the_run(tmp_path, tiny_data, monkeypatch):
    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    run = tmp_path / "run"
    trainer = start_run(load_config(tiny_config(tmp_path, tiny_data, epochs=2)), run)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        trainer.fit()
    assert not (run / "final.json").exists()


def test_missing_registry_data_set_names_the_download_command(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "eurlex-4k", "root": str(tmp_path / "data")},
        "model": {"intermediate": {"size": 64}, "head": {"fan_in": 8}},
    }))
    process = run_cli("train", str(config), "--out", str(tmp_path / "run"))
    assert process.wait(timeout=120) == 2
    assert "xmlsparse download-dataset eurlex-4k" in process.stderr.read()
    assert not (tmp_path / "run").exists()
