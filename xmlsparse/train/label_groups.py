"""Clustered label groups for a grouped fixed fan-in head: an order of the labels in which each run
of ``group_size`` consecutive labels is a cluster of labels whose training points look alike, so
that the labels sharing a row of inputs want similar inputs.

The labels' centroids (the mean of their training points' feature rows, L2-normalised) are
projected to a few dimensions (scikit-learn's Gaussian random projection) and split in two by
2-means (scikit-learn's KMeans) again and again, each split balanced by the difference of the two
distances and cut at a whole number of groups, until each part is one group (as Parabel and
Bonsai build their label trees).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.preprocessing import normalize
from sklearn.random_projection import GaussianRandomProjection

# Dimensions the label centroids are projected to before clustering.
PROJECTED_DIMS = 64


def label_centroids(X: sp.csr_matrix | np.ndarray, Y: sp.csr_matrix, dims: int = PROJECTED_DIMS,
                    seed: int = 0) -> np.ndarray:
    """``[L, dims]`` float32: each label's L2-normalised mean feature row, randomly projected
    (labels without training points get a zero row)."""
    sums = sp.csr_matrix(Y).T.tocsr() @ X  # [L, D]
    if X.shape[1] > dims:
        sums = GaussianRandomProjection(n_components=dims, random_state=seed).fit_transform(sums)
    dense = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return normalize(dense.astype(np.float32))


def balanced_bisection_order(points: np.ndarray, group_size: int, seed: int = 0) -> np.ndarray:
    """An order of the rows of ``points`` in which every run of ``group_size`` rows (the last may
    be shorter) comes from one leaf of a balanced 2-means tree."""
    order: list[np.ndarray] = []
    pending = [np.arange(points.shape[0])]
    rng = np.random.default_rng(seed)
    while pending:
        part = pending.pop()
        if part.size <= group_size:
            order.append(part)
            continue
        sub = points[part]
        if np.ptp(sub, axis=0).max() == 0:  # all alike: any cut is as good
            scores = rng.permutation(part.size).astype(np.float64)
        else:
            km = KMeans(n_clusters=2, n_init=1, random_state=int(rng.integers(2**31))).fit(sub)
            distances = km.transform(sub)
            scores = distances[:, 0] - distances[:, 1]
        # The left part takes a whole number of groups, about half of the part's labels.
        n_left = -(-(part.size // 2) // group_size) * group_size
        ranked = part[np.argsort(scores, kind="stable")]
        pending += [ranked[n_left:], ranked[:n_left]]  # the left part is taken next
    return np.concatenate(order)


def clustered_label_order(X: sp.csr_matrix | np.ndarray, Y: sp.csr_matrix, group_size: int,
                          seed: int = 0) -> np.ndarray:
    """int64 ``[L]``: the original label id at each position of the grouped layer."""
    return balanced_bisection_order(label_centroids(X, Y, seed=seed), group_size, seed).astype(np.int64)
