"""Time the whole training step on one GPU, split by part, for the paper's grid of output layers.

    python scripts/bench_train.py --like amazon-670k --configs dense bottleneck-64 ffi32-32k ffi64-65k \
        ffi64-100k --batch-sizes 32 128 --json $OUT/bench_train.json
    python scripts/bench_train.py --like amazon-3m --configs ffi96-131k --batch-sizes 32 128

The data are synthetic with the full label space of ``--like`` (``--points`` training points are
enough to time steps; epochs are extrapolated to the data set's real size and labelled so). Each
step is run as the trainer runs it (bf16 autocast, the config's loss and Adam), with CUDA events
between the parts:
encoder+intermediate forward, head forward, loss (forward and its gradient), head backward,
encoder+intermediate backward, optimizer step; one rewiring round is timed apart and amortised over
its interval. A second pass without events gives the step time that steps/s is computed from.
Where a config runs the head's Adam step inside its backward (``head_update_in_backward``), that
step is part of "head bwd" and "optimizer" covers the other parts. One more step is measured for
memory (``xmlsparse.train.memory``): the bytes of each part's state and each phase's peak above
the step's start, printed as a second table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from xmlsparse.config import load_config
from xmlsparse.data.batches import BatchIterator
from xmlsparse.data.datasets import REGISTRY
from xmlsparse.data.synthetic import generate
from xmlsparse.train.rewiring import Rewirer
from xmlsparse.train.losses import loss_fn
from xmlsparse.train.memory import StepMemory, optimizer_state_bytes, state_bytes
from xmlsparse.train.setup import model_for, prepare_data
from xmlsparse.train.trainer import build_optimizer, connect_head_to_optimizer, train_step

MEMORY_COLUMNS = (
    "intermediate", "head_params", "head_indices", "head_by_input_index", "optimizer_intermediate", "optimizer_head",
    "allocated_at_step_start", "logits_bytes", "forward_and_loss_peak_above_start", "backward_peak_above_start",
    "optimizer_peak_above_start",
)
PARTS = ("encoder+intermediate fwd", "head fwd", "loss", "head bwd", "encoder+intermediate bwd", "optimizer")


def _timed_step(model, batch, loss, optimizer, events):
    """One training step with an event after each part; the head input is detached so that the
    head's backward and the layers' below it are timed apart."""
    events[0].record()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = model.features(batch)
        events[1].record()
        h_in = h.detach().requires_grad_()
        logits = model.head(h_in)
    events[2].record()
    value = loss(logits, batch.y_indices, batch.y_ptr)
    (grad_logits,) = torch.autograd.grad(value, logits)
    events[3].record()
    logits.backward(grad_logits)
    del logits, grad_logits, value  # as in train_step: the logits do not outlive the head's backward
    events[4].record()
    if h.requires_grad:  # features straight into the head have no layers below it to train
        h.backward(h_in.grad)
    events[5].record()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    events[6].record()


def bench(config_path: Path, data_dir: Path, batch_size: int, steps: int, warmup: int, n_real: int) -> dict:
    config = load_config(config_path, [f"data.dataset={data_dir}", f"train.batch_size={batch_size}", "train.device=cuda"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    data = prepare_data(config)
    torch.cuda.reset_peak_memory_stats()
    model = model_for(config, data.train.n_features, data.train.n_labels, device)
    optimizer = build_optimizer(model, config)
    connect_head_to_optimizer(model, optimizer, config)
    loss = loss_fn(config.train.loss, consume_logits=True)
    iterator = BatchIterator(data.train.X, data.train.Y, batch_size, shuffle=True, seed=0, points=data.train_rows)
    batches = []
    for batch in iterator:  # batches on the GPU ahead of time: this times the step, not the input pipeline
        batches.append(batch.to(device))
        if len(batches) == min(len(iterator), 64):
            break
    model.train()
    for i in range(warmup):
        train_step(model, batches[i % len(batches)], loss, optimizer, device, "bf16")
    probe = StepMemory(device)
    probe.measure(partial(train_step, model, batches[0], optimizer=optimizer, device=device, precision="bf16"), loss, optimizer)
    torch.cuda.synchronize()

    parts = {name: [] for name in PARTS}
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(PARTS) + 1)]
    for i in range(steps):
        _timed_step(model, batches[i % len(batches)], loss, optimizer, events)
        torch.cuda.synchronize()
        for j, name in enumerate(PARTS):
            parts[name].append(events[j].elapsed_time(events[j + 1]))

    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(steps):
        train_step(model, batches[i % len(batches)], loss, optimizer, device, "bf16")
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - started) * 1000 / steps

    rewire_ms = 0.0
    rewire = config.model.rewire
    if model.sparse_head is not None and rewire is not None:
        rewirer = Rewirer(rewire, total_steps=10 * rewire.interval, seed=config.train.seed)
        torch.cuda.synchronize()
        started = time.perf_counter()
        rewirer.rewire(model.sparse_head, optimizer)
        torch.cuda.synchronize()
        rewire_ms = (time.perf_counter() - started) * 1000 / rewire.interval

    steps_per_epoch = -(-n_real // batch_size)
    memory = model.memory_report()
    state = state_bytes(model, optimizer)
    return {
        "config": config_path.stem,
        "batch_size": batch_size,
        "step_ms": step_ms,
        "steps_per_second": 1000 / step_ms,
        "samples_per_second": 1000 * batch_size / step_ms,
        "epoch_seconds_extrapolated": steps_per_epoch * (step_ms + rewire_ms) / 1000,
        "parts_ms": {name: statistics.median(values) for name, values in parts.items()},
        "rewire_amortised_ms": rewire_ms,
        "peak_memory_bytes": probe.run_peak(),
        "state_bytes": state,
        "step_memory": probe.report,
        "head_bytes": memory["head_params"] + memory["head_indices"],
        "intermediate_bytes": memory["intermediate"],
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "timed_steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", default="amazon-670k")
    parser.add_argument("--configs", nargs="+", default=["dense", "bottleneck-64", "ffi32-32k", "ffi64-65k", "ffi64-100k"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--points", type=int, default=20000, help="training points generated (steps are timed on them)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--data", type=Path, default=None, help="synthetic set folder (generated when missing)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    info = REGISTRY[args.like]
    data_dir = args.data or Path(f"/tmp/bench-train-{args.like}")
    if not (data_dir / "meta.json").exists():
        generate(data_dir, like=args.like, n_train=args.points, n_test=1000, features="dense")
    n_real = round(info.n_train * 0.95)  # the trainer holds 5 % out for validation
    results = []
    for name in args.configs:
        for batch_size in args.batch_sizes:
            result = bench(Path("configs") / args.like / f"{name}.yaml", data_dir, batch_size, args.steps, args.warmup, n_real)
            results.append(result)
            print(json.dumps(result), flush=True)
            torch.cuda.empty_cache()
    short = ("enc fwd", "head fwd", "loss", "head bwd", "enc bwd", "optim")
    header = f"{'config':<15}{'B':>5}{'step ms':>9}{'samples/s':>11}{'epoch s*':>10}{'peak GiB':>10}" + "".join(
        f"{name:>10}" for name in short
    ) + f"{'rewire':>8}"
    print(header)
    for r in results:
        print(
            f"{r['config']:<15}{r['batch_size']:>5}{r['step_ms']:>9.2f}{r['samples_per_second']:>11.0f}"
            f"{r['epoch_seconds_extrapolated']:>10.1f}{r['peak_memory_bytes'] / 2**30:>10.2f}"
            + "".join(f"{r['parts_ms'][p]:>10.3f}" for p in PARTS)
            + f"{r['rewire_amortised_ms']:>8.3f}"
        )
    print(f"* epoch extrapolated to {n_real:,} training points from {args.steps} timed steps")
    print(f"\n{'config':<15}{'B':>5}  MiB: " + "  ".join(MEMORY_COLUMNS))
    for r in results:
        values = {**r["state_bytes"], **r["step_memory"]}
        print(f"{r['config']:<15}{r['batch_size']:>5}       "
              + "  ".join(f"{values.get(key, 0) / 2**20:>{len(key)}.0f}" for key in MEMORY_COLUMNS))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
