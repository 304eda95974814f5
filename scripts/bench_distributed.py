"""Time training with several processes (torchrun, the head sharded by labels) against one process.

    python scripts/bench_distributed.py --like amazon-670k --configs ffi64-65k ffi64-65k-g16 --nprocs 1 2 4 \
        --batch-size 128 --max-steps 500 --json $OUT/bench_distributed.json
    python scripts/bench_distributed.py --like amazon-3m --configs ffi96-131k --nprocs 1 8 --points 100000

Without ``--data`` a synthetic set with the full label space of ``--like`` and ``--points``
training points (768-d dense features) is generated in the work folder first. For every config
(``configs/<like>/<name>.yaml``) and every process count N of ``--nprocs``, one run is trained by

    python -m torch.distributed.run --standalone --nproc_per_node=N -m xmlsparse train CONFIG \
        --set data.dataset=DATA --set train.epochs=E --set train.batch_size=B \
        [--set train.max_steps_per_epoch=S] [--set ...] --out WORK/<config>-n<N>

from this repository's tree (``PYTHONPATH``), its output in ``WORK/<config>-n<N>.log``. ``B`` is the
global batch: each of the N processes computes the intermediate layer for its B/N points and
scores its L/N labels for all B. Read back from the run directory: samples/s of the last epoch
(``metrics.jsonl``; every rank steps through the whole global batch, so it counts global
samples), steps/s (the last line's step over the epochs' step seconds summed), the largest peak
memory of any rank (``final.json``'s ``ranks``, else its top-level value) and the test P@1. The
speed-up is samples/s over that of N = 1 of the same config, when N = 1 is measured in the same
call. A run that fails or passes ``--timeout`` stops the script with the tail of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 40


def make_data(folder: Path, like: str, points: int, test_points: int) -> Path:
    """A synthetic set shaped like ``like`` (all its labels, 768-d dense features) in ``folder``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the tree's package, as the runs use it
    from xmlsparse.data.synthetic import generate

    started = time.perf_counter()
    generate(folder, like=like, n_train=points, n_test=test_points, features="dense")
    print(f"data: {folder} ({points:,} training points like {like}, {time.perf_counter() - started:.0f} s)", flush=True)
    return folder


def train_command(config: Path, data: Path, nprocs: int, epochs: int, batch_size: int, max_steps: int | None,
                  extra: list[str], run_dir: Path) -> list[str]:
    """The torchrun command line of one run."""
    sets = [f"data.dataset={data}", f"train.epochs={epochs}", f"train.batch_size={batch_size}"]
    if max_steps is not None:
        sets.append(f"train.max_steps_per_epoch={max_steps}")
    sets += extra
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
        "-m", "xmlsparse", "train", str(config), *[arg for item in sets for arg in ("--set", item)],
        "--out", str(run_dir),
    ]


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the workers' output: the launcher's own traceback and summary after its
    "failed (exitcode" line, which would push the workers' error out of the tail, are left off."""
    if not log.exists():
        return f"({log} was not written)"
    text = log.read_text(errors="replace").splitlines()
    end = next((i + 1 for i, line in enumerate(text) if "failed (exitcode" in line), len(text))
    return "\n".join(text[:end][-lines:])


