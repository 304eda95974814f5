"""Evaluation of a label-sharded model: the points of each global batch shared by the ranks, each
rank's top-k over its labels merged into the global top-k, the metrics counted on rank 0 and
handed to every rank (so that early stopping and the schedule decide alike)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from xmlsparse.data.batches import BatchIterator, Prefetcher
from xmlsparse.data.formats import XMCData
from xmlsparse.evaluate import score_batches, with_implications
from xmlsparse.implications import LabelImplications
from xmlsparse.metrics import DEFAULT_BUCKETS, BucketRow, FrequencyBucketMetrics, StreamingMetrics
from xmlsparse.parallel.sharded import ShardedBatches, ShardedModel


@torch.no_grad()
def evaluate_sharded(
    model: ShardedModel,
    data: XMCData,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    precision: str,
    inv_propensity: np.ndarray | None,
    points: np.ndarray | None = None,
    label_freq: np.ndarray | None = None,
    buckets: int = DEFAULT_BUCKETS,
    implications: LabelImplications | None = None,
) -> tuple[dict[str, float], list[BucketRow] | None]:
    """``evaluate``'s metrics of ``data`` (or its rows ``points``) and, with ``label_freq``,
    ``evaluate_by_frequency``'s table; the same on every rank. Collective. The ``implications``
    apply to the merged top-k, where every rank's labels are present."""
    model.eval()
    main = model.world.is_main
    metrics = StreamingMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    by_freq = FrequencyBucketMetrics(label_freq, buckets, ks, inv_propensity) if label_freq is not None else None
    iterator = BatchIterator(data.X, data.Y, batch_size, shuffle=False, points=points)
    batches = Prefetcher(ShardedBatches(iterator, model.world, model.label_range), device)
    counted = [accumulator for accumulator in (metrics, by_freq) if accumulator is not None and main]
    score_batches(batches, with_implications(model.topk, implications), data.Y, max(ks), device, precision, counted)
    results = [(metrics.compute(), by_freq.compute() if by_freq is not None else None) if main else None]
    dist.broadcast_object_list(results, src=0)
    return results[0]
