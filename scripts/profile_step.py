"""Where a config's training step spends its time: `torch.profiler` over the trainer's own steps.

    python scripts/profile_step.py configs/wordnet-hypernyms.yaml --steps 150

Builds the run's `Trainer` (data, model, optimizer, average, rewiring as `xmlsparse train` would),
trains an epoch of `--steps` steps to warm up (kernels compiled, allocator settled), times a
second, then profiles a third and prints the step times and the operations by their own GPU time
(CPU time without a GPU). Nothing is written: the run directory is a temporary one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from xmlsparse.config import load_config
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.setup import resolve_device
from xmlsparse.train.trainer import Trainer


def timed_epoch(trainer: Trainer, steps: int) -> float:
    """Milliseconds a step over one more epoch of ``steps`` steps."""
    trainer.epoch += 1
    trainer.batch_in_epoch = 0
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    started = time.perf_counter()
    trainer._train_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return 1e3 * (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=150, help="steps an epoch (default 150)")
    parser.add_argument("--rows", type=int, default=30, help="operations listed (default 30)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.steps < 1:
        raise XMLSparseError(f"--steps {args.steps}: expected a positive number")

    config = load_config(args.config, [*args.overrides, f"train.max_steps_per_epoch={args.steps}"])
    device = resolve_device(config.train.device)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), device)
        trainer._train_epoch()
        print(f"step {timed_epoch(trainer, args.steps):.2f} ms", flush=True)
        on_gpu = device.type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
        with profile(activities=activities) as profiler:
            profiled = timed_epoch(trainer, args.steps)
    print(f"step {profiled:.2f} ms under the profiler, {args.steps} steps")
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    try:
        main()
    except XMLSparseError as error:
        sys.exit(f"error: {error}")
