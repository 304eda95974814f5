"""Train one config with each output-layer variant and tabulate test metrics, head memory and time.

    python scripts/compare_heads.py configs/bibtex.yaml --out runs/compare-bibtex --json bibtex.json

Variants: dense head, fixed fan-in without intermediate, fixed fan-in + intermediate, each fixed
fan-in model with and without rewiring. Extra `--set` overrides apply to every variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from xmlsparse.config import load_config
from xmlsparse.train.trainer import start_run

VARIANTS: dict[str, list[str]] = {
    "dense": ["model.intermediate=null", "model.head.type=dense", "model.rewire=null"],
    "ffi, no intermediate, no rewiring": ["model.intermediate=null", "model.rewire=null"],
    "ffi, no intermediate, rewiring": ["model.intermediate=null"],
    "ffi + intermediate, no rewiring": ["model.rewire=null"],
    "ffi + intermediate, rewiring": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the run directories")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every variant")
    parser.add_argument("--only", action="append", default=None, help="run only these variants")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        config = load_config(args.config, args.overrides + overrides)
        run_dir = args.out / name.replace(", ", "-").replace(" + ", "+").replace(" ", "-")
        started = time.perf_counter()
        final = start_run(config, run_dir).fit()
        memory = final["memory"]
        results[name] = {
            **final["test"],
            "head_bytes": memory["head_params"] + memory["head_indices"],
            "intermediate_bytes": memory["intermediate"],
            "epochs": final["epochs"],
            "seconds": time.perf_counter() - started,
        }
    print(f"{'variant':<36}{'P@1':>7}{'P@3':>7}{'P@5':>7}{'nDCG@5':>8}{'PSP@5':>7}{'head KiB':>10}{'inter KiB':>10}{'ep':>4}{'s':>6}")
    for name, r in results.items():
        print(
            f"{name:<36}{100 * r['P@1']:>7.2f}{100 * r['P@3']:>7.2f}{100 * r['P@5']:>7.2f}{100 * r['nDCG@5']:>8.2f}"
            f"{100 * r['PSP@5']:>7.2f}{r['head_bytes'] / 1024:>10.0f}{r['intermediate_bytes'] / 1024:>10.0f}"
            f"{r['epochs']:>4}{r['seconds']:>6.0f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
