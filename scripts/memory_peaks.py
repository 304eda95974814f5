"""Where the GPU memory of a training run goes: the peak of each phase and what is live at it.

    python scripts/memory_peaks.py --like amazon-670k --config ffi64-65k --batch-size 128
    python scripts/memory_peaks.py --like amazon-3m --config ffi96-131k --batch-size 32

Runs the phases of a run on a synthetic set with the full label space (as ``bench_train.py``):
building the model, the first steps (the optimizer state is made), a steady step, a rewiring round
and the step after it (the by-input index is rebuilt). The CUDA caching allocator records every
allocation with its Python stack (``torch.cuda.memory._record_memory_history``); replaying that
trace gives, for each phase, its peak of allocated bytes and the allocations live at that peak,
grouped by the line of this project that made them. Prints one table per phase; ``--json``
writes them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from xmlsparse.config import load_config
from xmlsparse.data.batches import BatchIterator
from xmlsparse.data.datasets import REGISTRY
from xmlsparse.data.synthetic import generate
from xmlsparse.train.rewiring import Rewirer
from xmlsparse.train.losses import loss_fn
from xmlsparse.train.setup import model_for, prepare_data
from xmlsparse.train.trainer import build_optimizer, connect_head_to_optimizer, train_step

TRACE_ENTRIES = 2_000_000
PROJECT_MARKERS = ("xmlsparse/", "scripts/")


def _site(frames: list[dict]) -> str:
    """The innermost frame of this project that led to an allocation, with the innermost frame."""
    ours = next((f for f in frames if any(m in f["filename"] for m in PROJECT_MARKERS)), None)
    inner = frames[0] if frames else None
    if ours is None:
        return "(no project frame)" if inner is None else f"{Path(inner['filename']).name}:{inner['line']}"
    where = f"{ours['filename'].split('xmlsparse/')[-1]}:{ours['line']} {ours['name']}"
    if inner is not None and inner is not ours:
        where += f" <- {Path(inner['filename']).name}:{inner['name']}"
    return where


def _marker() -> int:
    torch.cuda.synchronize()
    return len(torch.cuda.memory._snapshot()["device_traces"][0])


def phase_peaks(trace: list[dict], markers: list[tuple[str, int]], top: int) -> list[dict]:
    """Replay ``trace`` (alloc / free_completed events); per phase between markers, the peak of
    allocated bytes and the live allocations at that peak grouped by site."""
    live: dict[int, tuple[int, str]] = {}
    allocated = 0
    results = []
    bounds = list(zip(markers, markers[1:]))
    position = 0
    for (_, start), (name, end) in bounds:
        assert position == start
        peak, peak_live = allocated, dict(live)
        at_start = allocated
        for event in trace[start:end]:
            if event["action"] == "alloc":
                live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
                allocated += event["size"]
                if allocated > peak:
                    peak, peak_live = allocated, dict(live)
            elif event["action"] == "free_completed" and event["addr"] in live:
                allocated -= live.pop(event["addr"])[0]
        position = end
        by_site: dict[str, int] = defaultdict(int)
        for size, site in peak_live.values():
            by_site[site] += size
        ranked = sorted(by_site.items(), key=lambda item: -item[1])
        results.append({"phase": name, "allocated_at_start": at_start, "peak": peak,
                        "live_at_peak": [{"site": site, "bytes": size} for site, size in ranked[:top]],
                        "other_bytes": sum(size for _, size in ranked[top:])})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", default="amazon-670k")
    parser.add_argument("--config", default="ffi64-65k")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--data", type=Path, default=None, help="synthetic set folder (generated when missing)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data or Path(f"/tmp/bench-train-{args.like}")
    if not (data_dir / "meta.json").exists():
        generate(data_dir, like=args.like, n_train=args.points, n_test=1000, features="dense")
    assert args.like in REGISTRY
    config = load_config(Path("configs") / args.like / f"{args.config}.yaml",
                         [f"data.dataset={data_dir}", f"train.batch_size={args.batch_size}", "train.device=cuda"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    data = prepare_data(config)
    iterator = BatchIterator(data.train.X, data.train.Y, args.batch_size, shuffle=True, seed=0, points=data.train_rows)
    batches = [batch.to(device) for batch, _ in zip(iterator, range(4))]

    torch.cuda.memory._record_memory_history(max_entries=TRACE_ENTRIES, stacks="python")
    markers = [("", _marker())]
    model = model_for(config, data.train.n_features, data.train.n_labels, device)
    optimizer = build_optimizer(model, config)
    connect_head_to_optimizer(model, optimizer, config)
    loss = loss_fn(config.train.loss, consume_logits=True)
    model.train()
    markers.append(("build model", _marker()))
    for i in range(2):
        train_step(model, batches[i], loss, optimizer, device, "bf16")
    markers.append(("first two steps", _marker()))
    train_step(model, batches[2], loss, optimizer, device, "bf16")
    markers.append(("steady step", _marker()))
    rewire = config.model.rewire
    if model.sparse_head is not None and rewire is not None:
        rewirer = Rewirer(rewire, total_steps=10 * rewire.interval, seed=config.train.seed)
        rewirer.rewire(model.sparse_head, optimizer)
        markers.append(("rewire", _marker()))
        train_step(model, batches[3], loss, optimizer, device, "bf16")
        markers.append(("step after rewire", _marker()))
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    if len(trace) >= TRACE_ENTRIES:
        raise SystemExit(f"the allocator trace filled its {TRACE_ENTRIES} entries; phases would be cut")

    results = phase_peaks(trace, markers, args.top)
    for phase in results:
        print(f"\n{phase['phase']}: {phase['allocated_at_start'] / 2**20:,.0f} MiB at start, "
              f"peak {phase['peak'] / 2**20:,.0f} MiB ({phase['peak'] / 2**30:.3f} GiB); live at the peak:")
        for entry in phase["live_at_peak"]:
            print(f"  {entry['bytes'] / 2**20:>9,.1f} MiB  {entry['site']}")
        print(f"  {phase['other_bytes'] / 2**20:>9,.1f} MiB  (other sites)")
    if args.json is not None:
        args.json.write_text(json.dumps({"like": args.like, "config": args.config, "batch_size": args.batch_size,
                                         "phases": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
