"""Hyper-parameter search over a training config with Optuna.

Every trial is an ordinary run directory, ``OUT/trial-NNN``, trained by the usual trainer and scored
by the metric the config already uses for early stopping, on the validation split carved from
train: the test split is never scored while choosing, so its numbers stay an unbiased estimate for
the chosen config. Each epoch's validation score goes to the pruner, which ends trials that trail
the others. ``OUT/study.db`` (sqlite) holds the study, so tuning again into the same folder
continues it; ``OUT/trials.jsonl`` lists every trial and ``OUT/best.yaml`` is the best trial's
resolved config, ready for ``xmlsparse train``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from xmlsparse.atomic import atomic_write
from xmlsparse.config import (
    Config,
    apply_overrides,
    config_from_dict,
    read_config_values,
    save_config,
    yaml_float,
)
from xmlsparse.errors import XMLSparseError
from xmlsparse.train.trainer import TrainingDiverged, start_run

STUDY_NAME = "xmlsparse-tune"
PARAM_TYPES = ("float", "int", "categorical")
PARAM_FIELDS = ("type", "low", "high", "log", "choices")
# The key whose metric is the objective: searching it would make trials' values incomparable.
OBJECTIVE_KEY = "train.early_stopping.metric"


@dataclass(frozen=True)
class Param:
    """One searched config key: a float or int range (log-uniform with ``log``) or a list of choices."""

    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        """Draw this key's value for ``trial``."""
        if self.type == "float":
            return trial.suggest_float(key, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(key, list(self.choices))

    def extremes(self) -> list[Any]:
        """The values checked against the config schema before any trial: both ends, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


@dataclass
class TuneResult:
    """What a call of :func:`tune_config` leaves: the study's trials and the best trial's config."""

    out: Path
    metric: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    interrupted: bool


def default_space(config: Config) -> dict[str, Param]:
    """The knobs whose best values depend on the data set: learning rate, weight decay and dropout."""
    # AdamW's decoupled decay shrinks weights by lr * decay a step, and the shipped recipes for the
    # small real sets need up to 1.0; Adam adds its decay to the gradient before normalising, where
    # anything much above 1e-3 outweighs the loss.
    decay = (1.0e-3, 3.0) if config.train.optimizer.type == "adamw" else (1.0e-7, 1.0e-3)
    space = {
        "train.optimizer.lr": Param("float", 1.0e-4, 1.0e-2, log=True),
        "train.optimizer.weight_decay": Param("float", *decay, log=True),
        "model.encoder.dropout": Param("float", 0.0, 0.9),
    }
    # Word dropout acts on BoW inputs only; for dense features it would spend trials on a no-op.
    if (config.model.encoder.type or config.data.features) == "bow":
        space["model.encoder.input_dropout"] = Param("float", 0.0, 0.5)
    return space


def _number(value: Any, integer: bool, where: str, name: str) -> float | int:
    if not integer:
        value = yaml_float(value)  # a range bound written 1e-4 is a number, though YAML reads a string
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise XMLSparseError(f"{where}: {name} = {value!r}: expected {'an integer' if integer else 'a finite number'}")
    return value if integer else float(value)


def parse_param(spec: Any, where: str) -> Param:
    """Check one ``{type, low, high, log, choices}`` mapping of a search space file."""
    if not isinstance(spec, dict):
        raise XMLSparseError(
            f"{where}: expected a mapping like {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}, got {spec!r}"
        )
    unknown = [str(name) for name in spec if name not in PARAM_FIELDS]
    if unknown:
        raise XMLSparseError(f"{where}: unknown field {unknown[0]!r} (valid fields: {', '.join(PARAM_FIELDS)})")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise XMLSparseError(f"{where}: type = {kind!r}: expected one of {', '.join(PARAM_TYPES)}")
    if kind == "categorical":
        ranged = [name for name in ("low", "high", "log") if name in spec]
        if ranged:
            raise XMLSparseError(f"{where}: {ranged[0]} does not apply to type categorical (list the choices)")
        choices = spec.get("choices")
        # Optuna stores choices as plain values: numbers, strings, booleans or null.
        if not isinstance(choices, list) or not choices or not all(
            choice is None or isinstance(choice, (bool, int, float, str)) for choice in choices
        ):
            raise XMLSparseError(f"{where}: choices = {choices!r}: expected a non-empty list of numbers, strings, "
                                 "booleans or null")
        return Param("categorical", choices=tuple(choices))
    if "choices" in spec:
        raise XMLSparseError(f"{where}: choices apply to type categorical only (a {kind} takes low and high)")
    low = _number(spec.get("low"), kind == "int", where, "low")
    high = _number(spec.get("high"), kind == "int", where, "high")
    if not low < high:
        raise XMLSparseError(f"{where}: low = {low!r}, high = {high!r}: expected low < high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise XMLSparseError(f"{where}: log = {log!r}: expected true or false")
    if log and low <= 0:
        raise XMLSparseError(f"{where}: log = true needs low > 0, got low = {low!r}")
    return Param(kind, low, high, log)


def load_space(path: Path) -> dict[str, Param]:
    """Read a search space file: a YAML mapping of dotted config keys to ``{type, low, high, log, choices}``."""
    if not path.is_file():
        raise XMLSparseError(f"{path}: search space file not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise XMLSparseError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict) or not values:
        raise XMLSparseError(
            f"{path}: expected a mapping of dotted config keys to {{type: float|int|categorical, low, high, "
            "log, choices}, e.g. train.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"
        )
    return {str(key): parse_param(spec, f"{path}: {key}") for key, spec in values.items()}


def _override(key: str, value: Any) -> str:
    # JSON is YAML, so a drawn value goes through the same parsing and checks as a --set of it.
    return f"{key}={json.dumps(value)}"


def trial_config(base_values: dict, params: dict[str, Any], source: str) -> Config:
    """The config of one trial: the base mapping with the drawn ``params`` (dotted keys) set, validated."""
    values = copy.deepcopy(base_values)
    apply_overrides(values, [_override(key, value) for key, value in params.items()])
    return config_from_dict(values, source)


def check_space(space: dict[str, Param], base_values: dict, source: str) -> None:
    """Validate every searched key against the config schema, at both ends of its range (or with every
    choice), so that a typo or a wrong type fails before the first trial rather than in one."""
    for key, param in space.items():
        if key == OBJECTIVE_KEY:
            raise XMLSparseError(f"{source}: {key} is the metric being optimised, so it cannot be searched")
        # Setting a key below a section that the config switches off (null) would switch it on.
        node: Any = base_values
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                break
            if node[part] is None:
                section = ".".join(parts[: depth + 1])
                raise XMLSparseError(f"{source}: {key}: {section} is null (off) in the config; "
                                     f"searching {key} would switch it on, so set {section} in the config first")
            node = node[part]
        for value in param.extremes():
            trial_config(base_values, {key: value}, source)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two nested mappings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [key for key in new if key not in old]
        return [diff for key in keys
                for diff in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [prefix]


def open_study(
    out: Path, base_values: dict, space: dict[str, Param], seed: int, pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study in ``out/study.db``, or load it when it exists and was made for the same config
    mapping (file and overrides) and search space: trials of different setups are not comparable."""
    study = optuna.create_study(
        storage=f"sqlite:///{(out / 'study.db').resolve()}", study_name=STUDY_NAME, direction="maximize",
        load_if_exists=True, pruner=pruner,
    )
    # The mapping as written rather than the resolved config, so that a key added to the schema later
    # (with its default) does not orphan a study. Stored through JSON, so compared through JSON.
    setup = json.loads(json.dumps({
        "config": base_values,
        "space": {key: dataclasses.asdict(param) for key, param in space.items()},
    }, default=str))
    if not study.user_attrs:
        for name, value in setup.items():
            study.set_user_attr(name, value)
    else:
        differences = _differences(study.user_attrs, setup)
        if differences:
            raise XMLSparseError(
                f"{out / 'study.db'} holds a study of another config or search space (it differs at "
                f"{', '.join(differences[:5])}); tune again with the same CONFIG, --set and --space, or pick another --out"
            )
    # Seeded from the config, offset by the trials already run: a continued study reseeded the same
    # would draw the first call's start-up (random) points again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def default_pruner() -> optuna.pruners.BasePruner:
    """Median pruning: a trial whose best validation score so far is below the median of the
    completed trials' scores at the same epoch stops."""
    # Steps are epochs counted from 1; the first epoch's score says more about the start than about
    # the setting, and two completed trials are the least a median means something over.
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)


