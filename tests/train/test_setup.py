import numpy as np
import scipy.sparse as sp

from xmlsparse.data.formats import XMCData
from xmlsparse.train.setup import normalized_rows, resolve_device


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
