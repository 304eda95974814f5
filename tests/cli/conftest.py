"""A tiny finished run, trained once for the command tests that only read it."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data folder) of two epochs on 600 synthetic points with 80 labels; the list
    override ``eval.k=[1,3,5,10]`` is applied as the train help says."""
    runner = CliRunner()
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
    result = runner.invoke(app, ["train", str(config), "--out", str(run), "--set", "eval.k=[1,3,5,10]"])
    assert result.exit_code == 0, result.output
    assert "P@10" in json.loads((run / "final.json").read_text())["test"]
    return run, data
