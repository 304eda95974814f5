"""Tiny finished runs, trained once for the command tests that only read them."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app


@pytest.fixture(scope="session")
def train_tiny_run(tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """A function that trains, through the commands, two epochs on 600 synthetic points with 80
    labels, with the given ``--set`` overrides, and returns (run directory, data folder)."""
    runner = CliRunner()

    def train(*overrides: str) -> tuple[Path, Path]:
        folder = tmp_path_factory.mktemp("tiny")
        data = folder / "data"
        result = runner.invoke(app, ["synth", "--n-train", "600", "--n-test", "150", "--n-labels", "80",
                                     "--labels-per-point", "3", "--dim", "24", "--out", str(data)])
        assert result.exit_code == 0, result.output
        config = folder / "c.yaml"
        config.write_text(yaml.safe_dump({
            "data": {"dataset": str(data), "features": "dense"},
            "model": {"intermediate": {"size": 48}, "head": {"fan_in": 6}, "rewire": {"interval": 5}},
            "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
        }))
        run = folder / "run"
        sets = [arg for override in overrides for arg in ("--set", override)]
        result = runner.invoke(app, ["train", str(config), "--out", str(run), *sets])
        assert result.exit_code == 0, result.output
        assert "P " in result.output and "@5" in result.output
        return run, data

    return train


@pytest.fixture(scope="session")
def tiny_run(train_tiny_run) -> tuple[Path, Path]:
    """A tiny run with the list override ``eval.k=[1,3,5,10]``, applied as the train help says."""
    run, data = train_tiny_run("eval.k=[1,3,5,10]")
    assert "P@10" in json.loads((run / "final.json").read_text())["test"]
    return run, data
