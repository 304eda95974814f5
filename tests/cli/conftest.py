"""A tiny finished run, trained once for the command tests that only read it."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run(train_tiny_run) -> tuple[Path, Path]:
    """A tiny run with the list override ``eval.k=[1,3,5,10]``, applied as the train help says."""
    run, data = train_tiny_run("eval.k=[1,3,5,10]")
    assert "P@10" in json.loads((run / "final.json").read_text())["test"]
    return run, data
