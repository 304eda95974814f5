"""Exact ranking metrics for extreme multi-label classification, accumulated batch by batch.

Conventions follow pyxclib (xclib.evaluation.xc_metrics):

- P@k: hits in the top k over k, averaged over all points (a point without labels counts 0).
- nDCG@k: DCG over the top k (gain 1 / log2(rank + 1)) divided by the ideal DCG over
  min(k, number of true labels) positions, averaged over all points; a point without labels
  contributes 0 and still counts in the average (pyxclib's mean runs over every row).
- PSP@k: sum over points of (1/k) sum of hit * q_l, divided by the same sum for the best
  ranking (each point's k largest q among its true labels): a ratio of sums over the test set.
- PSnDCG@k: as pyxclib computes it, each point's propensity-weighted DCG is divided by its
  ordinary ideal DCG (binary gains over min(k, n_true) positions) before summing, and the sum
  is divided by the same sum for the best ranking. Points without labels add 0 to both sums.
- R@k: hits over the number of true labels (0 for a point without labels), averaged over all points.

Relevance values in the truth matrix are binary: any nonzero stored value is a relevant label.
Each row of a top-k array must list distinct labels (as a top-k of scores does).

Split by training label frequency (``FrequencyBucketMetrics``), to show where accuracy is lost:

- Buckets: the labels, sorted by training frequency (training points carrying the label) most
  frequent first, lay their training occurrences end to end; that line is cut into B equal parts
  (default 3: head, torso, tail), so each bucket holds about a 1/B share of the label occurrences
  and the tail holds many rare labels. All labels of one frequency go together to the part in which
  the middle of their joint occurrences falls, so the buckets' frequency ranges do not overlap (and
  a bucket can be empty when one frequency alone holds more than a 1/B share). Labels never seen
  in training (frequency 0) are in the tail bucket; with no training occurrences at all, every label is.
  The frequencies are ``label_frequencies`` of the training labels: for a run, its whole training
  file, validation rows included (as for the propensities); for a prediction file, ``--train``.
- P@k of a bucket: hits in the top k whose label is in the bucket, over k, averaged over all points.
  The top k are ranked over all labels, so the buckets' P@k sum to the overall P@k.
- PSP@k of a bucket: PSP@k's numerator restricted to those hits, over the overall PSP@k
  denominator (the best ranking over all labels), so the buckets' PSP@k sum to the overall PSP@k.
- R@k of a bucket: hits in the top k among a point's true labels in the bucket, over the number of
  its true labels in the bucket, averaged over the points that have any (undefined, None, when no
  point has); these do not sum to R@k.
- Each bucket also reports its number of labels, its frequency range (min and max training count,
  None when the bucket is empty), its share of the training label occurrences (None when there are
  none) and the number of evaluated points with a true label in it (R@k's count).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from xmlsparse.errors import XMLSparseError

ArrayLike = np.ndarray | torch.Tensor

PADDING = -1  # label id of an empty top-k slot


# Propensity parameters A, B of Jain et al. (2016) for data sets that do not state their own.
DEFAULT_PROPENSITY = (0.55, 1.5)

# Frequency buckets reported by default: head, torso, tail.
DEFAULT_BUCKETS = 3

# One bucket's line of the frequency table: name, counts, frequency range, share and metrics.
BucketRow = dict[str, str | int | float | None]


def label_frequencies(Y: sp.csr_matrix) -> np.ndarray:
    """Number of points that carry each label (nonzero entries per column), int64 [L]."""
    Y = sp.csr_matrix(Y)
    return np.bincount(Y.indices[Y.data != 0], minlength=Y.shape[1]).astype(np.int64)


def inverse_propensity(label_freq: np.ndarray, n_train: int, a: float, b: float) -> np.ndarray:
    """Jain et al. (2016): q_l = 1 + C (N_l + B)^-A with C = (ln N - 1)(B + 1)^A, float64 [L]."""
    freq = np.asarray(label_freq, dtype=np.float64)
    c = (np.log(n_train) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * (freq + b) ** (-a)


class _Batch(NamedTuple):
    pred: np.ndarray  # [B, kmax] label ids, -1 for no prediction
    n_rows: int
    n_labels: int
    true_rows: np.ndarray  # the relevant (row, label) pairs
    true_labels: np.ndarray
    hit: np.ndarray  # [B, kmax] bool: the predicted label is relevant


class _TopkAccumulator:
    """What both accumulators share: the cut-offs ``ks``, the propensities, the number of points
    seen, and the reading of a batch into its relevant (row, label) pairs and the hits of its top-k."""

    def __init__(self, ks: Sequence[int], inv_propensity: np.ndarray | None) -> None:
        self.ks = _checked_ks(ks)
        self.kmax = max(self.ks)
        self.inv_propensity = None if inv_propensity is None else np.asarray(inv_propensity, dtype=np.float64)
        self._n_points = 0

    @property
    def n_points(self) -> int:
        return self._n_points

    def _read_batch(self, topk: ArrayLike, truth: sp.csr_matrix) -> _Batch:
        pred, truth = _checked_batch(topk, truth, self.kmax)
        n_rows, n_labels = truth.shape
        _check_covers(self.inv_propensity, "inverse propensities", n_labels)
        true_keys = _relevant_keys(truth)
        true_rows, true_labels = np.divmod(true_keys, max(n_labels, 1))
        return _Batch(pred, n_rows, n_labels, true_rows, true_labels, _is_relevant(pred, true_keys, n_labels))


class StreamingMetrics(_TopkAccumulator):
    """Accumulates P@k, nDCG@k, PSP@k, PSnDCG@k and R@k over batches of top-k predictions."""

    def __init__(self, ks: Sequence[int] = (1, 3, 5), inv_propensity: np.ndarray | None = None):
        super().__init__(ks, inv_propensity)
        # 1 / log2(rank + 1) for ranks 1..kmax, and its running sums with a leading 0 so that
        # ideal_dcg[n] is the ideal DCG of a point with n relevant labels in the top n.
        self._discount = 1.0 / np.log2(np.arange(self.kmax) + 2.0)
        self._ideal_dcg = np.concatenate([[0.0], np.cumsum(self._discount)])
        self._sums: dict[str, float] = {}

    def update(self, topk: ArrayLike, truth: sp.csr_matrix) -> None:
        """Add a batch: topk [B, kmax] label ids best first (-1 = no prediction), truth CSR [B, L]."""
        pred, n_rows, _, true_rows, true_labels, hit = self._read_batch(topk, truth)
        q = self.inv_propensity
        n_true = np.bincount(true_rows, minlength=n_rows)
        hit = hit.astype(np.float64)

        has_labels = n_true > 0
        disc = self._discount
        hits_cum = np.cumsum(hit, axis=1)
        dcg_cum = np.cumsum(hit * disc, axis=1)
        if q is not None:
            qhit = hit * q[np.maximum(pred, 0)]
            best = _best_propensities(true_rows, true_labels, n_true, q, self.kmax)
            psp_cum, best_psp_cum = np.cumsum(qhit, axis=1), np.cumsum(best, axis=1)
            psdcg_cum, best_psdcg_cum = np.cumsum(qhit * disc, axis=1), np.cumsum(best * disc, axis=1)

        for k in self.ks:
            ideal = self._ideal_dcg[np.minimum(n_true, k)][has_labels]
            self._add(f"P@{k}", hits_cum[:, k - 1].sum() / k)
            self._add(f"nDCG@{k}", (dcg_cum[has_labels, k - 1] / ideal).sum())
            self._add(f"R@{k}", (hits_cum[has_labels, k - 1] / n_true[has_labels]).sum())
            if q is not None:
                self._add(f"PSP@{k}", psp_cum[:, k - 1].sum() / k)
                self._add(f"PSP@{k}/best", best_psp_cum[:, k - 1].sum() / k)
                self._add(f"PSnDCG@{k}", (psdcg_cum[has_labels, k - 1] / ideal).sum())
                self._add(f"PSnDCG@{k}/best", (best_psdcg_cum[has_labels, k - 1] / ideal).sum())
        self._n_points += n_rows

    def compute(self) -> dict[str, float]:
        """Metrics over every point seen so far, as fractions."""
        if self._n_points == 0:
            raise XMLSparseError("no points were evaluated: metrics are undefined")
        out: dict[str, float] = {}
        for name in ("P", "nDCG", "PSP", "PSnDCG", "R"):
            if name.startswith("PS") and self.inv_propensity is None:
                continue
            for k in self.ks:
                key = f"{name}@{k}"
                if name.startswith("PS"):
                    best = self._sums[f"{key}/best"]
                    out[key] = self._sums[key] / best if best > 0 else 0.0
                else:
                    out[key] = self._sums[key] / self._n_points
        return out

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + float(value)


def frequency_buckets(label_freq: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of every label, int64 [L]: 0 (head, the most frequent labels) to n_buckets - 1 (tail).

    Each bucket holds about an equal share of the training label occurrences; all labels of one
    frequency share a bucket and frequency 0 is in the tail (the module docstring has the rule).
    """
    if n_buckets < 1:
        raise XMLSparseError(f"{n_buckets} frequency buckets: expected a positive number of buckets")
    freq = np.asarray(label_freq)
    if freq.ndim != 1 or not np.issubdtype(freq.dtype, np.integer) or (freq.size and freq.min() < 0):
        raise XMLSparseError(
            f"label frequencies of dtype {freq.dtype} and shape {freq.shape}: expected a 1-D array of "
            "non-negative integer counts, one per label"
        )
    freq = freq.astype(np.int64)
    total = int(freq.sum())
    if total == 0:
        return np.full(freq.shape[0], n_buckets - 1, dtype=np.int64)
    values, inverse, counts = np.unique(freq, return_inverse=True, return_counts=True)  # ascending
    group_mass = values * counts
    above = total - np.cumsum(group_mass)  # occurrences of the labels more frequent than each value
    # The part holding the group's midpoint, floor(n_buckets * (above + mass / 2) / total), in
    # integers so that a midpoint on a boundary is not moved by rounding. Frequency 0 has its
    # midpoint at the very end, part n_buckets, which is clipped to the tail.
    group_bucket = (n_buckets * (2 * above + group_mass)) // (2 * total)
    return np.minimum(group_bucket, n_buckets - 1)[inverse.reshape(-1)]


