"""Ensembles of runs that never share a machine: each run's top-k logits saved once, averaged later.

`xmlsparse ensemble` scores the mean of its members' logits exactly, but needs every member's
checkpoint at hand (on WordNet-Hypernyms 0.85 GB each). This script keeps, for each run, its best
model's top-k logits (before the label implications) on its validation rows and on its test split
(`dump`: about 6 MB at k = 100 on WordNet-Hypernyms' 18,676 test points), and scores any set of
such lists as one model (`score`): the mean of their logits, where a label missing from a list
counts at that list's lowest score (its true logit is at most that), then the implications and the
metrics as a run's. Where every list holds the ensemble's first label the mean is exact and every
other label's approximate mean is an upper bound, so the ensemble's first label, and with it P@1
up to ties, is the exact ensemble's; `score` prints the share of such points. With k at least the
number of labels nothing is missing and `score` equals `xmlsparse ensemble`.

    python scripts/topk_ensemble.py dump runs/wordnet-bow0 lists/bow0.npz --top-k 100
    python scripts/topk_ensemble.py score runs/wordnet-bow0 lists/bow0.npz lists/bow1.npz lists/bow2.npz

`score` reads the data, the validation split and the implications of its RUN_DIR (any member's):
the lists must come from runs with the same validation rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmlsparse.atomic import atomic_write
from xmlsparse.errors import XMLSparseError
from xmlsparse.evaluate import check_buckets, predict_topk
from xmlsparse.implications import consistent_topk
from xmlsparse.metrics import DEFAULT_BUCKETS, FrequencyBucketMetrics, StreamingMetrics, label_frequencies
from xmlsparse.outputs import check_output_file
from xmlsparse.runs import check_run_dir, load_run, load_run_data, split_data
from xmlsparse.train.setup import PreparedData, load_run_inputs, precision_on

SPLITS = ("val", "test")


def dump(run_dir: Path, out: Path, top_k: int) -> None:
    """The run's best model's top-k logits (no implications) on its validation rows and test split,
    with the data set's label ids, into ``out`` (npz)."""
    check_run_dir(run_dir)
    n_labels = load_run_inputs(run_dir).n_labels
    if top_k > n_labels:
        raise XMLSparseError(f"--top-k {top_k}: the run has {n_labels} labels")
    check_output_file(out)
    config, data, model, device = load_run(run_dir)
    precision = precision_on(device, config.train.precision)
    arrays = {"val_rows": data.val_rows, "n_labels": np.int64(data.train.n_labels)}
    for split in SPLITS:
        ids, scores = predict_topk(model, split_data(data, split), top_k, config.train.eval_batch_size, device,
                                   precision)
        arrays[f"{split}_ids"] = data.preprocess.original_labels(ids).astype(np.int32)
        arrays[f"{split}_scores"] = scores.astype(np.float32)
    with atomic_write(out) as handle:
        np.savez_compressed(handle, **arrays)


def read_lists(path: Path, data: PreparedData, width: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A ``dump`` file's (label positions of the model, logits) per split, checked against ``data``."""
    keys = ("val_rows", "n_labels", *(f"{split}_{part}" for split in SPLITS for part in ("ids", "scores")))
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in keys}
    except (OSError, ValueError, KeyError) as error:
        raise XMLSparseError(f"{path}: not a file of `topk_ensemble.py dump` ({error})") from None
    n_labels = data.train.n_labels
    if int(arrays["n_labels"]) != n_labels or not np.array_equal(arrays["val_rows"], data.val_rows):
        raise XMLSparseError(
            f"{path}: its run had {int(arrays['n_labels'])} labels and {len(arrays['val_rows'])} validation rows, "
            f"the scoring run {n_labels} and {len(data.val_rows)} (or other rows): the lists must come from runs "
            "of the same data and validation split"
        )
    # The model's label positions of the scoring run: its implications and truth use them.
    order = data.preprocess.label_order
    position = np.arange(n_labels) if order is None else np.argsort(order)
    lists = {}
    for split in SPLITS:
        ids, scores = arrays[f"{split}_ids"].astype(np.int64), arrays[f"{split}_scores"].astype(np.float64)
        expected_rows = split_data(data, split).n_points
        if ids.shape != scores.shape or ids.shape[0] != expected_rows or ids.shape[1] < width:
            raise XMLSparseError(
                f"{path}: {split} lists of shape {ids.shape}, expected {expected_rows} rows of at least {width} labels"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= n_labels):
            raise XMLSparseError(f"{path}: {split} label ids outside [0, {n_labels})")
        lists[split] = (position[ids], scores)
    return lists


