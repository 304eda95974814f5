"""The run configuration: one schema of dataclasses, loaded from YAML, overridden with `--set a.b=c`.

Every error names the key (as a dotted path), the value and what was expected, and an unknown key
suggests the closest valid one, so that a typo in a config never trains the wrong model silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from xmlsparse.atomic import atomic_write
from xmlsparse.errors import XMLSparseError

_FLOAT_PATTERN = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class DataConfig:
    # A registry name (looked up under `root`), a directory, or a mapping of paths (train, test, ...).
    dataset: Union[str, dict] = "quickstart"
    root: str = "data"
    features: str = "bow"  # bow | dense (precomputed .npy rows)
    validation: float = 0.05  # fraction of train held out for early stopping and schedules
    # BoW rows scaled to unit L2 norm on load (raw counts make the first layer's scale depend on
    # document length); dense rows are used as given.
    normalize: bool = True
    # BoW values re-weighted by the training split's inverse document frequency. auto: when every
    # stored value of the training features is a whole number (binary or count features, as
    # Bibtex and Delicious ship), not when they are real-valued (tf-idf already).
    tfidf: Union[bool, str] = "auto"


@dataclass
class EncoderConfig:
    type: Union[str, None] = None  # bow | dense; null follows data.features
    dim: int = 512  # bow: embedding size
    input_dropout: float = 0.0  # bow: share of a document's words dropped in training
    hidden: list = field(default_factory=list)
    dropout: float = 0.1
    activation: str = "relu"


@dataclass
class IntermediateConfig:
    size: int = 65536
    activation: str = "relu"


@dataclass
class HeadConfig:
    type: str = "fixed-fanin"  # fixed-fanin | dense | bottleneck
    fan_in: int = 64
    rank: int = 64  # bottleneck width
    activation: str = "relu"  # bottleneck activation
    impl: str = "auto"  # fixed-fanin op: auto | triton | reference


@dataclass
class RewireConfig:
    interval: int = 1000  # optimizer steps between rewiring rounds
    fraction: float = 0.1  # share of the layer's connections pruned (smallest |W|) each round
    threshold: Union[float, None] = None  # prune |W| below this instead of a fraction
    threshold_decay: float = 1.0  # threshold multiplier applied after each round
    stop: float = 0.66  # fraction of the planned steps after which rewiring stops
    new_weights: str = "zero"  # zero | random


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    intermediate: Union[IntermediateConfig, None] = field(default_factory=IntermediateConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    rewire: Union[RewireConfig, None] = field(default_factory=RewireConfig)


@dataclass
class OptimizerConfig:
    type: str = "adam"  # adam | adamw
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    # Per-part learning rates; None takes `lr`.
    lr_encoder: Union[float, None] = None
    lr_intermediate: Union[float, None] = None
    lr_head: Union[float, None] = None
    # Adam's two moments: float32 (torch's Adam) or bfloat16 (CompactAdam, stochastic rounding:
    # half the optimizer memory).
    moments: str = "float32"
    # bfloat16 moments only: the fixed fan-in head takes its Adam step inside its backward, so its
    # weight gradient lives there only (in bf16), not until the optimizer step.
    head_update_in_backward: bool = False


@dataclass
class ScheduleConfig:
    type: str = "plateau"  # plateau | cosine | constant
    metric: str = "P@3"
    factor: float = 0.5
    patience: int = 2
    warmup_steps: int = 0  # cosine only
    min_lr: float = 0.0


@dataclass
class EarlyStoppingConfig:
    metric: str = "P@3"
    patience: int = 4  # epochs without improvement; 0 disables


@dataclass
class CheckpointConfig:
    # The full checkpoint (checkpoints/last.pt: model, optimizer moments, schedule, RNG states) is
    # what a resume needs and, with Adam, three times the model's size: written every epoch it can
    # take longer than the epoch's steps. It is written when either interval is due (checked at the
    # end of each epoch), always at the end of training and on SIGINT; a resume from an older one
    # trains the epochs since again, identically on CPU. best.pt (the model alone) is written
    # whenever validation improves, whatever these say.
    every_epochs: int = 1
    every_minutes: Union[float, None] = None
    # Copy the state to host memory and write it from a background thread while training goes on
    # (at most one write in flight; the next save waits for it): the loop waits for the copy only.
    background: bool = True


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32
    eval_batch_size: int = 512
    loss: str = "squared-hinge"  # squared-hinge | bce
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    precision: str = "bf16"  # bf16 | fp32 (CPU always runs fp32)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_steps_per_epoch: Union[int, None] = None  # shortened epochs for benchmarks


@dataclass
class EvalConfig:
    k: list = field(default_factory=lambda: [1, 3, 5])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str | bool, ...]] = {
    "data.features": ("bow", "dense"),
    "data.tfidf": ("auto", True, False),
    "model.encoder.type": ("bow", "dense"),
    "model.head.type": ("fixed-fanin", "dense", "bottleneck"),
    "model.head.impl": ("auto", "triton", "reference"),
    "model.rewire.new_weights": ("zero", "random"),
    "train.loss": ("squared-hinge", "bce"),
    "train.optimizer.type": ("adam", "adamw"),
    "train.optimizer.moments": ("float32", "bfloat16"),
    "train.schedule.type": ("plateau", "cosine", "constant"),
    "train.precision": ("bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
}


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and build nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except XMLSparseError as error:
                errors.append(error)
        if dataclasses.is_dataclass(next(o for o in options if o is not type(None))) and errors:
            raise errors[0]
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise XMLSparseError(f"{source}: {key} = {value!r}: expected {names}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key, source)
        raise XMLSparseError(f"{source}: {key} = {value!r}: expected a mapping of {tp.__name__} keys")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_PATTERN.fullmatch(value.strip()):
        # YAML 1.1 reads `1e-3` (no dot) as a string; it is a float to anyone writing a config.
        return float(value)
    if tp in (int, float, str, bool, list, dict):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise XMLSparseError(f"{source}: {key} = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            valid = ", ".join(names)
            raise XMLSparseError(f"{source}: unknown key {key!r}{hint} (valid keys here: {valid})")
        kwargs[name] = _convert(value, hints[name], key, source)
        if key in CHOICES and kwargs[name] is not None and kwargs[name] not in CHOICES[key]:
            choices = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in CHOICES[key])
            raise XMLSparseError(f"{source}: {key} = {value!r}: expected one of {choices}")
    return cls(**kwargs)


def config_from_dict(values: dict, source: str = "config") -> Config:
    """Validate a nested mapping into a :class:`Config`; defaults fill what is absent."""
    if not isinstance(values, dict):
        raise XMLSparseError(f"{source}: expected a mapping of sections (data, model, train, eval)")
    config = _build(Config, values, "", source)
    _check_metric_names(config, source)
    checkpoint = config.train.checkpoint
    if checkpoint.every_epochs < 1:
        raise XMLSparseError(
            f"{source}: train.checkpoint.every_epochs = {checkpoint.every_epochs!r}: "
            "expected a positive number of epochs"
        )
    if checkpoint.every_minutes is not None and not checkpoint.every_minutes > 0:
        raise XMLSparseError(
            f"{source}: train.checkpoint.every_minutes = {checkpoint.every_minutes!r}: "
            "expected a positive number of minutes, or null"
        )
    optimizer = config.train.optimizer
    if optimizer.head_update_in_backward and optimizer.moments != "bfloat16":
        raise XMLSparseError(
            f"{source}: train.optimizer.head_update_in_backward needs train.optimizer.moments = bfloat16, "
            f"got {optimizer.moments!r}"
        )
    return config


METRIC_FAMILIES = ("P", "nDCG", "PSP", "PSnDCG", "R")


def _check_metric_names(config: Config, source: str) -> None:
    """The validation metrics that drive the schedule and early stopping must be ones evaluation reports."""
    ks = config.eval.k
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise XMLSparseError(f"{source}: eval.k = {ks!r}: expected a list of positive integers")
    valid = [f"{family}@{k}" for family in METRIC_FAMILIES for k in ks]
    for key, name in (
        ("train.schedule.metric", config.train.schedule.metric),
        ("train.early_stopping.metric", config.train.early_stopping.metric),
    ):
        if name not in valid:
            by_lower = {v.lower(): v for v in valid}
            close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
            hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
            raise XMLSparseError(f"{source}: {key} = {name!r} is not a reported metric{hint} (reported: {', '.join(valid)})")


def _set_dotted(values: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars) to a nested mapping in place."""
    for item in overrides:
        if "=" not in item:
            raise XMLSparseError(f"--set {item!r}: expected KEY=VALUE, for example train.epochs=5")
        dotted, raw = item.split("=", 1)
        if not dotted.strip():
            raise XMLSparseError(f"--set {item!r}: the key before '=' is empty")
        _set_dotted(values, dotted.strip(), raw)
    return values


def _merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in ``update`` replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_values(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The mapping of a YAML config with its ``extends:`` chain (paths relative to the file) merged in."""
    if not path.is_file():
        raise XMLSparseError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise XMLSparseError(f"{path}: 'extends' forms a cycle through {', '.join(map(str, seen))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise XMLSparseError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise XMLSparseError(f"{path}: expected a mapping of sections (data, model, train, eval) at the top")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise XMLSparseError(f"{path}: extends = {parent!r}: expected the path of another config")
    base = read_config_values(path.parent / parent, seen + (path.resolve(),))
    return _merge(base, values)


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (following ``extends:``), apply ``--set`` overrides, and validate it."""
    path = Path(path)
    values = read_config_values(path)
    apply_overrides(values, overrides or [])
    return config_from_dict(values, str(path))


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_write(path, "w") as handle:
        handle.write(yaml.safe_dump(config_to_dict(config), sort_keys=False))
