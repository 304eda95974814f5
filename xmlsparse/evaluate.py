"""Scoring a model on a split: streaming top-k per batch, metrics accumulated on the fly.

No N x L score matrix exists: each batch's logits are reduced to its top-k before the next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from xmlsparse.data.batches import Batch, BatchIterator, Prefetcher
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.implications import LabelImplications, consistent_topk
from xmlsparse.metrics import (
    DEFAULT_BUCKETS,
    DEFAULT_PROPENSITY,
    BucketRow,
    FrequencyBucketMetrics,
    StreamingMetrics,
    inverse_propensity,
    label_frequencies,
    merge_topk,
    topk_from_sparse_scores,
    topk_values_and_indices,
)

# Logits of one batch held at a time while scoring: bounds evaluation memory whatever L is.
# 2^26 (128 MiB of bf16 logits) was the fastest block that kept evaluation's extra memory small
# (docs/benchmarks.md).
LOGIT_ELEMENTS_PER_BLOCK = 1 << 26


def topk_of_batch(model: torch.nn.Module, batch: Batch, k: int,
                  block_elements: int = LOGIT_ELEMENTS_PER_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and label ids of a batch, streamed over label blocks of about ``block_elements``
    logits and merged, so that no ``B x L`` logit matrix exists (ties go to the lower label id, as
    in a dense top-k)."""
    block = max(k, block_elements // max(1, batch.size))
    best_vals = best_ids = None
    for start, logits in model.label_blocks(batch, block):
        # In the logits' own dtype: a float32 copy of a bf16 block would double its memory and
        # rank the same values the same way.
        vals, ids = topk_values_and_indices(logits, k, label_offset=start)
        if best_vals is None:
            best_vals, best_ids = vals, ids
        else:
            best_vals, best_ids = merge_topk(best_vals, best_ids, vals, ids, k)
    return best_vals.float(), best_ids


TopK = Callable[[Batch, int], tuple[torch.Tensor, torch.Tensor]]


def with_implications(topk: TopK, implications: LabelImplications | None) -> TopK:
    """``topk`` made consistent with the label implications (``consistent_topk``), if there are any."""
    if implications is None:
        return topk

    def consistent(batch: Batch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return consistent_topk(implications, *topk(batch, k), k)

    return consistent


def autocast_for(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on CUDA when asked for; CPU always runs fp32."""
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _batches(
    data: XMCData, batch_size: int, device: torch.device, points: np.ndarray | None = None
) -> Iterator[Batch]:
    iterator = BatchIterator(data.X, data.Y, batch_size, shuffle=False, points=points)
    return iter(Prefetcher(iterator, device))


@torch.no_grad()
def predict_topk(
    model: torch.nn.Module,
    data: XMCData,
    k: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    implications: LabelImplications | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k label ids and scores of every point, best first (ties: lower label id), consistent
    with ``implications`` when given."""
    model.eval()
    ids, scores = [], []
    topk = with_implications(partial(topk_of_batch, model), implications)
    for batch in _batches(data, batch_size, device):
        with autocast_for(device, precision):
            top_scores, top_ids = topk(batch, k)
        ids.append(top_ids.cpu().numpy())
        scores.append(top_scores.cpu().numpy())
    return np.concatenate(ids), np.concatenate(scores)


def score_batches(
    batches: Iterable[Batch], topk: TopK, Y: sp.csr_matrix,
    k: int, device: torch.device, precision: str, accumulators: list[StreamingMetrics | FrequencyBucketMetrics],
) -> None:
    """Each batch's top-k (``topk(batch, k)``) against its rows of ``Y`` (``batch.points``) into every
    accumulator; with none, the top-k alone is computed (a rank that takes part but does not count)."""
    for batch in batches:
        with autocast_for(device, precision):
            _, top_ids = topk(batch, k)
        if accumulators:
            top_ids, truth = top_ids.cpu().numpy(), Y[batch.points]
            for accumulator in accumulators:
                accumulator.update(top_ids, truth)


def _score(
    model: torch.nn.Module, data: XMCData, ks: list[int], batch_size: int, device: torch.device, precision: str,
    points: np.ndarray | None, accumulators: list[StreamingMetrics | FrequencyBucketMetrics],
    implications: LabelImplications | None,
) -> None:
    """One pass over ``data`` (or its rows ``points``): each batch's top-k goes to every accumulator."""
    model.eval()
    topk = with_implications(partial(topk_of_batch, model), implications)
    score_batches(_batches(data, batch_size, device, points), topk, data.Y, max(ks), device, precision, accumulators)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: XMCData,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    inv_propensity: np.ndarray | None = None,
    points: np.ndarray | None = None,
    implications: LabelImplications | None = None,
) -> dict[str, float]:
    """P@k, nDCG@k, R@k (and PSP@k, PSnDCG@k with propensities) of ``model`` on ``data``
    (or on its rows ``points``), its top-k lists consistent with ``implications`` when given."""
    metrics = StreamingMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    _score(model, data, ks, batch_size, device, precision, points, [metrics], implications)
    return metrics.compute()


@torch.no_grad()
def evaluate_by_frequency(
    model: torch.nn.Module,
    data: XMCData,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    precision: str,
    inv_propensity: np.ndarray | None,
    label_freq: np.ndarray,
    buckets: int = DEFAULT_BUCKETS,
    points: np.ndarray | None = None,
    implications: LabelImplications | None = None,
) -> tuple[dict[str, float], list[BucketRow]]:
    """``evaluate``'s metrics and, from the same pass, the table of P@k, PSP@k and R@k by
    ``buckets`` buckets of labels by training frequency ``label_freq`` (``label_frequencies``),
    head first (``FrequencyBucketMetrics``)."""
    metrics = StreamingMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    by_freq = FrequencyBucketMetrics(label_freq, buckets, ks, inv_propensity)
    _score(model, data, ks, batch_size, device, precision, points, [metrics, by_freq], implications)
    return metrics.compute(), by_freq.compute()


# Rows of a prediction file scored at a time: bounds the dense top-k work per block.
PREDICTION_ROWS_PER_BLOCK = 4096


def evaluate_predictions_file(
    predictions: Path,
    truth: Path,
    ks: list[int],
    train: Path | None = None,
    a: float | None = None,
    b: float | None = None,
    buckets: int = DEFAULT_BUCKETS,
) -> tuple[dict[str, float], list[BucketRow] | None]:
    """Score a prediction file (npz CSR scores or ``label:score`` lines) against a data set's labels.

    PSP@k and PSnDCG@k need the training labels (``train``) for the propensities; A and B default
    to those of Jain et al. (2016). Returns the metrics and, with ``train`` and ``buckets`` > 0, the
    table by label-frequency bucket (frequencies counted over every point of ``train``), else None.
    """
    from xmlsparse.data.predictions import read_predictions

    check_buckets(buckets)
    truth_labels = _labels_of(truth)
    n_points, n_labels = truth_labels.shape
    scores = read_predictions(predictions, n_labels=n_labels)
    if scores.shape[0] != n_points:
        raise XMLSparseError(f"{predictions}: {scores.shape[0]} points of predictions, but {truth} has {n_points} points")
    inv_prop = by_freq = None
    if train is not None:
        train_labels = _labels_of(train)
        if train_labels.shape[1] != n_labels:
            raise XMLSparseError(f"{train}: {train_labels.shape[1]} labels, but {truth} has {n_labels}")
        a = DEFAULT_PROPENSITY[0] if a is None else a
        b = DEFAULT_PROPENSITY[1] if b is None else b
        freq = label_frequencies(train_labels)
        inv_prop = inverse_propensity(freq, train_labels.shape[0], a, b)
        if buckets > 0:
            by_freq = FrequencyBucketMetrics(freq, buckets, ks, inv_prop)
    metrics = StreamingMetrics(ks=tuple(ks), inv_propensity=inv_prop)
    for start in range(0, n_points, PREDICTION_ROWS_PER_BLOCK):
        stop = min(start + PREDICTION_ROWS_PER_BLOCK, n_points)
        top_ids, block_truth = topk_from_sparse_scores(scores[start:stop], max(ks)), truth_labels[start:stop]
        metrics.update(top_ids, block_truth)
        if by_freq is not None:
            by_freq.update(top_ids, block_truth)
    return metrics.compute(), None if by_freq is None else by_freq.compute()


def check_buckets(buckets: int) -> None:
    """A number of frequency buckets, 0 meaning no frequency table."""
    if buckets < 0:
        raise XMLSparseError(f"--buckets {buckets}: expected a number of frequency buckets, or 0 for none")


def _labels_of(path: Path):
    """The label matrix of a data file: a label npz (``Y.tst.npz``) or any format ``load_split`` reads."""
    from xmlsparse.data.formats import load_split, read_csr_npz

    if path.suffix == ".npz" and path.name.startswith("Y."):
        return read_csr_npz(path)
    return load_split(path).Y
