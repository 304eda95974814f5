"""Time the test evaluation of a trained run: streaming top-k over label blocks, metrics on the fly.

    python scripts/bench_eval.py RUN_DIR [--repeats 2] [--json PATH]

Loads the run's data and best model (as ``xmlsparse eval`` does), then times ``evaluate`` on the
test split alone (loading excluded) ``--repeats`` times and reports each time, the GPU peak
memory of the evaluation (above what the loaded model holds) and P@1/P@5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from xmlsparse.evaluate import evaluate
from xmlsparse.runs import load_run
from xmlsparse.train.setup import precision_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config, data, model, device = load_run(args.run_dir)
    precision = precision_on(device, config.train.precision)
    seconds, peaks = [], []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        started = time.perf_counter()
        metrics = evaluate(model, data.test, config.eval.k, config.train.eval_batch_size, device, precision,
                           data.inv_propensity)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - held)
        seconds.append(time.perf_counter() - started)
    result = {"points": data.test.X.shape[0], "labels": data.test.n_labels, "eval_batch": config.train.eval_batch_size,
              "seconds": seconds, "peak_above_model_bytes": peaks, "model_bytes": held if device.type == "cuda" else None,
              "P@1": metrics["P@1"], "P@5": metrics.get("P@5")}
    print(f"{result['points']:,} points x {result['labels']:,} labels, eval batch {result['eval_batch']}: "
          + ", ".join(f"{s:.2f} s" for s in seconds)
          + (f"; peak {max(peaks) / 2**30:.2f} GiB above the model's {held / 2**30:.2f} GiB" if peaks else "")
          + f"; P@1 {100 * metrics['P@1']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
