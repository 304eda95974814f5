"""Scoring a model on a split: streaming top-k per batch, metrics accumulated on the fly.

No N x L score matrix exists: each batch's logits are reduced to its top-k before the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from xmlsparse.data.batches import Batch, BatchIterator, Prefetcher
from xmlsparse.data.formats import XMCData
from xmlsparse.metrics import StreamingMetrics, topk_from_scores


def autocast_for(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on CUDA when asked for; CPU always runs fp32."""
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _batches(data: XMCData, batch_size: int, device: torch.device) -> Iterator[Batch]:
    labels = data.Y if data.Y is not None else sp.csr_matrix((data.n_points, data.n_labels), dtype=np.float32)
    return iter(Prefetcher(BatchIterator(data.X, labels, batch_size, shuffle=False), device))


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
        top_scores, top_ids = topk_from_scores(logits.float(), k)
        ids.append(torch.as_tensor(top_ids).cpu().numpy())
        scores.append(torch.as_tensor(top_scores).cpu().numpy())
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
) -> dict[str, float]:
    """P@k, nDCG@k, R@k (and PSP@k, PSnDCG@k with propensities) of ``model`` on ``data``."""
    model.eval()
    metrics = StreamingMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    start = 0
    for batch in _batches(data, batch_size, device):
        with autocast_for(device, precision):
            logits = model(batch)
        _, top_ids = topk_from_scores(logits.float(), max(ks))
        metrics.update(torch.as_tensor(top_ids).cpu().numpy(), data.Y[start : start + batch.size])
        start += batch.size
    return metrics.compute()
