"""The training loop: batches -> model -> loss -> backward -> optimizer -> rewiring, with a run directory.

A run directory holds the resolved config (its data named by absolute paths), what prediction needs
besides the model (``preprocessing.json`` and the files it names, see ``save_run_inputs``), so that
the directory predicts wherever it is moved, ``metrics.jsonl`` (one line per epoch), checkpoints written
atomically (``checkpoints/last.pt``, the full state, as often as ``train.checkpoint`` says, at the end
and on SIGINT; ``checkpoints/best.pt``, the model alone, whenever validation improves) and, at the end,
``final.json`` with the test metrics of the best checkpoint, overall (``test``) and by training
label-frequency bucket (``test_by_frequency``, see ``xmlsparse.metrics``). ``resume`` continues
from ``last.pt``; with a fixed seed on CPU a resumed run ends exactly where an uninterrupted one does, because the batch order
is a function of (seed, epoch) and every generator's state is in the checkpoint. The epochs trained
after that ``last.pt`` was written are trained again: their ``metrics.jsonl`` lines are replaced, and
best.pt is rewritten when they improve on the best score ``last.pt`` records.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from xmlsparse.atomic import atomic_write, remove_partial_writes, write_json
from xmlsparse.config import Config, config_to_dict, load_config, save_config
from xmlsparse.data.batches import Batch, BatchIterator, Prefetcher
from xmlsparse.data.storage import format_bytes
from xmlsparse.errors import XMLSparseError
from xmlsparse.evaluate import autocast_for, evaluate, evaluate_by_frequency
from xmlsparse.metrics import label_frequencies
from xmlsparse.nn.model import XMCModel
from xmlsparse.parallel.checkpoints import load_rank_shard, manifest_path, save_sharded
from xmlsparse.parallel.evaluation import evaluate_sharded
from xmlsparse.parallel.sharded import ShardedBatches, ShardedModel, check_shardable, sharded_model_for
from xmlsparse.parallel.world import SINGLE, World, init_world, label_ranges, rank_seed
from xmlsparse.train.averaging import WeightAverage
from xmlsparse.train.checkpoint import BEST, LAST, CheckpointWriter, load_checkpoint, rng_state, set_rng_state
from xmlsparse.train.compact_adam import AdamGradSink, CompactAdam
from xmlsparse.train.losses import LossFn, loss_fn
from xmlsparse.train.memory import RunMemory, estimated_step_peak
from xmlsparse.train.rewiring import Rewirer
from xmlsparse.train.schedules import Schedule
from xmlsparse.train.setup import (
    RUN_INPUTS_FILE,
    Preprocessing,
    load_run_inputs,
    model_for,
    precision_on,
    prepare_data,
    resolve_device,
    save_run_inputs,
    with_absolute_data_paths,
)

# Steps between checks of the running loss for NaN: each check waits for the device.
FINITE_CHECK_INTERVAL = 100


class TrainingDiverged(XMLSparseError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunFinished(XMLSparseError):
    """A resume of a run that has ended (its final.json written): there is nothing to train."""


def _fresh_epoch_stats() -> dict[str, float]:
    """The running totals of an epoch: they go into last.pt so that an epoch resumed mid-way adds up.
    ``seconds`` is the time in training steps; ``wall_seconds`` the epoch's time before validation."""
    return {"loss_sum": 0.0, "batches": 0, "rewired": 0.0, "seconds": 0.0, "wall_seconds": 0.0, "samples": 0}


def build_optimizer(model: XMCModel, config: Config) -> torch.optim.Optimizer:
    """Adam or AdamW over the model's parts with their learning rates: torch's (fp32 moments) or
    ``CompactAdam`` (bf16 moments); ``connect_head_to_optimizer`` gives the head's backward the latter's step."""
    opt = config.train.optimizer
    lrs = {
        "encoder": opt.lr_encoder if opt.lr_encoder is not None else opt.lr,
        "intermediate": opt.lr_intermediate if opt.lr_intermediate is not None else opt.lr,
        "head": opt.lr_head if opt.lr_head is not None else opt.lr,
    }
    groups = model.param_groups(lrs)
    if opt.moments == "bfloat16":
        return CompactAdam(groups, lr=opt.lr, weight_decay=opt.weight_decay, decoupled=opt.type == "adamw",
                           seed=config.train.seed)
    cls = torch.optim.AdamW if opt.type == "adamw" else torch.optim.Adam
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    # On CUDA the fused kernel updates each tensor in one pass, without the parameter-sized
    # temporaries of the foreach path (measured in docs/benchmarks.md); on CPU foreach is the same
    # arithmetic as the plain loop.
    if on_cuda:
        return cls(groups, lr=opt.lr, weight_decay=opt.weight_decay, fused=True)
    return cls(groups, lr=opt.lr, weight_decay=opt.weight_decay, foreach=True)


