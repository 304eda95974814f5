"""Run directories read back: the config, the stored inputs and the best model of a run, its
metrics on a split (``xmlsparse eval RUN_DIR``) and its predictions for new inputs
(``xmlsparse predict``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import scipy.sparse as sp
import torch

from xmlsparse.config import Config, load_config
from xmlsparse.data.formats import load_split, read_npy_features
from xmlsparse.data.predictions import write_predictions
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.evaluate import check_buckets, evaluate, evaluate_by_frequency, predict_topk
from xmlsparse.metrics import DEFAULT_BUCKETS, BucketRow, label_frequencies
from xmlsparse.nn.ensemble import LogitEnsemble
from xmlsparse.nn.model import XMCModel
from xmlsparse.outputs import check_output_file
from xmlsparse.parallel.checkpoints import manifest_path, merged_model_state
from xmlsparse.train.checkpoint import BEST, LAST, load_checkpoint
from xmlsparse.train.setup import (
    RUN_INPUTS_FILE,
    PreparedData,
    RunInputs,
    load_run_inputs,
    model_for,
    precision_on,
    prepare_data,
    resolve_device,
    save_run_inputs,
)


def check_run_dir(run_dir: Path) -> Path:
    """The config file of a run directory; ``XMLSparseError`` when ``run_dir`` has none."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise XMLSparseError(f"{run_dir}: not a run directory ({config_path.name} is missing)")
    return config_path


def _run_checkpoint(run_dir: Path) -> Path:
    """The best (else last) checkpoint of a run directory."""
    candidates = [run_dir / "checkpoints" / name for name in (BEST, LAST)]
    # A run trained by several processes has manifests of per-rank shards instead.
    candidates = [path for checkpoint in candidates for path in (checkpoint, manifest_path(checkpoint))]
    checkpoint = next((p for p in candidates if p.exists()), None)
    if checkpoint is None:
        raise XMLSparseError(f"{run_dir}: no checkpoint yet (checkpoints/{BEST} and {LAST} are missing)")
    return checkpoint


# The member run directories of an ensemble directory (``xmlsparse ensemble``), which has no
# checkpoints of its own.
ENSEMBLE_FILE = "ensemble.json"

RunModel = Union[XMCModel, LogitEnsemble]


