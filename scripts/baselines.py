"""Run the peer toolkits on the same XC text files as xmlsparse and score them with `xmlsparse eval`.

Peers, each with its own defaults, on --threads threads:
- omikuji 0.5.2, defaults (Parabel-like: 3 trees, balanced 2-means clustering);
- omikuji 0.5.2, the Bonsai-like setting of its README (unbalanced k-means, cluster.k 100, max depth 3,
  everything else default);
- napkinXC 0.7.2, PLT with defaults;
- PECOS 1.2.8, XR-Linear through its CLI (`python -m pecos.xmc.xlinear.train` / `predict`) with defaults.
Every peer gets the features as the files hold them; omikuji and napkinXC L2-normalise each point's
features themselves, PECOS does not (so on the binary features of Bibtex and Delicious it learns from
unnormalised rows; WordNet-Hypernyms' tf-idf rows are normalised in the file).

The peers have a virtual environment of their own (they pin numpy and scipy versions of their own), and
every training and every prediction runs there in a process of its own. This file is also the worker
those processes run (`peer` command), so at the top it imports only what both environments have.
Timing and peak memory come from GNU time (`apt-get install time`). From the repository root, with
xmlsparse installed in the current environment:

    python -m venv ../peers
    ../peers/bin/pip install omikuji==0.5.2 napkinxc==0.7.2 libpecos==1.2.8 scikit-learn
    python scripts/baselines.py run --python ../peers/bin/python --data ../shared/datasets \\
        --sets bibtex delicious wordnet-hypernyms --threads 2 --out ../results/peers

For each set and peer, --out gets SET/PEER.txt (top-5 test predictions, `label:score` lines), SET/PEER.json
(its `xmlsparse eval` metrics, PSP@k with A=0.55, B=1.5 from the training labels) and SET/PEER.log (the
peer's own output); results.json gathers the peers' versions, the metrics, the wall time of the training
and of the prediction process (each whole: start-up, loading, fitting or predicting, saving) and their peak
resident memory. The table printed for each set shows the training process's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

TOP_K = 5
GNU_TIME = "/usr/bin/time"  # Debian/Ubuntu package `time`
PEERS = ("omikuji", "omikuji-bonsai", "napkinxc-plt", "pecos-xrlinear")
PEER_PACKAGES = ("omikuji", "napkinxc", "libpecos", "numpy", "scipy")
TABLE_METRICS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@3", "PSP@5")
# File names in the folder of converted data: CSR npz of the training and test split.
X_TRAIN, Y_TRAIN, X_TEST = "X.trn.npz", "Y.trn.npz", "X.tst.npz"
TOPK_FILE = "topk.npz"  # what a prediction process leaves: `labels` and `scores`, [N, TOP_K], -1 = none


@dataclass(frozen=True)
class ProcessStats:
    seconds: float
    peak_mib: float


# ---------------------------------------------------------------------------------------------
# Worker: one stage of one peer, run by the peers' Python.


def _train_peer(peer: str, train_text: Path, data: Path, model: Path, threads: int) -> None:
    if peer == "napkinxc-plt":
        from napkinxc.models import PLT

        Y = sp.load_npz(data / Y_TRAIN).tocsr()
        labels = [row.tolist() for row in np.split(Y.indices, Y.indptr[1:-1])]
        PLT(str(model), threads=threads).fit(sp.load_npz(data / X_TRAIN).tocsr(), labels)
        return
    import omikuji

    params = omikuji.Model.default_hyper_param()
    if peer == "omikuji-bonsai":
        params.cluster_balanced = False
        params.cluster_k = 100
        params.max_depth = 3
    omikuji.Model.train_on_data(str(train_text), params, n_threads=threads).save(str(model))


def _predict_peer(peer: str, data: Path, model: Path, threads: int, out: Path) -> None:
    X = sp.load_npz(data / X_TEST).tocsr()
    if peer == "napkinxc-plt":
        from napkinxc.models import PLT

        rows = PLT(str(model), threads=threads).predict_proba(X, top_k=TOP_K)
    else:
        import omikuji

        loaded = omikuji.Model.load(str(model))
        loaded.init_prediction_thread_pool(threads)
        rows = [
            loaded.predict(zip(X.indices[start:stop].tolist(), X.data[start:stop].tolist()), top_k=TOP_K)
            for start, stop in zip(X.indptr[:-1], X.indptr[1:])
        ]
    labels = np.full((len(rows), TOP_K), -1, dtype=np.int64)
    scores = np.zeros((len(rows), TOP_K), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (label, score) in enumerate(row[:TOP_K]):
            labels[i, j], scores[i, j] = label, score
    np.savez(out, labels=labels, scores=scores)


# ---------------------------------------------------------------------------------------------
# Driver: runs in the environment of xmlsparse.


def _run_measured(command: list[str], log: Path, threads: int) -> ProcessStats:
    """Run a process to its end under GNU time, its output appended to log; its wall time and peak RSS.

    The peak is the process's own ru_maxrss as GNU time reads it: a child started straight from this
    (large) process would inherit this process's peak. Fails on a nonzero exit.
    """
    env = {**os.environ, **{name: str(threads) for name in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS")}}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats, open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        subprocess.run(
            [GNU_TIME, "-f", "%e %M", "-o", stats.name, *command], stdout=f, stderr=subprocess.STDOUT, env=env,
            check=True,
        )
        seconds, peak_kib = stats.read().split()
    return ProcessStats(seconds=float(seconds), peak_mib=int(peak_kib) / 1024)


def _write_npz_splits(train_text: Path, test_text: Path, folder: Path) -> int:
    """Convert the XC text splits to CSR npz (float32 features) in folder; the number of labels."""
    from xmlsparse.data.formats import read_xc_text

    train, test = read_xc_text(train_text), read_xc_text(test_text)
    sp.save_npz(folder / X_TRAIN, sp.csr_matrix(train.X, dtype=np.float32))
    sp.save_npz(folder / Y_TRAIN, sp.csr_matrix(train.Y, dtype=np.float32))
    sp.save_npz(folder / X_TEST, sp.csr_matrix(test.X, dtype=np.float32))
    return train.n_labels


def _topk_of_scores(scores: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Top-k label ids (-1 = none) and scores [N, TOP_K] of a sparse score matrix, best first."""
    labels = np.full((scores.shape[0], TOP_K), -1, dtype=np.int64)
    values = np.zeros((scores.shape[0], TOP_K), dtype=np.float32)
    for i, (start, stop) in enumerate(zip(scores.indptr[:-1], scores.indptr[1:])):
        order = np.argsort(-scores.data[start:stop], kind="stable")[:TOP_K]
        labels[i, : order.size] = scores.indices[start:stop][order]
        values[i, : order.size] = scores.data[start:stop][order]
    return labels, values


