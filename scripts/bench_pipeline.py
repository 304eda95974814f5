"""Does the input pipeline keep the GPU busy? The trainer's loop fed by its prefetcher against the
same loop on batches already on the GPU, and the producer alone.

    python scripts/bench_pipeline.py configs/amazon-670k/ffi64-65k.yaml --data /tmp/s1 --batch-size 128

Builds the trainer of CONFIG on ``--data`` (no run directory is written), then times, in ms per
batch: host assembly alone (``BatchIterator``), the prefetcher alone (assembly, pinning and the
copy to the GPU), ``--steps`` training steps fed by the prefetcher and the same number on 64
preloaded batches (the loop as the trainer runs it: step, schedule, running loss, a finiteness
check every 100 steps), and one rewiring round. Prints one JSON line (``--json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from xmlsparse.config import load_config
from xmlsparse.data.batches import Batch, BatchIterator, Prefetcher
from xmlsparse.train.trainer import FINITE_CHECK_INTERVAL, Trainer, train_step


def _ms_per_batch(batches: Iterable[Batch], n: int) -> float:
    started = time.perf_counter()
    for count, _ in enumerate(batches, 1):
        if count == n:
            break
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / n


def _ms_per_step(trainer: Trainer, batches: Iterable[Batch], n: int) -> float:
    running = torch.zeros((), device=trainer.device, dtype=torch.float64)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for count, batch in enumerate(batches, 1):
        running += train_step(trainer.model, batch, trainer.loss, trainer.optimizer, trainer.device, trainer.precision)
        trainer.schedule.after_step()
        if count % FINITE_CHECK_INTERVAL == 0:
            running.item()
        if count == n:
            break
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="data set folder (e.g. from xmlsparse synth)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config = load_config(args.config, [f"data.dataset={args.data}", f"train.batch_size={args.batch_size}",
                                       "train.device=cuda"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), torch.device("cuda"))
    data = trainer.data
    iterator = BatchIterator(data.train.X, data.train.Y, args.batch_size, shuffle=True, seed=0, points=data.train_rows)
    iterator.set_epoch(0)
    result = {
        "host_assembly_ms_per_batch": _ms_per_batch(iterator, args.steps),
        "prefetcher_ms_per_batch": _ms_per_batch(Prefetcher(iterator, trainer.device), args.steps),
    }
    trainer.model.train()
    _ms_per_step(trainer, Prefetcher(iterator, trainer.device), 50)  # kernels compiled and caches built
    result["steps_with_prefetcher_ms"] = _ms_per_step(trainer, Prefetcher(iterator, trainer.device), args.steps)
    preloaded = [batch.to(trainer.device) for batch, _ in zip(iterator, range(64))]
    cycled = (preloaded[i % len(preloaded)] for i in range(args.steps))
    result["steps_on_preloaded_batches_ms"] = _ms_per_step(trainer, cycled, args.steps)
    if trainer.rewirer is not None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.rewirer.rewire(trainer.model.sparse_head, trainer.optimizer)
        torch.cuda.synchronize()
        result["rewire_round_ms"] = (time.perf_counter() - started) * 1000
    print(json.dumps(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