def bucket_names(n_buckets: int) -> list[str]:
    """Names of the buckets, head first: head, torso, tail for three; torso-1, torso-2, ... for more."""
    if n_buckets == 1:
        return ["all"]
    middle = ["torso"] if n_buckets == 3 else [f"torso-{i}" for i in range(1, n_buckets - 1)]
    return ["head", *middle, "tail"]


class FrequencyBucketMetrics(_TopkAccumulator):
    """Accumulates P@k, PSP@k (with propensities) and R@k split into buckets of labels by training
    frequency (definitions in the module docstring), batch by batch from top-k ids and CSR truth."""

    def __init__(
        self,
        label_freq: np.ndarray,
        n_buckets: int = DEFAULT_BUCKETS,
        ks: Sequence[int] = (1, 3, 5),
        inv_propensity: np.ndarray | None = None,
    ):
        super().__init__(ks, inv_propensity)
        self.n_buckets = int(n_buckets)
        self.bucket = frequency_buckets(label_freq, self.n_buckets)
        self.label_freq = np.asarray(label_freq, dtype=np.int64)
        n_ks = len(self.ks)
        self._hits = np.zeros((n_ks, self.n_buckets))  # per k and bucket: sum over points of hits / k
        self._psp = np.zeros((n_ks, self.n_buckets))  # the same with each hit weighted by its q
        self._best_psp = np.zeros(n_ks)  # PSP@k's denominator over all labels
        self._recall = np.zeros((n_ks, self.n_buckets))  # sum of R@k over the points counted below
        self._points_with_labels = np.zeros(self.n_buckets, dtype=np.int64)

    def update(self, topk: ArrayLike, truth: sp.csr_matrix) -> None:
        """Add a batch: topk [B, kmax] label ids best first (-1 = no prediction), truth CSR [B, L]."""
        pred, n_rows, n_labels, true_rows, true_labels, hit = self._read_batch(topk, truth)
        _check_covers(self.bucket, "label frequencies", n_labels)
        q = self.inv_propensity
        n_buckets = self.n_buckets
        # Per point and bucket (a batch-sized table: the number of buckets is small): true labels,
        # and below the hits, counted through cells row * n_buckets + bucket.
        cells = n_rows * n_buckets
        n_true = np.bincount(true_rows * n_buckets + self.bucket[true_labels], minlength=cells)
        n_true = n_true.reshape(n_rows, n_buckets)
        has_labels = n_true > 0
        self._points_with_labels += has_labels.sum(axis=0)
        pred_bucket = self.bucket[np.maximum(pred, 0)]  # padding slots never hit, so their bucket is moot
        pred_cell = np.arange(n_rows, dtype=np.int64)[:, None] * n_buckets + pred_bucket
        if q is not None:
            qhit = np.where(hit, q[np.maximum(pred, 0)], 0.0)
            best = _best_propensities(true_rows, true_labels, n_true.sum(axis=1), q, self.kmax)

        for i, k in enumerate(self.ks):
            hits = np.bincount(pred_cell[:, :k].ravel(), weights=hit[:, :k].ravel(), minlength=cells)
            hits = hits.reshape(n_rows, n_buckets)
            self._hits[i] += hits.sum(axis=0) / k
            self._recall[i] += np.where(has_labels, hits / np.maximum(n_true, 1), 0.0).sum(axis=0)
            if q is not None:
                weighted = np.bincount(pred_bucket[:, :k].ravel(), weights=qhit[:, :k].ravel(), minlength=n_buckets)
                self._psp[i] += weighted / k
                self._best_psp[i] += best[:, :k].sum() / k
        self._n_points += n_rows

    def compute(self) -> list[BucketRow]:
        """One row per bucket, head first, with metrics as fractions over every point seen so far."""
        if self._n_points == 0:
            raise XMLSparseError("no points were evaluated: metrics are undefined")
        total = int(self.label_freq.sum())
        rows: list[BucketRow] = []
        for b, name in enumerate(bucket_names(self.n_buckets)):
            freq = self.label_freq[self.bucket == b]
            n_with = int(self._points_with_labels[b])
            row: BucketRow = {
                "bucket": name,
                "labels": int(freq.size),
                "freq_min": int(freq.min()) if freq.size else None,
                "freq_max": int(freq.max()) if freq.size else None,
                "train_share": float(freq.sum() / total) if total else None,
                "points": n_with,
            }
            for i, k in enumerate(self.ks):
                row[f"P@{k}"] = float(self._hits[i, b] / self._n_points)
            if self.inv_propensity is not None:
                for i, k in enumerate(self.ks):
                    best = self._best_psp[i]
                    row[f"PSP@{k}"] = float(self._psp[i, b] / best) if best > 0 else 0.0
            for i, k in enumerate(self.ks):
                row[f"R@{k}"] = float(self._recall[i, b] / n_with) if n_with else None
            rows.append(row)
        return rows


