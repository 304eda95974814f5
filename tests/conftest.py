import json
import os
from collections.abc import Callable
from pathlib import Path

# The suite tests the Triton kernels through Triton's interpreter, on CPU tensors (GPU checks are
# scripts/check_ops_gpu.py). Triton decorates its own library functions when it is first imported,
# so the interpreter has to be chosen before anything imports triton, i.e. here.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The small real data sets kept beside the repository (never copied into it)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATASETS} (the shared folder beside the repository)")
    return SHARED_DATASETS


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Parse caches of read-only sources go to a folder of the test run, not the user's home."""
    import os

    previous = os.environ.get("XMLSPARSE_CACHE_DIR")
    os.environ["XMLSPARSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("xmlsparse-cache"))
    yield
    if previous is None:
        os.environ.pop("XMLSPARSE_CACHE_DIR", None)
    else:
        os.environ["XMLSPARSE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def train_tiny_run(tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """A function that trains, through the commands, two epochs on 600 synthetic points with 80
    labels (24 dense features), with the given ``--set`` overrides, and returns (run directory,
    data folder). ``data`` reuses the folder of an earlier call, so that runs share their data."""
    from xmlsparse.cli import app

    runner = CliRunner()

    def train(*overrides: str, data: Path | None = None) -> tuple[Path, Path]:
        folder = tmp_path_factory.mktemp("tiny")
        if data is None:
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


@pytest.fixture
def prediction_scores(tmp_path) -> Callable[[Path, Path], dict[str, float]]:
    """A function that writes a run's top-5 predictions for the test features of its synthetic
    data with ``xmlsparse predict`` and scores that file with ``xmlsparse eval --predictions``:
    the metrics of what ``predict`` wrote, in the data set's label ids."""
    from xmlsparse.cli import app

    runner = CliRunner()

    def score(run: Path, data: Path) -> dict[str, float]:
        predictions, scores = tmp_path / "pred.txt", tmp_path / "scores.json"
        result = runner.invoke(app, ["predict", str(run), str(data / "X.tst.npy"), "--top-k", "5",
                                     "--out", str(predictions)])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["eval", "--predictions", str(predictions), "--truth", str(data / "Y.tst.npz"),
                                     "--buckets", "0", "--json", str(scores)])
        assert result.exit_code == 0, result.output
        return json.loads(scores.read_text())

    return score
