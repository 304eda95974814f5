"""The run configuration: one schema of dataclasses, loaded from YAML, overridden with `--set a.b=c`.

Every error names the key (as a dotted path), the value and what was expected, and an unknown key
suggests the closest valid one, so that a typo in a config never trains the wrong model silently.
A field without a default must be given (the data set and the model section), and a field whose
metadata holds a ``"range"`` (a :class:`Range`) is checked against it, entry by entry for a list.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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


def yaml_float(value: Any) -> Any:
    """``value``, or the float a string spells: YAML 1.1 reads ``1e-3`` (no dot) as a string,
    which is a float to anyone writing a config."""
    if isinstance(value, str) and _FLOAT_PATTERN.fullmatch(value.strip()):
        return float(value)
    return value


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; a bound of None is open-ended. NaN and infinities are never
    in it (an infinite learning rate or interval is a mistake, and null already means "none")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


AT_LEAST_ONE = Range(low=1)
POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
RATE = Range(0, 1, high_open=True)  # a dropout rate: 1 would drop everything
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)
SHARE = Range(0, 1, low_open=True)
UNIT = Range(0, 1)
SEED = Range(0, 2**32 - 1)  # what numpy's global seed accepts


# The activations a config may name (every ``activation`` key). The one list: xmlsparse.nn maps these
# names to modules, and this layer imports nothing from it.
ACTIVATION_NAMES = ("relu", "gelu", "tanh", "sigmoid", "silu", "elu", "leaky-relu", "identity")


def ranged(default: Any, allowed: Range) -> Any:
    """A dataclass field with ``default`` whose values (when not null) must lie in ``allowed``."""
    return field(default=default, metadata={"range": allowed})


@dataclass
class DataConfig:
    # A registry name (looked up under `root`), a directory, or a mapping of paths (train, test, ...).
    dataset: Union[str, dict]
    root: str = "data"
    features: str = "bow"  # bow | dense (precomputed .npy rows)
    # Fraction of train held out for early stopping and schedules: without any, no epoch has a
    # validation score to select the best checkpoint by.
    validation: float = ranged(0.05, OPEN_UNIT)
    # At most this many points held out (null: the share alone). A validation score's noise
    # depends on the number of points, not on the share, while every held-out point is training
    # data that a rare label loses.
    validation_max_points: Union[int, None] = ranged(None, AT_LEAST_ONE)
    # Seeds which points are held out, apart from train.seed: runs that differ only in train.seed
    # (the members of an ensemble) hold out the same points, so their validation scores compare.
    validation_seed: int = ranged(0, SEED)
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
    dim: int = ranged(512, AT_LEAST_ONE)  # bow: embedding size
    input_dropout: float = ranged(0.0, RATE)  # bow: share of a document's words dropped in training
    hidden: list[int] = field(default_factory=list, metadata={"range": AT_LEAST_ONE})  # layer sizes
    dropout: float = ranged(0.1, RATE)
    activation: str = "relu"


@dataclass
class IntermediateConfig:
    size: int = ranged(65536, AT_LEAST_ONE)
    activation: str = "relu"


@dataclass
class HeadConfig:
    type: str = "fixed-fanin"  # fixed-fanin | dense | bottleneck
    fan_in: int = ranged(64, AT_LEAST_ONE)
    rank: int = ranged(64, AT_LEAST_ONE)  # bottleneck width
    activation: str = "relu"  # bottleneck activation
    impl: str = "auto"  # fixed-fanin op: auto | triton | reference
    # fixed-fanin: labels in groups of this many consecutive labels share one row of inputs (1: a
    # row per label). The Triton path has kernels for 16, 32 and 64 with fan_in a multiple of 16.
    group_size: int = ranged(1, AT_LEAST_ONE)
    # Which labels share a group: random (consecutive label ids), or clustered from the training
    # data before training (labels whose points look alike; the order is stored with the run).
    grouping: str = "random"
    # fixed-fanin: the most frequent training labels (a share of the labels when under 1, else a
    # count) get a dense layer of their own, the rest the fixed fan-in layer; 0: none.
    dense_head_labels: float = ranged(0, NON_NEGATIVE)


@dataclass
class RewireConfig:
    interval: int = ranged(1000, AT_LEAST_ONE)  # optimizer steps between rewiring rounds
    fraction: float = ranged(0.1, SHARE)  # share of the layer's connections pruned (smallest |W|) each round
    threshold: Union[float, None] = ranged(None, NON_NEGATIVE)  # prune |W| below this instead of a fraction
    threshold_decay: float = ranged(1.0, SHARE)  # threshold multiplier applied after each round
    stop: float = ranged(0.66, UNIT)  # fraction of the planned steps after which rewiring stops
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
    lr: float = ranged(1.0e-3, POSITIVE)
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    # Per-part learning rates; None takes `lr`. 0 is allowed here: it freezes that part.
    lr_encoder: Union[float, None] = ranged(None, NON_NEGATIVE)
    lr_intermediate: Union[float, None] = ranged(None, NON_NEGATIVE)
    lr_head: Union[float, None] = ranged(None, NON_NEGATIVE)
    # Adam's two moments: float32 (torch's Adam) or bfloat16 (CompactAdam, stochastic rounding:
    # half the optimizer memory).
    moments: str = "float32"
    # bfloat16 moments only: the fixed fan-in head takes its Adam step inside its backward, so its
    # weight gradient lives there only (in bf16), not until the optimizer step.
    head_update_in_backward: bool = False


@dataclass
class ScheduleConfig:
    type: str = "plateau"  # plateau | cosine | constant
    metric: str = "P@3"  # plateau only
    factor: float = ranged(0.5, OPEN_UNIT)  # plateau: the learning rate's multiplier when it stalls
    patience: int = ranged(2, NON_NEGATIVE)
    warmup_steps: int = ranged(0, NON_NEGATIVE)  # cosine only
    min_lr: float = ranged(0.0, NON_NEGATIVE)


@dataclass
class EarlyStoppingConfig:
    metric: str = "P@3"
    patience: int = ranged(4, NON_NEGATIVE)  # epochs without improvement; 0 disables


@dataclass
class CheckpointConfig:
    # The full checkpoint (checkpoints/last.pt: model, optimizer moments, schedule, RNG states) is
    # what a resume needs and, with Adam, three times the model's size: written every epoch it can
    # take longer than the epoch's steps. It is written when either interval is due (checked at the
    # end of each epoch), always at the end of training and on SIGINT; a resume from an older one
    # trains the epochs since again, identically on CPU. best.pt (the model alone) is written
    # whenever validation improves, whatever these say.
    every_epochs: int = ranged(1, AT_LEAST_ONE)
    every_minutes: Union[float, None] = ranged(None, POSITIVE)
    # Copy the state to host memory and write it from a background thread while training goes on
    # (at most one write in flight; the next save waits for it): the loop waits for the copy only.
    background: bool = True


@dataclass
class AverageConfig:
    # The average follows the weights with this weight on its past at each step: 1 / (1 - decay)
    # steps make most of it (0.999: about two WordNet-Hypernyms epochs of batch 128). Early steps
    # use min(decay, (1 + t) / (10 + t)), so that the first epochs' average is not the initial model.
    decay: float = ranged(0.999, OPEN_UNIT)


@dataclass
class TrainConfig:
    epochs: int = ranged(100, AT_LEAST_ONE)
    batch_size: int = ranged(32, AT_LEAST_ONE)
    eval_batch_size: int = ranged(512, AT_LEAST_ONE)
    loss: str = "squared-hinge"  # squared-hinge | bce | softmax
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # An exponential moving average of the parameters, validated, kept in best.pt and tested in
    # place of the last step's weights; null trains without (it costs one fp32 copy of the model).
    average: Union[AverageConfig, None] = None
    precision: str = "bf16"  # bf16 | fp32 (CPU always runs fp32)
    seed: int = ranged(0, SEED)
    device: str = "auto"  # auto | cpu | cuda
    max_steps_per_epoch: Union[int, None] = ranged(None, AT_LEAST_ONE)  # shortened epochs for benchmarks


@dataclass
class ImplicationsConfig:
    # A label implies another when each of its training points (at least this many) has both.
    min_support: int = ranged(2, AT_LEAST_ONE)


@dataclass
class EvalConfig:
    k: list[int] = field(default_factory=lambda: [1, 3, 5], metadata={"range": AT_LEAST_ONE})
    # Top-k lists made consistent with the label implications of the training split (an implied
    # label scores at least as high as the labels implying it; xmlsparse.implications), in
    # validation, test, eval and predict; null scores the labels one by one.
    implications: Union[ImplicationsConfig, None] = None


@dataclass
class Config:
    # No defaults: the data set and the model define the run, and the model's defaults are the
    # paper's (a 65,536-unit intermediate layer), too large to build by accident.
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str | bool, ...]] = {
    "data.features": ("bow", "dense"),
    "data.tfidf": ("auto", True, False),
    "model.encoder.type": ("bow", "dense"),
    "model.encoder.activation": ACTIVATION_NAMES,
    "model.intermediate.activation": ACTIVATION_NAMES,
    "model.head.type": ("fixed-fanin", "dense", "bottleneck"),
    "model.head.activation": ACTIVATION_NAMES,
    # xmlsparse.ops.IMPLS, which this layer may not import; tests/nn/test_model.py checks they agree.
    "model.head.impl": ("auto", "triton", "reference"),
    "model.head.grouping": ("random", "clustered"),
    "model.rewire.new_weights": ("zero", "random"),
    "train.loss": ("squared-hinge", "bce", "softmax"),
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


def _convert(value: Any, tp: Any, key: str, source: str, missing: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp`` (and build nested dataclasses, adding the keys
    they lack to ``missing``)."""
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
                return _convert(value, option, key, source, missing)
            except XMLSparseError as error:
                errors.append(error)
        if dataclasses.is_dataclass(next(o for o in options if o is not type(None))) and errors:
            raise errors[0]
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise XMLSparseError(f"{source}: {key} = {value!r}: expected {names}")
    if origin is list:
        if not isinstance(value, list):
            raise XMLSparseError(f"{source}: {key} = {value!r}: expected a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item, item_type, f"{key}[{i}]", source, missing) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key, source, missing)
        raise XMLSparseError(f"{source}: {key} = {value!r}: expected a mapping of {tp.__name__} keys")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float:
        value = yaml_float(value)
    if tp in (int, float, str, bool, list, dict):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise XMLSparseError(f"{source}: {key} = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _required(spec: dataclasses.Field) -> bool:
    """A field without a default: a config must give it."""
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _required_keys(tp: Any, key: str) -> list[str]:
    """The dotted keys an absent required ``key`` of type ``tp`` stands for: the required keys of
    the section when it has any (``data`` -> ``data.dataset``), else ``key`` itself."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        inner = [
            name
            for spec in dataclasses.fields(tp)
            if _required(spec)
            for name in _required_keys(hints[spec.name], f"{key}.{spec.name}")
        ]
        if inner:
            return inner
    return [key]


def _check_range(raw: Any, value: Any, allowed: Range, key: str, source: str) -> None:
    """``value`` (converted from ``raw``; a list: each of its entries) must lie in ``allowed``."""
    if isinstance(value, list):
        for entry in value:
            if entry not in allowed:
                raise XMLSparseError(
                    f"{source}: {key} = {raw!r}: {entry!r} is out of range, every entry must be {allowed}"
                )
    elif value not in allowed:
        raise XMLSparseError(f"{source}: {key} = {raw!r}: out of range, expected a value {allowed}")


def _build(cls: type, values: dict, prefix: str, source: str, missing: list[str]) -> Any:
    """Validate ``values`` into ``cls``: an unknown key, a wrong type, a value outside the choices or
    the field's range raises at once; the required keys that are absent here or below are added to
    ``missing`` (dotted), and then nothing is built (None), so that one error can name them all."""
    hints = typing.get_type_hints(cls)
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in specs:
            close = difflib.get_close_matches(str(name), list(specs), n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            valid = ", ".join(specs)
            raise XMLSparseError(f"{source}: unknown key {key!r}{hint} (valid keys here: {valid})")
        if value == {} and _required(specs[name]):
            # An empty required section would be all defaults: it is as absent as a missing one.
            continue
        kwargs[name] = _convert(value, hints[name], key, source, missing)
        if key in CHOICES and kwargs[name] is not None and kwargs[name] not in CHOICES[key]:
            choices = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in CHOICES[key])
            raise XMLSparseError(f"{source}: {key} = {value!r}: expected one of {choices}")
        allowed = specs[name].metadata.get("range")
        if allowed is not None and kwargs[name] is not None:
            _check_range(value, kwargs[name], allowed, key, source)
    for name, spec in specs.items():
        if _required(spec) and name not in kwargs:
            missing.extend(_required_keys(hints[name], f"{prefix}.{name}" if prefix else name))
    return None if missing else cls(**kwargs)


def config_from_dict(values: dict, source: str = "config") -> Config:
    """Validate a nested mapping into a :class:`Config`. Defaults fill what is absent but for the data
    set (``data.dataset``) and the ``model`` section, which define the run and must be given."""
    if not isinstance(values, dict):
        raise XMLSparseError(f"{source}: expected a mapping of sections (data, model, train, eval)")
    missing: list[str] = []
    config = _build(Config, values, "", source, missing)
    if missing:
        raise XMLSparseError(
            f"{source}: missing {' and '.join(missing)}: a config names its data set (data.dataset) and "
            "describes its model (a model: section); start from configs/recipes/bow.yaml (bag-of-words "
            "features) or configs/quickstart.yaml (dense features)"
        )
    _check_metric_names(config, values, source)
    check_model_fits(config.model, config.data.features, source=source)
    optimizer = config.train.optimizer
    if optimizer.head_update_in_backward and optimizer.moments != "bfloat16":
        raise XMLSparseError(
            f"{source}: train.optimizer.head_update_in_backward needs train.optimizer.moments = bfloat16, "
            f"got {optimizer.moments!r}"
        )
    return config


def _head_inputs(model: ModelConfig, features: str, n_features: int | None) -> tuple[int, str] | None:
    """How many inputs the head reads and what sets that number; None when only the data can tell
    (a dense encoder without hidden layers passes on the data's feature columns, ``n_features``)."""
    if model.intermediate is not None:
        return model.intermediate.size, "model.intermediate.size"
    if model.encoder.hidden:
        return model.encoder.hidden[-1], "model.encoder.hidden"
    if (model.encoder.type or features) == "bow":
        return model.encoder.dim, "model.encoder.dim"
    if n_features is not None:
        return n_features, "the data's feature columns"
    return None


def check_model_fits(model: ModelConfig, features: str, n_features: int | None = None, source: str = "config") -> None:
    """The rules across fields of the ``model`` section: the encoder reads the data's kind of features
    (``features``, data.features), and a label's fan-in fits the inputs its head reads. Loading a
    config checks what the config alone decides; building the model checks again with the data's
    ``n_features``, which a dense encoder without hidden layers passes on to the head."""
    if model.encoder.type is not None and model.encoder.type != features:
        raise XMLSparseError(
            f"{source}: model.encoder.type = {model.encoder.type!r} but data.features = {features!r}: "
            "they must agree (null follows data.features)"
        )
    inputs = _head_inputs(model, features, n_features)
    if model.head.type == "fixed-fanin" and inputs is not None and model.head.fan_in > inputs[0]:
        raise XMLSparseError(
            f"{source}: model.head.fan_in = {model.head.fan_in} exceeds the {inputs[0]} inputs the head reads "
            f"({inputs[1]})"
        )
    dense = model.head.dense_head_labels
    if dense and model.head.type != "fixed-fanin":
        raise XMLSparseError(f"{source}: model.head.dense_head_labels = {dense} splits a fixed-fanin head, "
                             f"but model.head.type = {model.head.type!r}")
    if dense >= 1 and dense != int(dense):
        raise XMLSparseError(f"{source}: model.head.dense_head_labels = {dense}: expected a share under 1 "
                             "or a whole number of labels")


METRIC_FAMILIES = ("P", "nDCG", "PSP", "PSnDCG", "R")


def _given(values: dict, dotted: str) -> bool:
    """Whether the raw mapping ``values`` sets the dotted key (rather than leaving it to its default)."""
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_metric_names(config: Config, values: dict, source: str) -> None:
    """The validation metrics that drive the schedule and early stopping must be ones evaluation
    reports. A metric the config sets is blamed as written; a default one, which the config never
    mentions, is named as the default together with the ways out."""
    ks = config.eval.k
    if not ks:
        raise XMLSparseError(f"{source}: eval.k = []: expected at least one k")
    valid = [f"{family}@{k}" for family in METRIC_FAMILIES for k in ks]
    checked = [("train.early_stopping.metric", config.train.early_stopping.metric)]
    if config.train.schedule.type == "plateau":  # the other schedules read no metric
        checked.insert(0, ("train.schedule.metric", config.train.schedule.metric))
    unreported = [(key, name) for key, name in checked if name not in valid]
    for key, name in unreported:
        if _given(values, key):
            by_lower = {v.lower(): v for v in valid}
            close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
            hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
            raise XMLSparseError(f"{source}: {key} = {name!r} is not a reported metric{hint} (reported: {', '.join(valid)})")
    if unreported:
        name = unreported[0][1]
        keys = " and ".join(key for key, other in unreported if other == name)
        family, k = name.split("@")
        nearest = min(ks, key=lambda candidate: (abs(candidate - int(k)), candidate))
        raise XMLSparseError(
            f"{source}: the default metric {name} of {keys} is not reported with eval.k = {ks}; "
            f"set {keys} to a reported metric (such as {family}@{nearest}) or add {k} to eval.k"
        )


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
