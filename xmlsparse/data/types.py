"""The in-memory form of a data set split, shared by every reader, the cache and the batches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import scipy.sparse as sp

PathLike = Union[str, os.PathLike]


@dataclass
class XMCData:
    """One split: features X [N, D] and labels Y [N, L]."""

    X: sp.csr_matrix | np.ndarray
    Y: sp.csr_matrix
    n_features: int
    n_labels: int

    @property
    def n_points(self) -> int:
        return self.Y.shape[0]