def ensemble_members(run_dir: Path) -> list[Path] | None:
    """The member run directories of an ensemble directory; None for a run of one model."""
    path = run_dir / ENSEMBLE_FILE
    if not path.is_file():
        return None
    try:
        members = json.loads(path.read_text())["members"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise XMLSparseError(f"{path}: unreadable ({error}); expected {{\"members\": [run directories]}}") from None
    return [Path(member) for member in members]


def model_checkpoints(run_dir: Path) -> list[tuple[Config, Path]]:
    """The config and best (else last) checkpoint of each model a run directory scores with: the run's
    own, or those of an ensemble's members."""
    members = ensemble_members(run_dir)
    if members is None:
        return [(load_config(check_run_dir(run_dir)), _run_checkpoint(run_dir))]
    found = []
    for member in members:
        try:
            found.append((load_config(check_run_dir(member)), _run_checkpoint(member)))
        except XMLSparseError as error:
            raise XMLSparseError(f"{run_dir}: member {error}") from None
    return found


def _load_models(
    checkpoints: list[tuple[Config, Path]], n_features: int, n_labels: int, device: torch.device
) -> RunModel:
    """The model of each config with the weights of its checkpoint; several make a ``LogitEnsemble``."""
    models = []
    for config, checkpoint in checkpoints:
        model = model_for(config, n_features, n_labels, device)
        # Mapped to host memory and copied into the model: of a last.pt only the model is read, not
        # the optimizer moments beside it.
        sharded = checkpoint.suffix == manifest_path(checkpoint).suffix
        model.load_state_dict(merged_model_state(checkpoint) if sharded else _scored_weights(checkpoint))
        models.append(model)
    return models[0] if len(models) == 1 else LogitEnsemble(models).eval()


def _scored_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model state of a one-process checkpoint that validation and test score: a last.pt of a
    run with ``train.average`` holds the trained weights and, beside them, the average scored."""
    state = load_checkpoint(checkpoint, mmap=True)
    average = state.get("average")
    return {**state["model"], **average["averages"]} if average else state["model"]


def load_run_model(
    run_dir: Path, device: torch.device | None = None,
) -> tuple[Config, RunInputs, RunModel, torch.device]:
    """The config, stored inputs (``RunInputs``) and best (else last) model of a run directory (of an
    ensemble directory: its members' models), read from the run directory alone: what prediction
    needs, wherever the directory has moved."""
    config = load_config(check_run_dir(run_dir))
    device = device if device is not None else resolve_device(config.train.device)
    checkpoints = model_checkpoints(run_dir)
    stored = load_run_inputs(run_dir)
    return config, stored, _load_models(checkpoints, stored.n_features, stored.n_labels, device), device


def load_run(run_dir: Path, device: torch.device | None = None) -> tuple[Config, PreparedData, RunModel, torch.device]:
    """The config, prepared data and best (else last) model of a run directory (of an ensemble
    directory: its members' models). The data is read from where the saved config says and
    preprocessed as the run stored it; a run directory from before the preprocessing was stored
    gets it fitted from its training data and stored."""
    config = load_config(check_run_dir(run_dir))
    device = device if device is not None else resolve_device(config.train.device)
    checkpoints = model_checkpoints(run_dir)  # before the data: a run without a model fails at once
    config, data = load_run_data(run_dir)
    return config, data, _load_models(checkpoints, data.train.n_features, data.train.n_labels, device), device


def load_run_data(run_dir: Path) -> tuple[Config, PreparedData]:
    """The config and prepared data of a run directory (see ``load_run``), without its model."""
    config_path = check_run_dir(run_dir)
    config = load_config(config_path)
    stored = load_run_inputs(run_dir) if (run_dir / RUN_INPUTS_FILE).is_file() else None
    try:
        data = prepare_data(config, None if stored is None else stored.preprocess)
    except XMLSparseError as error:
        raise XMLSparseError(
            f"{run_dir}: cannot read the data of this run ({error}); if the data has moved, point data.dataset "
            f"(and data.root) in {config_path} at its new place"
        ) from None
    if stored is None:
        # Kept for predict; a run directory that cannot be written is still evaluated.
        with contextlib.suppress(OSError):
            save_run_inputs(run_dir, config, data)
    return config, data


def evaluate_run_dir(
    run_dir: Path, split: str, ks: list[int], save_predictions: bool = False, buckets: int = DEFAULT_BUCKETS
) -> tuple[dict[str, float], list[BucketRow] | None]:
    """Metrics of a run's best model on its test split or its validation split, and with ``buckets``
    > 0 the table by label-frequency bucket (else None); see ``score_split``."""
    check_buckets(buckets)
    if save_predictions:
        check_run_dir(run_dir)  # before the output check, whose folder this is
        check_output_file(saved_predictions_path(run_dir, split))
    config, data, model, device = load_run(run_dir)
    metrics, table = score_split(config, data, model, device, split, ks, buckets)
    if save_predictions:
        subset = split_data(data, split)
        precision = precision_on(device, config.train.precision)
        ids, scores = predict_topk(model, subset, max(ks), config.train.eval_batch_size, device, precision,
                                   data.preprocess.implications)
        ids = data.preprocess.original_labels(ids)
        write_predictions(saved_predictions_path(run_dir, split), ids, scores, n_labels=subset.n_labels)
    return metrics, table


def _split_rows(data: PreparedData, split: str) -> tuple[XMCData, np.ndarray | None]:
    """The data of ``split`` (test or val) and the rows of it that the split takes (None: all)."""
    return (data.test, None) if split == "test" else (data.train, data.val_rows)


def split_data(data: PreparedData, split: str) -> XMCData:
    """The points of ``split`` (test or val) on their own: the test split, or a copy of the
    training file's validation rows."""
    source, points = _split_rows(data, split)
    if points is None:
        return source
    return XMCData(source.X[points], source.Y[points], source.n_features, source.n_labels)


def score_split(
    config: Config, data: PreparedData, model: RunModel, device: torch.device, split: str, ks: list[int],
    buckets: int = DEFAULT_BUCKETS,
) -> tuple[dict[str, float], list[BucketRow] | None]:
    """Metrics of a loaded run (``load_run``) on its test or validation split, and with ``buckets``
    > 0 the table by label-frequency bucket (else None). Label frequencies, like the propensities,
    are counted over the whole training file, the validation rows included."""
    precision = precision_on(device, config.train.precision)
    source, points = _split_rows(data, split)
    batch_size = config.train.eval_batch_size
    implications = data.preprocess.implications
    if buckets > 0:
        return evaluate_by_frequency(
            model, source, ks, batch_size, device, precision, data.inv_propensity,
            label_frequencies(data.train.Y), buckets, points, implications,
        )
    return evaluate(model, source, ks, batch_size, device, precision, data.inv_propensity, points, implications), None


def saved_predictions_path(run_dir: Path, split: str) -> Path:
    """Where ``evaluate_run_dir`` writes the top-k predictions of ``split`` when asked to."""
    return run_dir / f"predictions-{split}.txt"


class WrittenPredictions(NamedTuple):
    """What ``predict_file`` wrote: the file, and the labels per point (the asked top-k, capped at
    the model's number of labels)."""

    path: Path
    top_k: int


def predict_file(run_dir: Path, input_path: Path, top_k: int, out: Path | None = None) -> WrittenPredictions:
    """Top-k labels of every point of an input file (XC text, npz, or dense .npy rows), written to
    ``out`` (default: ``predictions.txt`` in ``run_dir``)."""
    if top_k < 1:
        raise XMLSparseError(f"--top-k {top_k}: expected a positive number of labels")
    check_run_dir(run_dir)  # before the output check, whose default folder this is
    target = out if out is not None else run_dir / "predictions.txt"
    check_output_file(target)
    config, stored, model, device = load_run_model(run_dir)
    top_k = min(top_k, stored.n_labels)
    if (input_path.suffix == ".npy") != (stored.features == "dense"):
        wanted = "dense feature rows (.npy)" if stored.features == "dense" else "BoW features (XC text or npz)"
        raise XMLSparseError(f"{input_path}: the model of {run_dir} reads {wanted}")
    if input_path.suffix == ".npy":
        features = read_npy_features(input_path)
        empty = sp.csr_matrix((features.shape[0], stored.n_labels), dtype=np.float32)
        inputs = XMCData(features, empty, features.shape[1], stored.n_labels)
    else:
        inputs = load_split(input_path)
    if inputs.n_features != stored.n_features:
        raise XMLSparseError(
            f"{input_path}: {inputs.n_features} features, but the model of {run_dir} reads {stored.n_features}"
        )
    inputs = stored.preprocess(inputs)  # the training split's idf and normalisation, as the run stored them
    precision = precision_on(device, config.train.precision)
    ids, scores = predict_topk(model, inputs, top_k, config.train.eval_batch_size, device, precision,
                               stored.preprocess.implications)
    write_predictions(target, stored.preprocess.original_labels(ids), scores, n_labels=stored.n_labels)
    return WrittenPredictions(target, top_k)
