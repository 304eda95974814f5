"""The generic bag-of-words recipe on the real sets beside the repository: pointed at a data set
with nothing but ``data.dataset`` changed, it preprocesses each by its rule and trains."""

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn.preprocessing

from xmlsparse.config import load_config
from xmlsparse.data.formats import load_split
from xmlsparse.train.setup import prepare_data, whole_number_values
from xmlsparse.train.trainer import start_run

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "bow.yaml"


def _dataset(shared_datasets: Path, name: str) -> Path:
    folder = shared_datasets / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.mark.parametrize(("name", "idf"), [("bibtex", True), ("delicious", True), ("wordnet-hypernyms", False)])
def test_recipe_weights_binary_features_and_keeps_tfidf_ones(shared_datasets, name, idf):
    config = load_config(RECIPE, [f"data.dataset={_dataset(shared_datasets, name)}"])
    data = prepare_data(config)

    raw = load_split(_dataset(shared_datasets, name) / "train.txt").X
    assert whole_number_values(raw) == idf
    rows = slice(0, 500)
    unit_rows = sklearn.preprocessing.normalize(raw[rows], norm="l2").toarray()
    # Without idf the model reads the file's rows scaled to unit norm, nothing more.
    assert np.allclose(data.train.X[rows].toarray(), unit_rows, atol=1e-6) != idf


@pytest.mark.slow
def test_recipe_trains_bibtex_with_only_the_data_path_set(shared_datasets, tmp_path):
    # The recipe's widths shrunk so the test stays short on a CPU; everything else as shipped.
    overrides = [
        f"data.dataset={_dataset(shared_datasets, 'bibtex')}",
        "train.epochs=3", "model.encoder.dim=1024", "model.intermediate.size=1024", "train.device=cpu",
    ]
    config = load_config(RECIPE, overrides)
    trainer = start_run(config, tmp_path / "run")
    final = trainer.fit()
    assert final is not None and final["test"]["P@1"] > 0.3
    assert json.loads((tmp_path / "run" / "final.json").read_text())["test_by_frequency"]
