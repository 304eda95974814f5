"""Train one config twice on CUDA, once with the Triton fixed fan-in ops and once with the reference
ops, and compare their validation and test P@k (they should agree within noise).

    python scripts/compare_impls.py configs/quickstart.yaml --out runs/impls --set train.device=cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from xmlsparse.config import load_config
from xmlsparse.train.trainer import start_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for impl in ("triton", "reference"):
        config = load_config(args.config, args.overrides + [f"model.head.impl={impl}"])
        run_dir = args.out / impl
        started = time.perf_counter()
        final = start_run(config, run_dir).fit()
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[impl] = {
            "val_P@1": [line["val_P@1"] for line in lines],
            "test": final["test"],
            "seconds": time.perf_counter() - started,
            "samples_per_second": [line["samples_per_second"] for line in lines],
        }
    print(f"{'impl':<10}{'best val P@1':>13}{'test P@1':>10}{'test P@5':>10}{'samples/s':>11}{'s':>7}")
    for impl, r in results.items():
        print(
            f"{impl:<10}{100 * max(r['val_P@1']):>13.2f}{100 * r['test']['P@1']:>10.2f}"
            f"{100 * r['test']['P@5']:>10.2f}{max(r['samples_per_second']):>11.0f}{r['seconds']:>7.1f}"
        )
    gap = abs(max(results["triton"]["val_P@1"]) - max(results["reference"]["val_P@1"]))
    print(f"validation P@1 gap: {100 * gap:.2f} points")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