def mean_topk(lists: list[tuple[np.ndarray, np.ndarray]], n_labels: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k of the mean of the lists' logits (a label missing from a list counts at that list's
    lowest score; ties go to the lower label id): label ids and mean scores ``[N, k]``, and whether
    every list holds each point's first label ``[N]``."""
    n_rows = lists[0][0].shape[0]
    floors = sum(scores.min(axis=1) for _, scores in lists)
    keys = np.concatenate([(np.arange(n_rows)[:, None] * n_labels + ids).ravel() for ids, _ in lists])
    above_floor = np.concatenate([(scores - scores.min(axis=1, keepdims=True)).ravel() for _, scores in lists])
    keys, where = np.unique(keys, return_inverse=True)
    total = np.bincount(where, weights=above_floor, minlength=len(keys))
    listed_by = np.bincount(where, minlength=len(keys))
    row, label = keys // n_labels, keys % n_labels
    mean = (total + floors[row]) / len(lists)
    order = np.lexsort((label, -mean, row))
    per_row = np.bincount(row, minlength=n_rows)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    kept = order[rank < k]
    exact_first = listed_by[order[rank == 0]] == len(lists)
    return label[kept].reshape(n_rows, k), mean[kept].reshape(n_rows, k), exact_first


def score(run_dir: Path, paths: list[Path], buckets: int = DEFAULT_BUCKETS) -> dict[str, Any]:
    """Validation and test metrics of the lists' mean, with the implications of ``run_dir``, and with
    ``buckets`` > 0 the test metrics by label-frequency bucket (``test_by_frequency``), as
    ``xmlsparse eval`` splits them."""
    config, data = load_run_data(run_dir)
    ks = config.eval.k
    lists = [read_lists(path, data, max(ks)) for path in paths]
    implications = data.preprocess.implications
    result = {}
    for split in SPLITS:
        truth = split_data(data, split)
        if truth.n_points == 0:
            continue
        ids, scores, exact_first = mean_topk([member[split] for member in lists], data.train.n_labels, max(ks))
        if implications is not None:
            _, top = consistent_topk(implications, torch.from_numpy(scores), torch.from_numpy(ids), max(ks))
            ids = top.numpy()
        metrics = StreamingMetrics(ks, data.inv_propensity)
        metrics.update(ids, truth.Y)
        result[split] = {**metrics.compute(), "first_label_exact": float(exact_first.mean())}
        if split == "test" and buckets > 0:
            by_frequency = FrequencyBucketMetrics(label_frequencies(data.train.Y), buckets, ks, data.inv_propensity)
            by_frequency.update(ids, truth.Y)
            result["test_by_frequency"] = by_frequency.compute()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dumping = commands.add_parser("dump", help="save a run's top-k logits on its validation rows and test split")
    dumping.add_argument("run_dir", type=Path)
    dumping.add_argument("out", type=Path, help="the npz file to write")
    dumping.add_argument("--top-k", type=int, default=100, help="labels kept a point (default 100)")
    scoring = commands.add_parser("score", help="score the mean of saved lists")
    scoring.add_argument("run_dir", type=Path, help="a member's run directory: data, validation split, implications")
    scoring.add_argument("lists", type=Path, nargs="+", help="files written by dump")
    scoring.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS,
                         help=f"label-frequency buckets of the test table (default {DEFAULT_BUCKETS}; 0: none)")
    scoring.add_argument("--json", type=Path, help="write the metrics here")
    args = parser.parse_args()

    if args.command == "dump":
        if args.top_k < 1:
            raise XMLSparseError(f"--top-k {args.top_k}: expected a positive number of labels")
        dump(args.run_dir, args.out, args.top_k)
        print(f"top-{args.top_k} logits written to {args.out}")
        return
    check_buckets(args.buckets)
    if args.json is not None:
        check_output_file(args.json)
    result = score(args.run_dir, args.lists, args.buckets)
    for split in SPLITS:
        if split in result:
            metrics = result[split]
            print(f"{split:5s}" + "  ".join(f"{name} {100 * value:.2f}" for name, value in metrics.items()
                                            if name.split("@")[0] in ("P", "nDCG", "PSP"))
                  + f"  (first label exact on {100 * metrics['first_label_exact']:.1f} % of points)")
    for row in result.get("test_by_frequency", []):
        print(f"test, {row['bucket']} ({row['labels']} labels, {row['freq_min']}-{row['freq_max']} training points): "
              + "  ".join(f"{name} {100 * row[name]:.2f}" for name in row if name.startswith(("P@", "PSP@"))))
    if args.json is not None:
        with atomic_write(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    try:
        main()
    except XMLSparseError as error:
        sys.exit(f"error: {error}")