def _run_trial(trial: optuna.Trial, base_values: dict, space: dict[str, Param], out: Path, metric: str,
               source: str) -> float:
    """Train one trial's config in ``out/trial-NNN``; its value is the best validation ``metric``."""
    params = {key: param.suggest(trial, key) for key, param in space.items()}
    run_dir = out / f"trial-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    trainer = start_run(trial_config(base_values, params, source), run_dir)
    pruned = False

    def on_epoch(record: dict[str, Any]) -> bool:
        nonlocal pruned
        trial.report(record[f"val_{metric}"], record["epoch"])
        pruned = trial.should_prune()
        return pruned

    final = trainer.fit(on_epoch=on_epoch, test=False)
    if final is None:
        # SIGINT stopped the run (its checkpoint is saved): stop the study as well.
        raise KeyboardInterrupt
    if pruned:
        raise optuna.TrialPruned(f"pruned after epoch {trainer.epoch}")
    # The score final.json records, so that the study and the run directory agree.
    return final["best_validation"][metric]


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One summary per trial: number, state, value, epochs reported, params, run directory, seconds."""
    return [
        {
            "trial": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "epochs": len(trial.intermediate_values),
            "params": trial.params,
            "run_dir": trial.user_attrs.get("run_dir"),
            "seconds": trial.duration.total_seconds() if trial.duration is not None else None,
        }
        for trial in study.trials
    ]


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest value (the first of equals), or None before any completes."""
    completed = [row for row in rows if row["state"] == "COMPLETE"]
    return max(completed, key=lambda row: row["value"]) if completed else None


