"""Score omikuji and napkinXC (PLT), each with its defaults, on the same train/test files as xmlsparse.

    python scripts/baselines.py --data ../shared/datasets --sets bibtex delicious --json baselines.json

Both install from PyPI (`pip install omikuji napkinxc`). Metrics come from xmlsparse.metrics, with
propensities A=0.55, B=1.5 from the training labels, so the numbers compare with `xmlsparse eval`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from xmlsparse.data.formats import XMCData, read_xc_text
from xmlsparse.metrics import StreamingMetrics, inverse_propensity, label_frequencies

TOP_K = 5


def _metrics(pred: np.ndarray, test: XMCData, train: XMCData) -> dict[str, float]:
    inv_prop = inverse_propensity(label_frequencies(train.Y), train.n_points, 0.55, 1.5)
    metrics = StreamingMetrics(ks=(1, 3, 5), inv_propensity=inv_prop)
    metrics.update(pred, test.Y)
    return metrics.compute()


def _pad(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), TOP_K), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row[:TOP_K]
    return out


def run_omikuji(train_path: Path, test: XMCData) -> tuple[np.ndarray, float]:
    import omikuji

    started = time.perf_counter()
    model = omikuji.Model.train_on_data(str(train_path), omikuji.Model.default_hyper_param())
    rows = []
    for i in range(test.n_points):
        row = test.X.getrow(i)
        pairs = list(zip(row.indices.tolist(), row.data.tolist()))
        rows.append([label for label, _ in model.predict(pairs, top_k=TOP_K)])
    return _pad(rows), time.perf_counter() - started


def run_napkinxc(train: XMCData, test: XMCData) -> tuple[np.ndarray, float]:
    from napkinxc.models import PLT

    labels = np.split(train.Y.indices, train.Y.indptr[1:-1])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model = PLT(folder)
        model.fit(train.X, [row.tolist() for row in labels])
        predicted = model.predict(test.X, top_k=TOP_K)
    return _pad([list(row) for row in predicted]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--sets", nargs="+", default=["bibtex", "delicious"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for name in args.sets:
        train_path, test_path = args.data / name / "train.txt", args.data / name / "test.txt"
        train, test = read_xc_text(train_path), read_xc_text(test_path)
        for tool, (pred, seconds) in {
            "omikuji": run_omikuji(train_path, test),
            "napkinxc-plt": run_napkinxc(train, test),
        }.items():
            results[f"{name}/{tool}"] = {**_metrics(pred, test, train), "seconds": seconds}
    print(f"{'set/tool':<26}{'P@1':>7}{'P@3':>7}{'P@5':>7}{'nDCG@5':>8}{'PSP@5':>7}{'s':>7}")
    for key, m in results.items():
        print(
            f"{key:<26}{100 * m['P@1']:>7.2f}{100 * m['P@3']:>7.2f}{100 * m['P@5']:>7.2f}"
            f"{100 * m['nDCG@5']:>8.2f}{100 * m['PSP@5']:>7.2f}{m['seconds']:>7.1f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