def _checked_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The metric cut-offs as a tuple of ints, which must be positive."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise XMLSparseError(f"metric cut-offs k must be positive integers, got {ks}")
    return ks


def _checked_batch(topk: ArrayLike, truth: sp.csr_matrix, width: int) -> tuple[np.ndarray, sp.csr_matrix]:
    """A batch's top-k ids as int64 [B, width] (cut or padded with -1) and its truth as CSR, checked
    against each other: one row of predictions per point, ids -1 or within the truth's labels."""
    pred = _as_numpy(topk).astype(np.int64, copy=False)
    truth = sp.csr_matrix(truth)
    n_rows, n_labels = truth.shape
    if pred.ndim != 2 or pred.shape[0] != n_rows:
        raise XMLSparseError(
            f"top-k predictions have shape {tuple(pred.shape)}, expected ({n_rows}, k) for {n_rows} points"
        )
    if pred.size and (pred.min() < PADDING or pred.max() >= n_labels):
        raise XMLSparseError(
            f"top-k predictions hold label ids in [{pred.min()}, {pred.max()}], expected -1 (none) "
            f"or 0..{n_labels - 1}"
        )
    return _fit_width(pred, width), truth


def _check_covers(per_label: np.ndarray | None, what: str, n_labels: int) -> None:
    """A per-label array must have an entry for every label of the truth matrix."""
    if per_label is not None and per_label.shape[0] < n_labels:
        raise XMLSparseError(f"{what} cover {per_label.shape[0]} labels but the truth matrix has {n_labels}")


