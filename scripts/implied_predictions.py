"""Score a saved top-k prediction file made consistent with the label implications of a training file.

This is the step that `eval.implications` applies inside a run (xmlsparse.implications), for
predictions saved earlier: `xmlsparse eval RUN --save-predictions` of a run or an ensemble trained
without it, or any file with the same number of labels on every row. The table is read from the
training file's rows outside the validation split of `--config` (the run's `config.yaml`; by default
the generic recipe) with its `eval.implications.min_support`, as a run reads it, so that the metrics
equal what the run would have scored with the key set; `--validation`, `--validation-max-points`
and `--min-support` override single values. The label frequencies and propensities (A = 0.55,
B = 1.5) come from the whole training file, as `xmlsparse eval`'s do. The scores are not written
back: a file would lose the order of tied labels, which the step decides.

    python scripts/implied_predictions.py runs/wordnet/predictions-test.txt \\
        ../shared/datasets/wordnet-hypernyms/train.txt ../shared/datasets/wordnet-hypernyms/test.txt \\
        --config runs/wordnet/config.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from xmlsparse.config import ImplicationsConfig, load_config
from xmlsparse.data.batches import split_validation
from xmlsparse.data.formats import load_split
from xmlsparse.data.predictions import read_predictions
from xmlsparse.errors import XMLSparseError
from xmlsparse.implications import LabelImplications, consistent_topk
from xmlsparse.metrics import (
    DEFAULT_BUCKETS,
    DEFAULT_PROPENSITY,
    FrequencyBucketMetrics,
    StreamingMetrics,
    inverse_propensity,
    label_frequencies,
)


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "bow.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path, help="top-k predictions (label:score lines or npz CSR)")
    parser.add_argument("train", type=Path, help="the training file the model was trained on")
    parser.add_argument("truth", type=Path, help="the data set the predictions are for")
    parser.add_argument("--config", type=Path, default=RECIPE,
                        help="the run's config.yaml: its validation split and implications (default: the generic recipe)")
    parser.add_argument("--validation", type=float, help="in place of the config's data.validation")
    parser.add_argument("--validation-max-points", type=int,
                        help="in place of the config's data.validation_max_points (0: none)")
    parser.add_argument("--min-support", type=int, help="in place of the config's eval.implications.min_support")
    parser.add_argument("--json", type=Path, help="write the metrics and the frequency table here")
    args = parser.parse_args()

    # The data path is the training file's folder, so that a config need not point at an existing one.
    config = load_config(args.config, [f"data.dataset={args.train.parent}"])
    share = config.data.validation if args.validation is None else args.validation
    cap = config.data.validation_max_points if args.validation_max_points is None else args.validation_max_points or None
    implied = config.eval.implications or ImplicationsConfig()
    min_support = implied.min_support if args.min_support is None else args.min_support

    train = load_split(args.train)
    train_rows, _ = split_validation(train.n_points, share, config.data.validation_seed, max_points=cap)
    implications = LabelImplications.from_labels(train.Y[train_rows], min_support)
    scores = read_predictions(args.predictions, n_labels=train.n_labels)
    widths = np.diff(scores.indptr)
    if widths.size == 0 or np.any(widths != widths[0]):
        raise XMLSparseError(f"{args.predictions}: expected the same number of labels on every row")
    k = int(widths[0])
    ids = torch.from_numpy(scores.indices.astype(np.int64).reshape(-1, k))
    values = torch.from_numpy(scores.data.astype(np.float32).reshape(-1, k))
    _, ids = consistent_topk(implications, values, ids, k)

    truth = load_split(args.truth).Y
    freq = label_frequencies(train.Y)
    inv_propensity = inverse_propensity(freq, train.n_points, *DEFAULT_PROPENSITY)
    ks = tuple(range(1, k + 1, 2))
    metrics = StreamingMetrics(ks=ks, inv_propensity=inv_propensity)
    by_frequency = FrequencyBucketMetrics(freq, DEFAULT_BUCKETS, ks, inv_propensity)
    for accumulator in (metrics, by_frequency):
        accumulator.update(ids.numpy(), truth)
    result = {**metrics.compute(), "by_frequency": by_frequency.compute()}
    print(f"{len(implications.implied):,} implications; "
          + "  ".join(f"{name} {100 * value:.2f}" for name, value in result.items() if name != "by_frequency"))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except XMLSparseError as error:
        sys.exit(f"error: {error}")
