"""Benchmark the data path: XC text parsing and its cache, and full-size synthetic generation.

(a) writes a synthetic bag-of-words set as one XC text file of about --xc-mb megabytes, then
    times the parse (read_xc_text), the first load_split (parse + cache write) and the second
    load_split (cache read), in MB/s of text and points/s;
(b) times generate(like=--like, scale=--scale) and its peak memory.

Each step runs in a fresh process, so its peak resident memory (ru_maxrss) is its own.
Prints a markdown table and writes the numbers as JSON. Small sizes make a smoke test (with the
package importable, e.g. installed with `pip install -e .`):

    python scripts/bench_data.py --xc-mb 5 --scale 0.001 --json /tmp/bench_data.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmlsparse.data.formats import load_split, read_xc_text, write_xc_text
from xmlsparse.data.types import XMCData
from xmlsparse.data.synthetic import generate, resolve_shape

XC_LIKE = "amazon-670k"  # shape of the bag-of-words set written as XC text
SAMPLE_POINTS = 2000  # points written first to learn the text size of one point


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_xc(folder: Path, n_points: int, seed: int) -> dict:
    start = time.perf_counter()
    shape = resolve_shape(XC_LIKE, features="bow")
    sets = generate(folder / "bow", like=XC_LIKE, n_train=n_points, n_test=1, n_labels=shape.n_labels,
                    features="bow", seed=seed)
    generated = time.perf_counter()
    Y = sp.load_npz(sets / "Y.trn.npz")
    data = XMCData(X=sp.load_npz(sets / "X.trn.npz"), Y=Y, n_features=shape.n_features, n_labels=shape.n_labels)
    path = folder / "train.txt"
    write_xc_text(path, data)
    shutil.rmtree(sets)
    return {
        "points": n_points,
        "bytes": path.stat().st_size,
        "generate_s": generated - start,
        "write_s": time.perf_counter() - generated,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _time_read(path: Path, how: str) -> dict:
    start = time.perf_counter()
    data = read_xc_text(path) if how == "read_xc_text" else load_split(path)
    seconds = time.perf_counter() - start
    return {"points": data.n_points, "nnz": int(data.X.nnz), "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _time_generate(out_dir: Path, like: str, scale: float, features: str, seed: int) -> dict:
    start = time.perf_counter()
    generate(out_dir, like=like, scale=scale, features=features, seed=seed)
    seconds = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    meta = json.loads((out_dir / "meta.json").read_text())
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "file_bytes": sizes, "meta": meta}


def _run_isolated(function, *args) -> dict:
    """Run `function(*args)` in a fresh process and return its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def bench_xc(folder: Path, target_mb: float, seed: int) -> dict:
    sample = _run_isolated(_write_xc, folder / "sample", SAMPLE_POINTS, seed)
    shutil.rmtree(folder / "sample")
    n_points = max(SAMPLE_POINTS, round(target_mb * 1e6 / (sample["bytes"] / SAMPLE_POINTS)))
    written = _run_isolated(_write_xc, folder, n_points, seed)
    path = folder / "train.txt"
    results = {"write": written}
    for step, how in (("parse", "read_xc_text"), ("first_load", "load_split"), ("cached_load", "load_split")):
        results[step] = _run_isolated(_time_read, path, how)
    for step in ("parse", "first_load", "cached_load"):
        seconds = results[step]["seconds"]
        results[step]["mb_per_s"] = written["bytes"] / 1e6 / seconds
        results[step]["points_per_s"] = written["points"] / seconds
    return results


def _markdown(results: dict) -> str:
    rows = ["| step | points | seconds | MB/s | points/s | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    if "xc" in results:
        xc = results["xc"]
        rows.append(
            f"| write XC text ({xc['write']['bytes'] / 1e6:.0f} MB) | {xc['write']['points']:,} | "
            f"{xc['write']['write_s']:.1f} | {xc['write']['bytes'] / 1e6 / xc['write']['write_s']:.1f} | "
            f"{xc['write']['points'] / xc['write']['write_s']:,.0f} | {xc['write']['peak_rss_mb']:.0f} |"
        )
        names = {"parse": "read_xc_text", "first_load": "load_split, first (parse + cache)",
                 "cached_load": "load_split, cached"}
        for step, name in names.items():
            r = xc[step]
            rows.append(
                f"| {name} | {r['points']:,} | {r['seconds']:.2f} | {r['mb_per_s']:.1f} | "
                f"{r['points_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |"
            )
    if "generate" in results:
        g = results["generate"]
        meta = g["meta"]
        points = meta["n_train"] + meta["n_test"]
        total_mb = sum(g["file_bytes"].values()) / 1e6
        rows.append(
            f"| generate {meta['name']} x{meta['scale']:g} ({meta['features']}, {meta['n_labels']:,} labels, "
            f"{total_mb:,.0f} MB written) | {points:,} | {g['seconds']:.1f} | {total_mb / g['seconds']:.1f} | "
            f"{points / g['seconds']:,.0f} | {g['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xc-mb", type=float, default=1000.0, help="size of the XC text file (0: skip)")
    parser.add_argument("--like", default="amazon-670k", help="data set whose shape generation imitates")
    parser.add_argument("--scale", type=float, default=1.0, help="scale of the generated set (0: skip)")
    parser.add_argument("--features", choices=("dense", "bow"), default="dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the files go (default: a fresh temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--json", type=Path, default=Path("bench_data.json"), help="where the results go")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="xmlsparse-bench-data-")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": {"python": sys.version.split()[0], "numpy": np.__version__, "platform": platform.platform(),
                    "cpus": multiprocessing.cpu_count()},
    }
    try:
        if args.xc_mb > 0:
            results["xc"] = bench_xc(work / "xc", args.xc_mb, args.seed)
        if args.scale > 0:
            results["generate"] = _run_isolated(
                _time_generate, work / "generated", args.like, args.scale, args.features, args.seed
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(_markdown(results))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
