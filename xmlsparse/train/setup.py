"""What a run needs before its first step, shared by training, evaluation and prediction:
the device, the data with its validation split and propensities, the model of a config, and the
run directory's record of what reading new inputs takes (:class:`RunInputs`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import sklearn.feature_extraction.text
import sklearn.preprocessing
import torch

from xmlsparse.atomic import atomic_write, write_json
from xmlsparse.config import Config
from xmlsparse.data.batches import split_validation
from xmlsparse.data.datasets import REGISTRY, dataset_dir, find_dataset_dir, load_dataset
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.implications import LabelImplications
from xmlsparse.metrics import DEFAULT_PROPENSITY, inverse_propensity, label_frequencies
from xmlsparse.nn.heads import dense_label_count
from xmlsparse.nn.model import XMCModel, build_model
from xmlsparse.train.label_groups import clustered_label_order

# What a run directory keeps so that prediction reads nothing else (see RunInputs).
RUN_INPUTS_FILE = "preprocessing.json"
IDF_FILE = "idf.npy"
LABEL_ORDER_FILE = "label_order.npy"  # clustered label groups: the data set's label id at each model position
LABEL_MAP_FILE = "label_map.txt"  # a data set's label names by id, copied as it is
IMPLICATIONS_FILE = "label_implications.npz"  # eval.implications: the training split's label implications


@dataclass(frozen=True, eq=False)  # eq=False: an idf array has no single truth value to compare by
class Preprocessing:
    """The transform fitted on the training split: BoW values times ``idf`` (one weight per
    feature, None for none), then, with ``normalize``, rows scaled to unit L2 norm. Every input the
    model sees (train, test, ``xmlsparse predict`` files) goes through the same transform.

    ``label_order`` (clustered label groups) is the original label id at each of the model's label
    positions: the labels of every split are put in that order, so the model's consecutive labels
    form the groups, and ``original_labels`` maps its predictions back.

    ``implications`` (``eval.implications``) are read from the labels of the training split (the
    validation rows left out), in the model's label order; every top-k list is made consistent
    with them."""

    idf: np.ndarray | None
    normalize: bool
    label_order: np.ndarray | None = None
    implications: LabelImplications | None = None

    def __call__(self, data: XMCData) -> XMCData:
        if self.idf is not None:
            # What sklearn's TfidfTransformer.transform does, in the same dtype, so that a stored
            # idf gives the same features as the fitted transformer did.
            X = sp.csr_matrix(data.X, dtype=np.result_type(data.X.dtype, np.float32), copy=True)
            X.data *= self.idf[X.indices]
            data = replace(data, X=X.astype(np.float32))
        if self.normalize:
            data = normalized_rows(data)
        if self.label_order is not None:
            data = replace(data, Y=sp.csr_matrix(data.Y)[:, self.label_order].tocsr())
        return data

    def original_labels(self, ids: np.ndarray) -> np.ndarray:
        """The data set's label ids of the model's label positions ``ids``."""
        return ids if self.label_order is None else self.label_order[ids]


@dataclass
class PreparedData:
    train: XMCData  # the whole training file; train_rows / val_rows select the two parts
    train_rows: np.ndarray
    val_rows: np.ndarray
    test: XMCData
    inv_propensity: np.ndarray
    name: str
    preprocess: Preprocessing  # fitted on train; applied to train, test and new inputs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise XMLSparseError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def precision_on(device: torch.device, precision: str) -> str:
    """The precision a run uses on ``device``: the config's (bf16 or fp32) on CUDA; the CPU path
    always runs fp32."""
    return precision if device.type == "cuda" else "fp32"


def prepare_data(config: Config, preprocess: Preprocessing | None = None) -> PreparedData:
    """Load the data set, carve the seeded validation split out of train, and count propensities.
    The features go through ``preprocess`` (a run's stored transform), else one fitted on train."""
    train, test, info = load_dataset(config.data.dataset, Path(config.data.root), config.data.features)
    if preprocess is None:
        preprocess = fit_preprocessing(config, train)
    train, test = preprocess(train), preprocess(test)
    a, b = (info.propensity_a, info.propensity_b) if info is not None else DEFAULT_PROPENSITY
    inv_prop = inverse_propensity(label_frequencies(train.Y), train.n_points, a, b)
    train_rows, val_rows = split_validation(
        train.n_points, config.data.validation, config.data.validation_seed, config.data.validation_max_points
    )
    wanted = config.eval.implications
    if wanted is not None and preprocess.implications is None:
        implications = LabelImplications.from_labels(train.Y[train_rows], wanted.min_support)
        preprocess = replace(preprocess, implications=implications)
    name = info.name if info is not None else str(config.data.dataset)
    return PreparedData(train, train_rows, val_rows, test, inv_prop, name, preprocess)


def fit_preprocessing(config: Config, train: XMCData) -> Preprocessing:
    """The transform of ``config`` fitted on ``train``: for BoW, optionally the training split's
    smoothed idf (``tfidf: auto`` applies it to whole-number features only), then optionally unit
    L2 rows (dense rows pass unchanged); and the label order that a head–tail split (its dense
    labels first) or clustered groups (``grouping: clustered``) need."""
    features = Preprocessing(idf=None, normalize=False)
    if config.data.features == "bow":
        idf = None
        use_idf = config.data.tfidf
        if use_idf == "auto":
            use_idf = whole_number_values(train.X)
        if use_idf:
            idf = sklearn.feature_extraction.text.TfidfTransformer(norm=None, smooth_idf=True).fit(train.X).idf_
        features = Preprocessing(idf=idf, normalize=config.data.normalize)
    head = config.model.head
    clustered = head.group_size > 1 and head.grouping == "clustered"
    if head.type != "fixed-fanin" or not (clustered or head.dense_head_labels):
        return features
    # The dense head's labels (the most frequent) first, then the tail's, clustered or in id order.
    n_labels = train.n_labels
    n_dense = dense_label_count(head.dense_head_labels, n_labels) if head.dense_head_labels else 0
    by_frequency = np.argsort(-label_frequencies(train.Y), kind="stable")
    dense, tail = by_frequency[:n_dense], np.sort(by_frequency[n_dense:])
    if clustered:
        Y_tail = sp.csr_matrix(train.Y)[:, tail]
        tail = tail[clustered_label_order(features(train).X, Y_tail, head.group_size, config.train.seed)]
    return replace(features, label_order=np.concatenate([dense, tail]).astype(np.int64))


def whole_number_values(X: sp.spmatrix) -> bool:
    """True when every stored value of ``X`` is a whole number: binary or count features, which
    idf weighting turns into tf-idf, unlike features that are real-valued already."""
    values = sp.csr_matrix(X).data
    return bool(np.all(values == np.floor(values)))


def normalized_rows(data: XMCData) -> XMCData:
    """``data`` with its sparse feature rows scaled to unit L2 norm (empty rows stay empty)."""
    return replace(data, X=sklearn.preprocessing.normalize(data.X, norm="l2", copy=True))


def model_for(config: Config, n_features: int, n_labels: int, device: torch.device) -> XMCModel:
    """The model of ``config`` for ``n_features`` input features and ``n_labels`` labels, on ``device``."""
    model = build_model(config.model, n_features, n_labels, config.data.features)
    return model.to(device)


def with_absolute_data_paths(config: Config) -> Config:
    """``config`` with ``data.root`` and the paths in ``data.dataset`` made absolute (from the working
    directory), so that the config a run directory saves reads the same files from anywhere. A
    registry name stays a name (under the absolute root); a directory is taken where
    ``load_dataset`` finds it, as given or under the root; one found nowhere is left as written,
    for the loader's error to name."""
    data = config.data
    root = os.path.abspath(data.root)
    spec = data.dataset
    if isinstance(spec, dict):
        spec = {key: _absolute_paths(value) for key, value in spec.items()}
    elif spec not in REGISTRY:
        found = find_dataset_dir(spec, Path(root))
        if found is not None:
            spec = os.path.abspath(found)
    return replace(config, data=replace(data, dataset=spec, root=root))


def _absolute_paths(value: Any) -> Any:
    """A path, or a list of paths, made absolute; anything else is left for the loader to reject."""
    if isinstance(value, str):
        return os.path.abspath(value)
    if isinstance(value, list):
        return [_absolute_paths(item) for item in value]
    return value


def dataset_label_map(config: Config) -> Path | None:
    """The data set's label map, ``label_map.txt`` in its folder (for a mapping of paths, beside the
    training file), or None when it has none."""
    spec, root = config.data.dataset, Path(config.data.root)
    if isinstance(spec, dict):
        train = spec.get("train")
        first = train[0] if isinstance(train, list) and train else train
        folders = [Path(first).parent] if isinstance(first, str) else []
    elif spec in REGISTRY:
        # Dense features may come from the raw variant's folder (see load_dataset).
        folders = [dataset_dir(spec, root), dataset_dir(spec, root, "raw")]
    else:
        folders = [found] if (found := find_dataset_dir(spec, root)) is not None else []
    return next((folder / LABEL_MAP_FILE for folder in folders if (folder / LABEL_MAP_FILE).is_file()), None)


@dataclass(frozen=True)
class RunInputs:
    """What a run directory keeps so that prediction reads nothing else: the feature kind, the
    model's numbers of input features and labels, the preprocessing fitted on the training split
    and the data set's label map (its copy in the run directory), if the data set has one."""

    features: str
    n_features: int
    n_labels: int
    preprocess: Preprocessing
    label_map: Path | None


def save_run_inputs(run_dir: Path, config: Config, data: PreparedData) -> None:
    """Write ``preprocessing.json`` into ``run_dir``, with ``idf.npy`` and a copy of the data set's
    ``label_map.txt`` when there are such. The JSON file goes last, so that once it exists, the
    files it names are complete."""
    preprocess = data.preprocess
    if preprocess.idf is not None:
        with atomic_write(run_dir / IDF_FILE) as handle:
            np.save(handle, preprocess.idf)
    if preprocess.label_order is not None:
        with atomic_write(run_dir / LABEL_ORDER_FILE) as handle:
            np.save(handle, preprocess.label_order)
    if preprocess.implications is not None:
        preprocess.implications.save(run_dir / IMPLICATIONS_FILE)
    label_map = dataset_label_map(config)
    if label_map is not None:
        with open(label_map, "rb") as source, atomic_write(run_dir / LABEL_MAP_FILE) as target:
            shutil.copyfileobj(source, target)
    record = {
        "features": config.data.features,
        "n_features": data.train.n_features,
        "n_labels": data.train.n_labels,
        "normalize": preprocess.normalize,
        "idf": None if preprocess.idf is None else IDF_FILE,
        "label_map": None if label_map is None else LABEL_MAP_FILE,
        "label_order": None if preprocess.label_order is None else LABEL_ORDER_FILE,
        "label_implications": None if preprocess.implications is None else IMPLICATIONS_FILE,
    }
    write_json(run_dir / RUN_INPUTS_FILE, record)


def load_run_inputs(run_dir: Path) -> RunInputs:
    """Read what :func:`save_run_inputs` wrote; an error names the file and what was expected."""
    path = run_dir / RUN_INPUTS_FILE
    if not path.is_file():
        raise XMLSparseError(
            f"{path} is missing: the run directory predates the stored preprocessing; "
            f"`xmlsparse eval {run_dir}` stores it from the run's training data"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise XMLSparseError(f"{path}: not valid JSON ({error})") from None
    expected = {
        "features": ("bow or dense", lambda v: v in ("bow", "dense")),
        "n_features": ("a positive integer", _positive_int),
        "n_labels": ("a positive integer", _positive_int),
        "normalize": ("true or false", lambda v: isinstance(v, bool)),
        "idf": (f"null or {IDF_FILE!r}", lambda v: v in (None, IDF_FILE)),
        "label_map": (f"null or {LABEL_MAP_FILE!r}", lambda v: v in (None, LABEL_MAP_FILE)),
    }
    if not isinstance(record, dict):
        raise XMLSparseError(f"{path}: expected a JSON object with keys {', '.join(expected)}")
    for key, (what, valid) in expected.items():
        if key not in record:
            raise XMLSparseError(f"{path}: key {key!r} is missing, expected {what}")
        if not valid(record[key]):
            raise XMLSparseError(f"{path}: key {key!r} is {record[key]!r}, expected {what}")
    idf = None
    if record["idf"] is not None:
        idf_path = run_dir / IDF_FILE
        try:
            idf = np.load(idf_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise XMLSparseError(f"{idf_path}: cannot read the idf weights ({error})") from None
        if idf.shape != (record["n_features"],) or idf.dtype.kind != "f":
            raise XMLSparseError(
                f"{idf_path}: expected {record['n_features']} float idf weights, found {idf.dtype} of shape {idf.shape}"
            )
    label_map = None if record["label_map"] is None else run_dir / LABEL_MAP_FILE
    if label_map is not None and not label_map.is_file():
        raise XMLSparseError(f"{label_map} is missing, though {path} names it")
    return RunInputs(
        record["features"], record["n_features"], record["n_labels"],
        Preprocessing(idf=idf, normalize=record["normalize"], label_order=_load_label_order(run_dir, path, record),
                      implications=_load_implications(run_dir, path, record)),
        label_map,
    )


def _load_label_order(run_dir: Path, path: Path, record: dict[str, Any]) -> np.ndarray | None:
    """The stored order of clustered label groups (runs without one, older ones too, have none)."""
    name = record.get("label_order")
    if name is None:
        return None
    if name != LABEL_ORDER_FILE:
        raise XMLSparseError(f"{path}: key 'label_order' is {name!r}, expected null or {LABEL_ORDER_FILE!r}")
    order_path = run_dir / LABEL_ORDER_FILE
    try:
        order = np.load(order_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise XMLSparseError(f"{order_path}: cannot read the label order ({error})") from None
    n_labels = record["n_labels"]
    if order.shape != (n_labels,) or order.dtype.kind not in "iu" or not np.array_equal(np.sort(order), np.arange(n_labels)):
        raise XMLSparseError(f"{order_path}: expected an order of the {n_labels} label ids, found {order.dtype} {order.shape}")
    return order.astype(np.int64)


def _load_implications(run_dir: Path, path: Path, record: dict[str, Any]) -> LabelImplications | None:
    """The stored label implications (runs without ``eval.implications``, older ones too, have none)."""
    name = record.get("label_implications")
    if name is None:
        return None
    if name != IMPLICATIONS_FILE:
        raise XMLSparseError(f"{path}: key 'label_implications' is {name!r}, expected null or {IMPLICATIONS_FILE!r}")
    return LabelImplications.load(run_dir / IMPLICATIONS_FILE, record["n_labels"])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