def _as_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fit_width(pred: np.ndarray, width: int) -> np.ndarray:
    """Cut or pad (with -1) the columns of a top-k array to exactly `width`."""
    if pred.shape[1] >= width:
        return pred[:, :width]
    pad = np.full((pred.shape[0], width - pred.shape[1]), PADDING, dtype=pred.dtype)
    return np.concatenate([pred, pad], axis=1)


def _relevant_keys(truth: sp.csr_matrix) -> np.ndarray:
    """row * L + label of every relevant entry, unique and sorted."""
    n_rows, n_labels = truth.shape
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(truth.indptr))
    keep = truth.data != 0
    return np.unique(rows[keep] * n_labels + truth.indices[keep].astype(np.int64))


def _is_relevant(pred: np.ndarray, true_keys: np.ndarray, n_labels: int) -> np.ndarray:
    """Boolean [B, k]: pred[i, j] is a relevant label of point i (true_keys = row * L + label, sorted)."""
    if true_keys.size == 0:
        return np.zeros(pred.shape, dtype=bool)
    keys = np.arange(pred.shape[0], dtype=np.int64)[:, None] * n_labels + pred
    pos = np.minimum(np.searchsorted(true_keys, keys), true_keys.size - 1)
    return (pred >= 0) & (true_keys[pos] == keys)