def write_summary(study: optuna.Study, out: Path, base_values: dict, source: str) -> Path | None:
    """Rewrite ``out/trials.jsonl`` and ``out/best.yaml`` from the study as it stands; returns the
    path of ``best.yaml``, or None while no trial has completed."""
    rows = trial_rows(study)
    with atomic_write(out / "trials.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    best = best_row(rows)
    if best is None:
        return None
    save_config(trial_config(base_values, best["params"], source), out / "best.yaml")
    return out / "best.yaml"


def tune_config(
    config_path: Path,
    trials: int,
    out: Path,
    overrides: list[str] | None = None,
    space_path: Path | None = None,
    timeout: float | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneResult:
    """Run ``trials`` more trials of the study in ``out`` (created, or continued when it exists) over
    the config at ``config_path`` with ``overrides``; no new trial starts after ``timeout`` seconds.

    The search space is :func:`default_space` or the file ``space_path``; it is checked against the
    config schema before anything is trained. A trial whose loss diverges is recorded as failed and
    the search goes on; Ctrl-C ends the study after saving the running trial's checkpoint.
    """
    source = str(config_path)
    base_values = apply_overrides(read_config_values(config_path), list(overrides or []))
    base = config_from_dict(base_values, source)
    if space_path is not None:
        space, space_source = load_space(space_path), str(space_path)
    else:
        space, space_source = default_space(base), "default search space"
    check_space(space, base_values, space_source)
    metric = base.train.early_stopping.metric
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(out, base_values, space, base.train.seed, pruner if pruner is not None else default_pruner())
    interrupted = False
    try:
        study.optimize(
            lambda trial: _run_trial(trial, base_values, space, out, metric, source),
            n_trials=trials,
            timeout=timeout,
            # A learning rate too high for the data is an outcome of the search, not an error in it.
            catch=(TrainingDiverged,),
            # Summaries kept current, so that an interrupted or crashed search still leaves them.
            callbacks=[lambda study, trial: write_summary(study, out, base_values, source)],
            # Each trial's model and optimizer hold reference cycles; free them before the next one.
            gc_after_trial=True,
        )
    except KeyboardInterrupt:
        interrupted = True
    best_config = write_summary(study, out, base_values, source)
    rows = trial_rows(study)
    return TuneResult(out, metric, rows, best_row(rows), best_config, interrupted)


def format_trials(result: TuneResult) -> str:
    """A table of the trials: state, value (x100), epochs trained, and each param, the best marked *."""
    keys = list(dict.fromkeys(key for row in result.rows for key in row["params"]))
    # Params by their last name (lr, dropout, ...) unless two keys share it.
    names = [key.rsplit(".", 1)[-1] for key in keys]
    names = [name if names.count(name) == 1 else key for name, key in zip(names, keys)]
    header = ["trial", "state", f"val {result.metric}", "epochs", *names]
    lines = []
    for row in result.rows:
        best = result.best is not None and row["trial"] == result.best["trial"]
        value = row["value"]
        cells = [
            f"{row['trial']}{'*' if best else ''}",
            row["state"],
            f"{100 * value:.2f}" if value is not None else "-",
            str(row["epochs"]),
            *(_format_value(row["params"][key]) if key in row["params"] else "-" for key in keys),
        ]
        lines.append(cells)
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(cells, widths)) for cells in [header, *lines])


def _format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
