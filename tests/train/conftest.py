"""The tiny synthetic data set of the end-to-end training tests (one per test module)."""

from pathlib import Path

import pytest

from xmlsparse.data.synthetic import generate


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    return generate(folder, n_train=1200, n_test=300, n_labels=120, labels_per_point=3.0, dim=32, seed=3)
