"""Scoring a model on a split: streaming top-k per batch, metrics accumulated on the fly.

No N x L score matrix exists: each batch's logits are reduced to its top-k before the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from xmlsparse.data.batches import Batch, BatchIterator, Prefetcher
from xmlsparse.data.formats import XMCData
from xmlsparse.metrics import StreamingMetrics, topk_from_scores, topk_values_and_indices


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
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k label ids and scores of every point, best first (ties: lower label id)."""
    model.eval()
    ids, scores = [], []
    for batch in _batches(data, batch_size, device):
        with autocast_for(device, precision):
            logits = model(batch)
        top_scores, top_ids = topk_values_and_indices(logits.float(), k)
        ids.append(top_ids.cpu().numpy())
        scores.append(top_scores.cpu().numpy())
    return np.concatenate(ids), np.concatenate(scores)


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
) -> dict[str, float]:
    """P@k, nDCG@k, R@k (and PSP@k, PSnDCG@k with propensities) of ``model`` on ``data``
    (or on its rows ``points``)."""
    model.eval()
    metrics = StreamingMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    for batch in _batches(data, batch_size, device, points):
        with autocast_for(device, precision):
            logits = model(batch)
        top_ids = topk_from_scores(logits.float(), max(ks))
        metrics.update(top_ids.cpu().numpy(), data.Y[batch.points])
    return metrics.compute()