def _run_peer(
    peer: str, python: str, train_text: Path, work: Path, threads: int, log: Path
) -> tuple[ProcessStats, ProcessStats, tuple[np.ndarray, np.ndarray]]:
    """Train and predict with one peer on the npz splits in work; both processes' stats and the top-k."""
    model = work / f"{peer}.model"
    if peer == "pecos-xrlinear":
        train = _run_measured(
            [python, "-m", "pecos.xmc.xlinear.train", "-x", str(work / X_TRAIN), "-y", str(work / Y_TRAIN),
             "-m", str(model), "-n", str(threads)],
            log, threads,
        )
        scores_path = work / f"{peer}.scores.npz"
        predict = _run_measured(
            [python, "-m", "pecos.xmc.xlinear.predict", "-x", str(work / X_TEST), "-m", str(model),
             "-k", str(TOP_K), "-n", str(threads), "-o", str(scores_path)],
            log, threads,
        )
        return train, predict, _topk_of_scores(sp.load_npz(scores_path).tocsr())
    worker = [python, str(Path(__file__).resolve()), "peer", peer, "--data", str(work), "--model", str(model),
              "--threads", str(threads)]
    model.mkdir()
    train = _run_measured([*worker, "train", "--train-text", str(train_text)], log, threads)
    topk_path = work / f"{peer}.{TOPK_FILE}"
    predict = _run_measured([*worker, "predict", "--out", str(topk_path)], log, threads)
    with np.load(topk_path) as topk:
        return train, predict, (topk["labels"], topk["scores"])


