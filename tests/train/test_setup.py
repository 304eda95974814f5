import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.config import config_from_dict
from xmlsparse.data.synthetic import generate
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.setup import (
    fit_preprocessing,
    normalized_rows,
    prepare_data,
    resolve_device,
    whole_number_values,
)


def test_normalized_rows_have_unit_norm_and_empty_rows_stay_empty():
    X = sp.csr_matrix(np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32))
    Y = sp.csr_matrix(np.eye(3, dtype=np.float32))
    out = normalized_rows(XMCData(X, Y, 3, 3))
    norms = np.sqrt(np.asarray(out.X.multiply(out.X).sum(axis=1))).ravel()
    np.testing.assert_allclose(norms, [1.0, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out.X[0].toarray(), [[0.6, 0.8, 0.0]], rtol=1e-6)
    assert out.Y is Y and X[0, 0] == 3.0  # the input is not modified


def test_resolve_device_cpu():
    assert resolve_device("cpu").type == "cpu"


def _data(values: list[float]) -> XMCData:
    X = sp.csr_matrix(np.array([values, values[::-1]], dtype=np.float32))
    Y = sp.csr_matrix(np.eye(2, dtype=np.float32))
    return XMCData(X, Y, X.shape[1], 2)


def test_whole_number_values_tells_counts_from_tfidf():
    assert whole_number_values(_data([1.0, 0.0, 3.0]).X)
    assert not whole_number_values(_data([0.25, 0.0, 0.5]).X)


@pytest.mark.parametrize(
    ("tfidf", "values", "reweighted"),
    [("auto", [1.0, 0.0, 2.0], True), ("auto", [0.5, 0.0, 0.25], False), (True, [0.5, 0.0, 0.25], True), (False, [1.0, 0.0, 2.0], False)],
)
def test_tfidf_auto_weights_whole_number_features_only(tfidf, values, reweighted):
    config = config_from_dict({
        "data": {"dataset": "unused", "features": "bow", "tfidf": tfidf, "normalize": False},
        "model": {"intermediate": None},
    })
    train = XMCData(
        sp.csr_matrix(np.array([values, [values[0], 0.0, 0.0]], dtype=np.float32)),
        sp.csr_matrix(np.eye(2, dtype=np.float32)), 3, 2,
    )
    out = fit_preprocessing(config, train)(train)
    # The feature in both rows has idf 1 (smoothed: ln(3/3) + 1); the one in a single row more.
    changed = not np.allclose(out.X.toarray(), train.X.toarray())
    assert changed == reweighted


def test_tfidf_rejects_other_values():
    with pytest.raises(XMLSparseError, match="data.tfidf = 'yes': expected one of auto, true, false"):
        config_from_dict({"data": {"tfidf": "yes"}})


@pytest.fixture
def dense_data(tmp_path):
    return generate(tmp_path, n_train=200, n_test=20, n_labels=10, labels_per_point=2.0, dim=8, seed=0)


def prepared(data, seed: int = 0, **data_keys):
    """``prepare_data`` for a small dense model on ``data``, 20 % held out, ``data_keys`` added."""
    return prepare_data(config_from_dict({
        "data": {"dataset": str(data), "features": "dense", "validation": 0.2, **data_keys},
        "model": {"intermediate": None},
        "train": {"seed": seed},
    }))


def test_the_validation_split_follows_data_validation_seed_not_train_seed(dense_data):
    np.testing.assert_array_equal(prepared(dense_data, seed=0).val_rows, prepared(dense_data, seed=7).val_rows)
    assert not np.array_equal(prepared(dense_data, validation_seed=0).val_rows,
                              prepared(dense_data, validation_seed=1).val_rows)


def test_data_validation_max_points_caps_the_validation_split(dense_data):
    capped, whole = prepared(dense_data, validation_max_points=15), prepared(dense_data)
    assert len(capped.val_rows) == 15 and len(capped.train_rows) == 185
    assert len(whole.val_rows) == 40
    assert set(capped.val_rows.tolist()) <= set(whole.val_rows.tolist())