def connect_head_to_optimizer(model: XMCModel, optimizer: torch.optim.Optimizer, config: Config) -> None:
    """With ``train.optimizer.head_update_in_backward`` and bf16 moments, give the fixed fan-in head
    the optimizer's gradient sink: the head's Adam step then runs inside its backward, range by
    range, and its ``[L, K]`` gradient never exists. Other heads and optimizers keep plain gradients."""
    head = model.sparse_head
    if head is not None:
        wanted = config.train.optimizer.head_update_in_backward and isinstance(optimizer, CompactAdam)
        head.grad_weight_sink = AdamGradSink(optimizer, head.weight) if wanted else None


def _share_of_mean(loss: LossFn, share: float) -> LossFn:
    """``loss`` (a mean over the B x L' pairs of a rank's L' labels) scaled to the rank's part of
    the mean over all B x L pairs: the ranks' parts add up to the one-process loss."""

    def scaled(logits: torch.Tensor, y_indices: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
        return loss(logits, y_indices, y_ptr) * share

    return scaled


def train_step(
    model: XMCModel,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """One optimizer step on ``batch`` (forward, loss, backward, optimizer); returns the detached
    loss. ``RunMemory.around_step`` measures it from outside, through ``loss_fn`` and ``optimizer``."""
    with autocast_for(device, precision):
        logits = model(batch)
    loss = loss_fn(logits, batch.y_indices, batch.y_ptr)
    del logits  # the loss keeps what its backward needs; B x L logits need not outlive it
    loss.backward()
    optimizer.step()
    # Freed now, not before the next backward: gradients kept between steps (the intermediate
    # layer's is as large as its weight) would sit under the next forward's peak.
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class Trainer:
    """Owns the model, optimizer, schedule and rewiring of one run directory."""

    def __init__(self, config: Config, run_dir: Path, device: torch.device,
                 preprocess: Preprocessing | None = None, world: World = SINGLE) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device
        self.world = world
        self.precision = precision_on(device, config.train.precision)
        torch.manual_seed(config.train.seed)
        np.random.seed(config.train.seed)
        # A resumed run reads its data through the preprocessing it stored (its idf and label order).
        self.data = prepare_data(config, preprocess)
        train = self.data.train
        # Several processes: each rank's labels (the whole head in a world of one).
        self.label_ranges = [(0, train.n_labels)]
        if world.distributed:
            check_shardable(config)
            self.label_ranges = label_ranges(train.n_labels, config.model.head.group_size, world.size)
        self.label_range = self.label_ranges[world.rank]
        self.model = (sharded_model_for(config, train.n_features, train.n_labels, self.label_range, device)
                      if world.distributed else model_for(config, train.n_features, train.n_labels, device))
        # The replicated layers start alike on every rank (same seed above); dropout draws its own.
        torch.manual_seed(rank_seed(config.train.seed, world.rank))
        self.optimizer = build_optimizer(self.model, config)
        connect_head_to_optimizer(self.model, self.optimizer, config)
        # What the step and evaluation call: the model, or its label-sharded wrapper over the ranks.
        self.step_model: XMCModel | ShardedModel = self.model
        if world.distributed:
            self.step_model = ShardedModel(self.model, world, self.label_range, device)
        batch_size = config.train.batch_size
        steps_per_epoch = math.ceil(len(self.data.train_rows) / batch_size)
        if config.train.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * config.train.epochs
        self.schedule = Schedule(self.optimizer, config.train.schedule, self.total_steps)
        self.rewirer = self._build_rewirer()
        average = config.train.average
        self.average = WeightAverage(self.model, average.decay) if average is not None else None
        # The step drops the logits after the loss, so the loss may write their gradient over them.
        self.loss = loss_fn(config.train.loss, consume_logits=True)
        if world.distributed:  # this rank's pairs of the mean over B x L
            self.loss = _share_of_mean(self.loss, (self.label_range[1] - self.label_range[0]) / train.n_labels)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_score = -math.inf
        self.epochs_without_improvement = 0
        self.epoch_stats = _fresh_epoch_stats()
        self._stop_requested = False
        self.checkpoints = CheckpointWriter(config.train.checkpoint.background)
        # When and at which epoch last.pt was last handed to the writer (train.checkpoint's intervals).
        self._full_save_time = time.monotonic()
        self._full_save_epoch = 0
        # The metrics.jsonl line of the last validated epoch, handed to fit's epoch callback.
        self.last_record: dict[str, Any] | None = None
        self.memory = RunMemory(device, self.model, self.optimizer)

    def _build_rewirer(self) -> Rewirer | None:
        rewire = self.config.model.rewire
        if rewire is None or self.config.model.head.type != "fixed-fanin":
            return None
        return Rewirer(rewire, total_steps=self.total_steps, seed=rank_seed(self.config.train.seed, self.world.rank),
                       world=self.world)

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rewirer": self.rewirer.state_dict() if self.rewirer is not None else None,
            "average": self.average.state_dict() if self.average is not None else None,
            "rng": rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best_score": self.best_score,
            "epochs_without_improvement": self.epochs_without_improvement,
            "epoch_stats": dict(self.epoch_stats),
            "config": config_to_dict(self.config),
        }

    def restore(self, path: Path) -> None:
        # Read to host memory, then copied into the live tensors: loaded straight to the device the
        # checkpoint would sit beside the model and optimizer state it is copied into.
        state = self._load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.rewirer is not None and state["rewirer"] is not None:
            self.rewirer.load_state_dict(state["rewirer"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        set_rng_state(state["rng"])
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.step = state["step"]
        self.best_score = state["best_score"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        # A last.pt written before the epoch's wall time was counted lacks that total.
        self.epoch_stats = {**_fresh_epoch_stats(), **state["epoch_stats"]}
        self._full_save_epoch = self.epoch

    def _load(self, path: Path, mmap: bool = False) -> dict[str, Any]:
        """This process's checkpoint at ``path`` (one process: the file; several: its shard under
        the manifest that stands for the file)."""
        manifest = manifest_path(path)
        if self.world.distributed:
            if not manifest.exists() and path.exists():
                raise XMLSparseError(f"{path} was written by one process; resume it without torchrun")
            return load_rank_shard(manifest, self.world, mmap=mmap)
        if not path.exists() and manifest.exists():
            load_rank_shard(manifest, self.world)  # raises: written by several processes
        return load_checkpoint(path, mmap=mmap)

    def _save_checkpoints(self, last: bool, best: bool) -> None:
        """Hand last.pt (the full state) and best.pt (the model, the epoch and its score) to the writer.

        best.pt goes first: a kill between the two then leaves a best.pt newer than last.pt, never a
        last.pt whose best score is missing from best.pt. The replay after a resume from that last.pt
        rewrites best.pt when it improves on last.pt's best score (on CPU, identically at once).
        """
        files: dict[Path, dict[str, Any]] = {}
        if best:
            model = self.model.state_dict() if self.average is None else self.average.model_state(self.model)
            files[self.checkpoint_dir / BEST] = {"model": model, "epoch": self.epoch, "best_score": self.best_score}
        if last:
            files[self.checkpoint_dir / LAST] = self.state()
            self._full_save_time = time.monotonic()
            self._full_save_epoch = self.epoch
        if files and self.world.distributed:
            save_sharded(self.checkpoints, self.world, files, self.step)
        elif files:
            self.checkpoints.save(files)

    # -- the loop ----------------------------------------------------------------------------

    def _averaged(self) -> Any:
        """A block in which the model holds the parameter average (``train.average``), if there is one."""
        return self.average.applied() if self.average is not None else nullcontext()

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def _log(self, message: str) -> None:
        if self.world.is_main:
            print(message, file=sys.stderr, flush=True)

    def _agree(self, running: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The loss summed so far over the ranks, and whether any rank was asked to stop (SIGINT),
        so that all ranks leave an epoch at the same batch. Collective when distributed."""
        if not self.world.distributed:
            return running, self._stop_requested
        shared = torch.stack([running, torch.tensor(float(self._stop_requested), device=running.device,
                                                    dtype=running.dtype)])
        dist.all_reduce(shared)
        return shared[0], bool(shared[1] > 0)

    def summary(self) -> str:
        """What the run is about to train, logged before its first epoch: the data, the model's
        parameters by part and its head's memory, the device with an estimate of a step's peak
        memory (``estimated_step_peak``), and the run directory."""
        config, data, train = self.config, self.data, self.data.train
        params = {name: sum(p.numel() for p in part.parameters()) for name, part in self.model.parts().items()}
        held = self.model.memory_report()
        peak = estimated_step_peak(
            self.model, config.train.optimizer.moments, config.train.batch_size, train.n_labels, self.precision,
            averaged=self.average is not None,
        )
        device = str(self.device)
        if self.device.type == "cuda":
            properties = torch.cuda.get_device_properties(self.device)
            device += f" ({properties.name}, {format_bytes(properties.total_memory)})"
        index = f", index {format_bytes(held['head_indices'])}" if held["head_indices"] else ""
        resumed = f", resumed in epoch {self.epoch + 1} at step {self.step:,}" if self.step else ""
        return "\n".join([
            f"data:   {data.name}: {len(data.train_rows):,} train / {len(data.val_rows):,} validation / "
            f"{data.test.n_points:,} test points, {train.n_features:,} {config.data.features} features, "
            f"{train.n_labels:,} labels, {train.Y.nnz / max(1, train.n_points):.2f} labels a point",
            f"model:  {sum(params.values()):,} parameters ("
            + ", ".join(f"{name} {count:,}" for name, count in params.items())
            + f"); head {format_bytes(held['head_params'] + held['head_indices'])} "
            f"(weights and bias {format_bytes(held['head_params'])}{index})",
            f"device: {device}, {self.precision}; estimated peak memory {format_bytes(peak['total'])} "
            f"(model {format_bytes(peak['model'])}, gradients {format_bytes(peak['gradients'])}, "
            f"optimizer state {format_bytes(peak['optimizer_state'])}, "
            f"one batch's logits {format_bytes(peak['logits'])}"
            + (f", parameter average {format_bytes(peak['parameter_average'])}" if self.average is not None else "")
            + ")",
            f"run:    {self.run_dir.absolute()}{resumed}",
            *([f"world:  {self.world.size} processes ({dist.get_backend()}), labels by rank: "
               + ", ".join(f"{rank}: [{lo:,}, {hi:,})" for rank, (lo, hi) in enumerate(self.label_ranges))]
              if self.world.distributed else []),
        ])

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when interrupted by SIGINT."""
        entered = time.perf_counter()
        config = self.config.train
        iterator = BatchIterator(
            self.data.train.X, self.data.train.Y, config.batch_size, shuffle=True, seed=config.seed,
            points=self.data.train_rows,
        )
        iterator.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        n_batches = min(len(iterator), self.steps_per_epoch)
        source = ShardedBatches(iterator, self.world, self.label_range) if self.world.distributed else iterator
        batches = Prefetcher(source, self.device)
        running = torch.zeros((), device=self.device, dtype=torch.float64)
        bar = tqdm(
            total=n_batches, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}",
            disable=not sys.stderr.isatty(), leave=False, unit="batch",
        )
        started = time.perf_counter()
        samples = 0
        done_here = 0
        self.model.train()
        for batch in batches:
            if self.batch_in_epoch >= n_batches:
                break
            run = partial(
                train_step, self.step_model, batch, optimizer=self.optimizer, device=self.device,
                precision=self.precision,
            )
            loss = self.memory.around_step(self.step, run, self.loss)
            self.schedule.after_step()
            self.step += 1
            self.batch_in_epoch += 1
            samples += batch.size
            done_here += 1
            running += loss
            if self.average is not None:
                self.average.update()
            if self.rewirer is not None:
                fraction = self.rewirer.maybe_rewire(self.model.sparse_head, self.optimizer, self.step, self.average)
                if fraction is not None:
                    self.epoch_stats["rewired"] += fraction
            stop = self._stop_requested and not self.world.distributed
            if self.batch_in_epoch % FINITE_CHECK_INTERVAL == 0 or self.batch_in_epoch == n_batches:
                total, stop = self._agree(running)
                self._check_finite(total)
                bar.set_postfix(loss=f"{total.item() / done_here:.4g}")
            bar.update(1)
            if stop:
                break
        bar.close()
        total, _ = self._agree(running)
        self._check_finite(total)
        self.epoch_stats["loss_sum"] += float(total.item())
        self.epoch_stats["batches"] = self.batch_in_epoch
        self.epoch_stats["seconds"] += time.perf_counter() - started
        self.epoch_stats["wall_seconds"] += time.perf_counter() - entered
        self.epoch_stats["samples"] += samples
        return self.batch_in_epoch >= n_batches

    def _check_finite(self, running: torch.Tensor) -> None:
        if torch.isfinite(running):
            return
        # Non-finite inputs are refused when the data loads, so what is left is the optimisation.
        self.checkpoints.wait()
        last = self.checkpoint_dir / LAST
        kept = (
            f"the last full checkpoint, {last}, is kept; continue from it with --resume {self.run_dir}"
            if last.exists() else f"no full checkpoint was written yet ({last} does not exist)"
        )
        raise TrainingDiverged(
            f"the training loss became {running.item()} at epoch {self.epoch + 1}, step {self.step}; {kept} "
            "(try a lower learning rate, train.optimizer.lr)"
        )

    def _end_epoch(self) -> bool:
        """Validate, checkpoint, log; True when early stopping ends the run."""
        config = self.config
        validation_started = time.perf_counter()
        with self._averaged():
            if self.world.distributed:
                val, _ = evaluate_sharded(
                    self.step_model, self.data.train, config.eval.k, config.train.eval_batch_size, self.device,
                    self.precision, self.data.inv_propensity, points=self.data.val_rows,
                    implications=self.data.preprocess.implications,
                )
            else:
                val = evaluate(
                    self.model, self.data.train, config.eval.k, config.train.eval_batch_size, self.device,
                    self.precision, self.data.inv_propensity, points=self.data.val_rows,
                    implications=self.data.preprocess.implications,
                )
        validation_seconds = time.perf_counter() - validation_started
        stats = self.epoch_stats
        seconds = max(stats["seconds"], 1e-9)
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": stats["loss_sum"] / max(1, stats["batches"]),
            **{f"val_{key}": value for key, value in val.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "rewired_fraction": stats["rewired"],
            "epoch_seconds": seconds,
            "samples_per_second": stats["samples"] / seconds,
            "peak_memory_bytes": self.memory.peak_bytes(),
        }
        metric_name = config.train.early_stopping.metric
        score = val[metric_name]
        self.schedule.after_epoch(val)
        improved = score > self.best_score
        if improved:
            self.best_score = score
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_stats = _fresh_epoch_stats()
        patience = config.train.early_stopping.patience
        stopping = patience > 0 and self.epochs_without_improvement >= patience
        every = config.train.checkpoint
        last_due = (
            self.epoch % every.every_epochs == 0
            or (every.every_minutes is not None and time.monotonic() - self._full_save_time >= 60 * every.every_minutes)
            or stopping
            or self.epoch >= config.train.epochs
        )
        checkpoint_started = time.perf_counter()
        self._save_checkpoints(last=last_due, best=improved)
        ended = time.perf_counter()
        # The metrics line follows the checkpoints so that it can say what they cost; a kill in
        # between loses nothing, since the resume trains the epochs after last.pt again.
        record.update(
            step_seconds=stats["seconds"],
            validation_seconds=validation_seconds,
            checkpoint_seconds=ended - checkpoint_started,  # host copy and waiting for the previous write
            epoch_wall_seconds=stats["wall_seconds"] + ended - validation_started,
        )
        if self.world.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.last_record = record
        self._log(
            f"epoch {record['epoch']}: loss {record['loss']:.5f}  "
            + "  ".join(f"{k} {100 * v:.2f}" for k, v in val.items() if k.startswith(("P@", "nDCG@5", "PSP@5")))
            + f"  lr {record['lr']:.2e}  {record['epoch_seconds']:.1f}s steps, "
            + f"{record['epoch_wall_seconds']:.1f}s in all  {record['samples_per_second']:.0f} samples/s"
        )
        return stopping

    def fit(
        self, on_epoch: Callable[[dict[str, Any]], bool] | None = None, test: bool = True,
    ) -> dict[str, Any] | None:
        """Train to the end (or early stop) and write ``final.json``; None when interrupted.

        ``on_epoch`` receives each validated epoch's ``metrics.jsonl`` record and ends the run
        (as early stopping does) by returning True. ``test=False`` skips the test evaluation.
        """
        self._log(self.summary())
        previous = signal.signal(signal.SIGINT, self._request_stop)
        try:
            while self.epoch < self.config.train.epochs:
                completed = self._train_epoch()
                if not completed:
                    self._save_checkpoints(last=True, best=False)
                    self.checkpoints.wait()
                    self._log(f"interrupted: saved {self.checkpoint_dir / LAST}; continue with --resume {self.run_dir}")
                    return None
                early_stop = self._end_epoch()
                # Called on the early-stopping epoch too, so that the callback sees every record.
                if on_epoch is not None and on_epoch(self.last_record):
                    self._log(f"stopped after epoch {self.epoch}: the epoch callback asked to stop")
                    break
                if early_stop:
                    self._log(f"early stopping after epoch {self.epoch}: no better validation "
                              f"{self.config.train.early_stopping.metric} in "
                              f"{self.config.train.early_stopping.patience} epochs")
                    break
            else:
                if self.epochs_without_improvement == 0:  # the epoch limit, not validation, ended the run
                    self._log(f"validation {self.config.train.early_stopping.metric} still improved in the last "
                              f"epoch ({self.epoch}): more epochs may help; continue with --resume {self.run_dir} "
                              "--set train.epochs=N")
            if self._full_save_epoch != self.epoch:  # the epoch callback stopped between full checkpoints
                self._save_checkpoints(last=True, best=False)
        finally:
            signal.signal(signal.SIGINT, previous)
            # Also when the loop raised: the write in flight then completes the last good checkpoint.
            self.checkpoints.wait()
        return self.finish(test=test)

    def finish(self, test: bool = True) -> dict[str, Any]:
        """Write ``final.json`` with the best validation score and, with ``test``, the best
        checkpoint's metrics on the test split (model selection, as in tuning, leaves them out)."""
        config = self.config
        self.checkpoints.wait()
        best = self.checkpoint_dir / BEST
        # Mapped, not read: without the test evaluation only its score is needed. Its score, not
        # this trajectory's best, is reported, since after a resume on a GPU best.pt may hold a model
        # of the epochs trained again whose replay did not reach the same score.
        best_saved = self._load(best, mmap=True) if best.exists() or manifest_path(best).exists() else None
        best_score = self.best_score if best_saved is None else best_saved["best_score"]
        test_entry: dict[str, Any] = {}  # final.json's "test" and "test_by_frequency", when evaluated
        if test:
            which = "the last model" if best_saved is None else f"the best checkpoint (epoch {best_saved['epoch']})"
            self._log(f"test evaluation: {which} on {self.data.test.n_points:,} test points")
            # best.pt holds the weights that were validated (the average, with train.average).
            if best_saved is not None:
                self.model.load_state_dict(best_saved["model"])  # via host memory, as in restore
            # Buckets by the label counts of the whole training file, as the propensities are.
            score = evaluate_sharded if self.world.distributed else evaluate_by_frequency
            with self._averaged() if best_saved is None else nullcontext():
                test_entry["test"], test_entry["test_by_frequency"] = score(
                    self.step_model, self.data.test, config.eval.k, config.train.eval_batch_size, self.device,
                    self.precision, self.data.inv_propensity, label_freq=label_frequencies(self.data.train.Y),
                    implications=self.data.preprocess.implications,
                )
        final = {
            "dataset": self.data.name,
            "epochs": self.epoch,
            "steps": self.step,
            "best_validation": {config.train.early_stopping.metric: best_score},
            "best_epoch": None if best_saved is None else best_saved["epoch"],
            **test_entry,
            "memory": self.memory.report(),
            "peak_memory_bytes": self.memory.peak_bytes(),
            "device": str(self.device),
        }
        if self.world.distributed:
            final.update(world_size=self.world.size, ranks=self._rank_reports())
        if self.world.is_main:
            write_json(self.run_dir / "final.json", final)
        return final

    def _rank_reports(self) -> list[dict[str, Any]]:
        """Each rank's label range, peak memory and last epoch's samples/s. Collective."""
        record = self.last_record or {}
        mine = {"rank": self.world.rank, "labels": list(self.label_range), "peak_memory_bytes": self.memory.peak_bytes(),
                "samples_per_second": record.get("samples_per_second")}
        reports: list[Any] = [None] * self.world.size
        dist.all_gather_object(reports, mine)
        return reports


def start_run(config: Config, run_dir: Path, overwrite: bool = False, world: World = SINGLE) -> Trainer:
    """Create a new run directory and a trainer for it. A directory that holds a run already is
    refused, or with ``overwrite`` replaced, once the trainer is built (so a config that the data or
    the device rejects leaves the old run as it was).

    The saved config names the data by absolute paths, and the directory keeps the fitted
    preprocessing and the data set's shape (``save_run_inputs``), so that the run can be
    evaluated from any working directory and can predict once moved elsewhere. With several
    processes (``world``) each builds its trainer and rank 0 alone writes the directory."""
    holds_run = (run_dir / "checkpoints").exists()
    if holds_run and not overwrite:
        raise XMLSparseError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, replace it with --overwrite, "
            "or pick another --out"
        )
    config = with_absolute_data_paths(config)
    # The trainer (device, data, model, schedule) comes first and writes nothing into the run
    # directory: a config that the data or the device rejects then leaves no directory behind.
    # Building the trainers is collective (DDP's first broadcast): every rank has checked the
    # directory above before rank 0 changes it.
    trainer = Trainer(config, run_dir, init_world(world, resolve_device(config.train.device)), world=world)
    if world.is_main:
        if holds_run:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        save_run_inputs(run_dir, config, trainer.data)
    if world.distributed:
        dist.barrier()
    return trainer


def resume_run(run_dir: Path, device: str | None = None, epochs: int | None = None, world: World = SINGLE) -> Trainer:
    """Rebuild the trainer of ``run_dir`` from its saved config and its last checkpoint; ``device``
    runs it elsewhere this time (the saved config keeps its own).

    ``epochs``, more than the run's ``train.epochs``, lengthens the run: it is written to the run's
    config.yaml, and a final.json of the shorter run is removed, as that run is no longer finished.
    What is planned over the run's steps (a cosine schedule, rewiring's ``stop``) stretches to the
    new length from here on, and early stopping still applies: a run that it ended goes on only
    while validation improves. Without ``epochs``, a run whose final.json exists raises ``RunFinished``.
    """
    last = run_dir / "checkpoints" / LAST
    if not last.exists() and not manifest_path(last).exists():
        raise XMLSparseError(f"{run_dir}: no checkpoint to resume from ({last} and {manifest_path(last).name} are missing)")
    config_path = run_dir / "config.yaml"
    config = load_config(config_path)
    planned = config.train.epochs
    final = run_dir / "final.json"
    if epochs is not None and epochs <= planned:
        raise XMLSparseError(
            f"train.epochs={epochs}: {config_path} plans {planned} epochs already; a resume may only add "
            f"epochs (train.epochs greater than {planned})"
        )
    if epochs is None and final.exists():
        raise RunFinished(
            f"{run_dir} is finished: {final} holds its results, nothing was changed "
            f"(to train it longer: --resume {run_dir} --set train.epochs=N with N greater than {planned})"
        )
    if epochs is not None:
        config = replace(config, train=replace(config.train, epochs=epochs))
    run_config = config if device is None else replace(config, train=replace(config.train, device=device))
    stored = load_run_inputs(run_dir).preprocess if (run_dir / RUN_INPUTS_FILE).is_file() else None
    device_used = init_world(world, resolve_device(run_config.train.device))
    trainer = Trainer(run_config, run_dir, device_used, stored, world=world)
    trainer.restore(last)
    if world.is_main:
        if epochs is not None:
            # final.json goes first: a kill in between then leaves the shorter run unfinished, which
            # a later resume ends as it would have, never a longer config beside the shorter run's results.
            final.unlink(missing_ok=True)
            save_config(config, config_path)
        for name in (LAST, BEST):
            remove_partial_writes(trainer.checkpoint_dir / name)
        _keep_metrics_through(run_dir / "metrics.jsonl", trainer.epoch)
    if world.distributed:
        dist.barrier()
    return trainer


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a ``metrics.jsonl`` (none when it does not exist), leaving out a line
    that a kill cut short."""
    return _parse_metrics(path.read_text().splitlines()) if path.exists() else []


def _parse_metrics(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _keep_metrics_through(path: Path, epoch: int) -> None:
    """Drop the ``metrics.jsonl`` lines after ``epoch`` (the resume trains those epochs again and
    logs them anew) and a line that a kill cut short."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines()
    kept = [record for record in _parse_metrics(lines) if record["epoch"] <= epoch]
    if len(kept) != len(lines) or not text.endswith("\n"):
        with atomic_write(path, "w") as handle:
            # as _end_epoch writes them
            handle.writelines(json.dumps(record) + "\n" for record in kept)
