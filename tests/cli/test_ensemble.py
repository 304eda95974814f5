"""`xmlsparse ensemble`: runs of one data set scored as the mean of their logits, read back by eval
and predict like a run directory; members that do not fit together are refused before anything is
written."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.data.formats import read_npy_features
from xmlsparse.data.predictions import read_predictions
from xmlsparse.data.types import XMCData
from xmlsparse.evaluate import predict_topk
from xmlsparse.runs import load_run_model

runner = CliRunner()


@pytest.fixture(scope="module")
def members(train_tiny_run) -> tuple[list[Path], Path]:
    """Two runs on one synthetic set, one with BCE and seed 0, one with the softmax loss and seed 1."""
    first, data = train_tiny_run("data.validation=0.2", "train.seed=0", "train.loss=bce")
    second, _ = train_tiny_run("data.validation=0.2", "train.seed=1", "train.loss=softmax", data=data)
    return [first, second], data


def _all_logits(run: Path, data: Path) -> np.ndarray:
    """Every label's logit for every test point, through the run's own model (test oracle)."""
    _, stored, model, device = load_run_model(run, torch.device("cpu"))
    features = read_npy_features(data / "X.tst.npy")
    no_labels = sp.csr_matrix((features.shape[0], stored.n_labels))
    test = stored.preprocess(XMCData(features, no_labels, features.shape[1], stored.n_labels))
    ids, scores = predict_topk(model, test, stored.n_labels, 64, device)
    logits = np.empty(ids.shape, dtype=np.float64)
    np.put_along_axis(logits, ids, scores, axis=1)
    return logits


def test_the_ensemble_scores_the_mean_of_its_members_logits(tmp_path, members):
    runs, data = members
    out = tmp_path / "ens"
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ensemble of 2" in result.output and "member 1: test P@1" in result.output
    assert "by training label frequency" in result.output
    final = json.loads((out / "final.json").read_text())
    assert final["members"] == [str(run.resolve()) for run in runs]
    assert set(final["validation"]) >= {"P@1", "nDCG@5"} and "P@5" in final["test"]
    assert len(final["members_test"]) == 2 and all("P@1" in member for member in final["members_test"])
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "ensemble.json", "final.json", "preprocessing.json"]

    result = runner.invoke(app, ["predict", str(out), str(data / "X.tst.npy"), "--top-k", "5",
                                 "--out", str(tmp_path / "pred.txt")])
    assert result.exit_code == 0, result.output
    predicted = read_predictions(tmp_path / "pred.txt", n_labels=80)
    mean = (_all_logits(runs[0], data) + _all_logits(runs[1], data)) / 2
    expected = np.argsort(-mean, axis=1, kind="stable")[:, :5]
    for row in range(mean.shape[0]):
        start, stop = predicted.indptr[row], predicted.indptr[row + 1]
        order = np.argsort(-predicted.data[start:stop], kind="stable")
        assert predicted.indices[start:stop][order].tolist() == expected[row].tolist()
        np.testing.assert_allclose(np.sort(predicted.data[start:stop])[::-1], mean[row, expected[row]], rtol=1e-4,
                                   atol=1e-5)

    result = runner.invoke(app, ["eval", str(out), "--json", str(tmp_path / "m.json"), "--buckets", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(final["test"])


def test_members_that_do_not_fit_together_are_refused_and_nothing_is_written(tmp_path, members):
    runs, data = members
    out = tmp_path / "ens"

    def refused(*args: str) -> str:
        result = runner.invoke(app, ["ensemble", *args, "--out", str(out)])
        assert result.exit_code != 0
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return result.output

    assert "at least two run directories, got 1" in refused(str(runs[0]))
    assert "is given twice" in refused(str(runs[0]), str(runs[0]))
    assert "not a run directory" in refused(str(runs[0]), str(tmp_path))

    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    config = yaml.safe_load((runs[1] / "config.yaml").read_text())
    config["data"]["validation"] = 0.3
    odd = other / "odd"
    (other / "c.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", str(other / "c.yaml"), "--out", str(odd), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    output = refused(str(runs[0]), str(odd))
    assert "data.validation is 0.3, but 0.2" in output and "same validation split" in output


def test_an_existing_output_needs_overwrite_and_an_ensemble_is_no_member(tmp_path, members):
    runs, _ = members
    out = tmp_path / "ens"
    assert runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(out), "--buckets", "0"]).exit_code == 0
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(out)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    result = runner.invoke(app, ["ensemble", str(out), str(runs[0]), "--out", str(tmp_path / "nested")])
    assert result.exit_code != 0 and "is an ensemble directory; give its members" in result.output
    result = runner.invoke(app, ["ensemble", *map(str, runs), "--out", str(out), "--overwrite", "--buckets", "0"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]