def _best_propensities(
    rows: np.ndarray, labels: np.ndarray, n_true: np.ndarray, q: np.ndarray, width: int
) -> np.ndarray:
    """[B, width]: each point's largest inverse propensities among its true labels, descending, 0-padded."""
    best = np.zeros((n_true.shape[0], width), dtype=np.float64)
    values = q[labels]
    order = np.lexsort((-values, rows))
    rows, values = rows[order], values[order]
    row_start = np.concatenate([[0], np.cumsum(n_true)[:-1]])
    rank = np.arange(rows.shape[0]) - row_start[rows]
    keep = rank < width
    best[rows[keep], rank[keep]] = values[keep]
    return best


def topk_values_and_indices(
    scores: ArrayLike, k: int, label_offset: int = 0
) -> tuple[ArrayLike, ArrayLike]:
    """Top-k scores and label ids [B, k] of a dense score block, best first, ties to the lower id.

    NaN scores rank last (as -inf). With fewer than k labels the tail is padded with id -1 and
    score -inf. `label_offset` is added to the ids, so a block of columns [offset, offset + width)
    of a larger score matrix gives global label ids. Returns the same kind (torch or numpy) as given.
    """
    is_numpy = not isinstance(scores, torch.Tensor)
    s = torch.from_numpy(np.ascontiguousarray(scores)) if is_numpy else scores
    if s.ndim != 2:
        raise ValueError(f"scores must be a [batch, labels] matrix, got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        s = s.double()
    k_real = min(k, s.shape[1])
    # One more than k shows whether a tie straddles the k-th place (then the (k+1)-th value equals
    # the k-th); torch.topk keeps arbitrary members of such a tie, so those rows are redone.
    vals, idx = torch.topk(s, min(k_real + 1, s.shape[1]), dim=1)
    if torch.isnan(vals).any():  # torch.topk ranks NaN first, so any NaN of a row shows up here
        s = s.masked_fill(torch.isnan(s), float("-inf"))
        vals, idx = torch.topk(s, min(k_real + 1, s.shape[1]), dim=1)
    if k_real > 0 and vals.shape[1] > k_real:
        straddling = (vals[:, k_real] == vals[:, k_real - 1]).nonzero().squeeze(1)
        vals, idx = vals[:, :k_real], idx[:, :k_real]
        if straddling.numel():
            vals[straddling], idx[straddling] = _lowest_ids_at_threshold(
                s[straddling], vals[straddling], idx[straddling], vals[straddling, k_real - 1 :]
            )
    vals, idx = _rank(vals, idx + label_offset, k)
    return (vals.numpy(), idx.numpy()) if is_numpy else (vals, idx)


def _lowest_ids_at_threshold(
    s: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-k entries above the threshold and fill the rest with the lowest tied ids."""
    n_labels, k = s.shape[1], vals.shape[1]
    id_dtype = torch.int32 if n_labels < 2**31 - 1 else torch.int64
    label_ids = torch.arange(n_labels, dtype=id_dtype, device=s.device).expand_as(s)
    tied_key = torch.where(s == threshold, label_ids, n_labels)
    tied_ids = torch.topk(tied_key, k, dim=1, largest=False, sorted=True).values.long()  # ascending
    room = k - (vals > threshold).sum(dim=1, keepdim=True)
    slot = torch.arange(k, device=s.device)
    tied_ids = torch.where(slot < room, tied_ids, PADDING)
    above_ids = torch.where(vals > threshold, idx, PADDING)
    candidates = torch.cat([above_ids, tied_ids], dim=1)
    candidate_vals = torch.cat([vals, threshold.expand_as(vals)], dim=1)
    return _rank(candidate_vals, candidates, k)


def _rank(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by score descending then id ascending, padding (id -1) last; cut or pad to k."""
    # Two stable sorts: by id first, then by score, which keeps the id order within equal scores.
    id_key = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx)
    order = torch.sort(id_key, dim=1, stable=True).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    score_key = torch.where(idx < 0, float("-inf"), torch.nan_to_num(vals, nan=float("-inf")))
    order = torch.sort(score_key, dim=1, descending=True, stable=True).indices[:, :k]
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    if idx.shape[1] < k:
        short = k - idx.shape[1]
        vals = torch.cat([vals, vals.new_full((vals.shape[0], short), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((idx.shape[0], short), PADDING)], dim=1)
    return vals, idx


def topk_from_scores(scores: ArrayLike, k: int) -> ArrayLike:
    """Label ids [B, k] of the k highest scores per row, best first, ties to the lower id (-1 pads)."""
    return topk_values_and_indices(scores, k)[1]


def merge_topk(
    vals_a: ArrayLike, idx_a: ArrayLike, vals_b: ArrayLike, idx_b: ArrayLike, k: int
) -> tuple[ArrayLike, ArrayLike]:
    """Merge two per-row top-k lists (e.g. from two label blocks) into one, ties to the lower id.

    Entries with id -1 are padding and rank after every real entry. Returns the kind given.
    """
    is_numpy = not isinstance(vals_a, torch.Tensor)
    to_torch = (lambda x: torch.from_numpy(np.asarray(x))) if is_numpy else (lambda x: x)
    vals = torch.cat([to_torch(vals_a), to_torch(vals_b)], dim=1)
    idx = torch.cat([to_torch(idx_a), to_torch(idx_b)], dim=1).long()
    vals, idx = _rank(vals, idx, k)
    return (vals.numpy(), idx.numpy()) if is_numpy else (vals, idx)


def topk_from_sparse_scores(scores: sp.csr_matrix, k: int) -> np.ndarray:
    """Label ids [N, k] of each row's k highest stored scores, best first, ties to the lower id.

    Every stored entry (explicit zeros included) is a prediction; rows with fewer than k
    entries are padded with -1; NaN scores rank last.
    """
    scores = sp.csr_matrix(scores)
    if not scores.has_sorted_indices:
        scores = scores.sorted_indices()
    n_rows = scores.shape[0]
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(scores.indptr))
    # Stable sorts: scores descending (NaN last) over entries in (row, id) order, then by row;
    # equal scores keep their id order.
    order = np.argsort(-scores.data, kind="stable")
    order = order[np.argsort(rows[order], kind="stable")]
    labels = scores.indices[order]
    rank = np.arange(rows.shape[0]) - scores.indptr[rows]
    keep = rank < k
    out = np.full((n_rows, k), PADDING, dtype=np.int64)
    out[rows[keep], rank[keep]] = labels[keep]
    return out