def _evaluate(predictions: Path, test_text: Path, train_text: Path, out: Path) -> dict[str, object]:
    subprocess.run(
        [sys.executable, "-m", "xmlsparse", "eval", "--predictions", str(predictions), "--truth", str(test_text),
         "--train", str(train_text), "--json", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())


def _peer_versions(python: str) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    done = subprocess.run([python, "-c", code, *PEER_PACKAGES], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def _table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table of one set's peers: metrics in %, both wall times, the training process's peak RSS."""
    head = ["model", *TABLE_METRICS, "train s", "predict s", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for peer, result in results.items():
        train, predict = result["train"], result["predict"]
        cells = [f"{100 * result['metrics'][k]:.2f}" for k in TABLE_METRICS]
        cells += [f"{train['seconds']:.1f}", f"{predict['seconds']:.1f}", f"{train['peak_mib']:.0f}"]
        lines.append("| " + " | ".join([peer, *cells]) + " |")
    return "\n".join(lines)


def run(python: str, data_root: Path, sets: list[str], peers: list[str], threads: int, out: Path) -> None:
    from xmlsparse.data.predictions import write_predictions

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    report = {"threads": threads, "versions": _peer_versions(python), "results": results}
    for name in sets:
        train_text, test_text = data_root / name / "train.txt", data_root / name / "test.txt"
        (out / name).mkdir(exist_ok=True)
        results[name] = {}
        with tempfile.TemporaryDirectory(prefix=f"peers-{name}-") as tmp:
            work = Path(tmp)
            n_labels = _write_npz_splits(train_text, test_text, work)
            for peer in peers:
                log = out / name / f"{peer}.log"
                log.unlink(missing_ok=True)
                train, predict, (labels, scores) = _run_peer(peer, python, train_text, work, threads, log)
                predictions = out / name / f"{peer}.txt"
                write_predictions(predictions, labels, scores, n_labels)
                metrics = _evaluate(predictions, test_text, train_text, out / name / f"{peer}.json")
                results[name][peer] = {"metrics": metrics, "train": asdict(train), "predict": asdict(predict)}
                (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
                print(f"{name} / {peer}: train {train.seconds:.1f} s, predict {predict.seconds:.1f} s", flush=True)
        print(f"\n{name}\n\n{_table(results[name])}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train, predict and score every peer on every set")
    run_parser.add_argument("--python", required=True, help="Python of the peers' virtual environment")
    run_parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    run_parser.add_argument("--sets", nargs="+", default=["bibtex", "delicious", "wordnet-hypernyms"])
    run_parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    run_parser.add_argument("--threads", type=int, default=2)
    run_parser.add_argument("--out", type=Path, required=True)
    peer_parser = commands.add_parser("peer", help="one stage of one peer (run by the peers' Python)")
    peer_parser.add_argument("name", choices=[p for p in PEERS if p != "pecos-xrlinear"])
    peer_parser.add_argument("--data", type=Path, required=True, help="folder of the npz splits")
    peer_parser.add_argument("--model", type=Path, required=True)
    peer_parser.add_argument("--threads", type=int, required=True)
    stages = peer_parser.add_subparsers(dest="stage", required=True)
    stages.add_parser("train").add_argument("--train-text", type=Path, required=True)
    stages.add_parser("predict").add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "run":
        run(args.python, args.data, args.sets, args.peers, args.threads, args.out)
    elif args.stage == "train":
        _train_peer(args.name, args.train_text, args.data, args.model, args.threads)
    else:
        _predict_peer(args.name, args.data, args.model, args.threads, args.out)


if __name__ == "__main__":
    main()