def run_training(command: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``command`` in its own process group with its output in ``log``; the exit status (None
    when it passed ``timeout`` and its group was ended) and the seconds it took."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    started = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            # torchrun's workers are in the same (new) process group: end them all, then the launcher.
            for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    return code, time.perf_counter() - started


def read_run(run_dir: Path) -> dict[str, Any]:
    """What one finished run directory says about speed, memory and accuracy."""
    final = json.loads((run_dir / "final.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no epoch")
    last = lines[-1]
    step_seconds = sum(line["epoch_seconds"] for line in lines)
    ranks = final.get("ranks") or [{
        "rank": 0, "labels": None, "peak_memory_bytes": final.get("peak_memory_bytes"),
        "samples_per_second": last.get("samples_per_second"),
    }]
    peaks = [rank["peak_memory_bytes"] for rank in ranks if rank.get("peak_memory_bytes") is not None]
    return {
        "world_size": final.get("world_size", 1),
        "epochs": len(lines),
        "steps": last["step"],
        "step_seconds": step_seconds,
        "samples_per_second": last["samples_per_second"],
        "steps_per_second": last["step"] / step_seconds if step_seconds > 0 else None,
        "max_rank_peak_memory_bytes": max(peaks) if peaks else None,
        "test": final.get("test", {}),
        "ranks": ranks,
    }


def speedup(result: dict[str, Any], results: list[dict[str, Any]]) -> float | None:
    """samples/s of ``result`` over those of the same config with one process, when measured."""
    baseline = next((r for r in results if r["config"] == result["config"] and r["nprocs"] == 1), None)
    if baseline is None or not baseline["samples_per_second"]:
        return None
    return result["samples_per_second"] / baseline["samples_per_second"]


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    rows = [
        "| config | N | B | samples/s | steps/s | max rank peak GiB | test P@1 | speed-up over N = 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = r["max_rank_peak_memory_bytes"]
        p1 = r["test"].get("P@1")
        rows.append(
            f"| {r['config']} | {r['nprocs']} | {r['batch_size']} | {fmt(r['samples_per_second'], ',.0f')} "
            f"| {fmt(r['steps_per_second'], '.2f')} | {fmt(None if peak is None else peak / 2**30, '.2f')} "
            f"| {fmt(None if p1 is None else 100 * p1, '.2f')} | {fmt(r['speedup'], '.2f')} |"
        )
    return "\n".join(rows)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", default="amazon-670k", choices=["amazon-670k", "amazon-3m"])
    parser.add_argument("--configs", nargs="+", default=["ffi64-65k"], help="names in configs/<like>/")
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1], help="processes per run (one per GPU)")
    parser.add_argument("--points", type=int, default=200000, help="training points generated (without --data)")
    parser.add_argument("--test-points", type=int, default=2000, help="test points generated (without --data)")
    parser.add_argument("--data", type=Path, default=None, help="a data set folder to train on instead")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch, split over the processes")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps_per_epoch")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the data, run directories and logs (default: a new temporary folder, "
                             "removed at the end unless --keep or a run fails)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/bench_distributed.json when $OUT is set")
    args = parser.parse_args()
    if min(args.nprocs) < 1 or args.batch_size < max(args.nprocs) or args.epochs < 1:
        parser.error("--nprocs must be positive, --batch-size at least the largest of them, --epochs positive")
    configs = {name: REPO / "configs" / args.like / f"{name}.yaml" for name in args.configs}
    missing = [str(path) for path in configs.values() if not path.exists()]
    if missing:
        parser.error("no such config: " + ", ".join(missing))
    json_path = args.json or (Path(os.environ["OUT"]) / "bench_distributed.json" if os.environ.get("OUT") else None)

    work = args.work.resolve() if args.work is not None else Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data is not None else make_data(work / "data", args.like, args.points,
                                                                         args.test_points)
    settings = {key: getattr(args, key) for key in ("like", "batch_size", "epochs", "max_steps", "sets")}
    settings.update(data=str(data), points=None if args.data is not None else args.points)
    results: list[dict[str, Any]] = []
    for name, config in configs.items():
        for nprocs in args.nprocs:
            run_dir = work / f"{name}-n{nprocs}"
            log = work / f"{name}-n{nprocs}.log"
            command = train_command(config, data, nprocs, args.epochs, args.batch_size, args.max_steps, args.sets, run_dir)
            print(f"{name}, N = {nprocs}: {' '.join(command[1:])}", flush=True)
            code, seconds = run_training(command, log, args.timeout)
            failure = (f"timed out after {args.timeout:.0f} s" if code is None
                       else f"exited with status {code}" if code != 0
                       else None if (run_dir / "final.json").exists() else "wrote no final.json")
            if failure is not None:
                if json_path is not None:
                    write_json(json_path, {"settings": settings, "results": results,
                                           "failed": {"config": name, "nprocs": nprocs, "why": failure, "log": str(log)}})
                print(f"\n{name}, N = {nprocs}: the run {failure}; last lines of {log}:\n{log_tail(log)}", file=sys.stderr)
                sys.exit(f"bench_distributed: {name} with {nprocs} processes {failure} (work folder kept: {work})")
            result = {"config": name, "nprocs": nprocs, "batch_size": args.batch_size, "wall_seconds": seconds,
                      **read_run(run_dir)}
            results.append(result)
            result["speedup"] = speedup(result, results)
            print(json.dumps({k: v for k, v in result.items() if k != "ranks"}), flush=True)
    for result in results:  # N = 1 may come after other counts in --nprocs
        result["speedup"] = speedup(result, results)
    if json_path is not None:
        write_json(json_path, {"settings": settings, "results": results})
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}")
    print(f"\n{args.like}, global batch {args.batch_size}, {args.epochs} epoch(s)"
          + (f" of at most {args.max_steps} steps" if args.max_steps else "") + "; N processes, one per device")
    print(table(results))


if __name__ == "__main__":
    main()
