"""The registry of standard data sets and the resolution of a data set spec to its train and test splits.

A spec is a registry name (looked up under the data root), a directory in one of the layouts the field
uses, or a mapping of file paths. Shapes and propensity parameters are the published ones (see
SOURCES.md beside the data sets); mirrors are listed in the order a download should try them.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from xmlsparse.data.formats import (
    load_split,
    read_attentionxml,
    read_npz_pair,
    read_split_text,
    read_xc_text,
    with_npy_features,
)
from xmlsparse.data.types import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.metrics import DEFAULT_PROPENSITY

PECOS_URL = "https://archive.org/download/pecos-dataset/xmc-base/{name}.tar.gz"
DRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"

VARIANTS = ("bow", "raw")
FEATURE_KINDS = ("bow", "dense")

# What an installed data set directory holds, per variant (written by the download, checked by status).
INSTALLED_FILES = {
    "bow": ("X.trn.npz", "Y.trn.npz", "X.tst.npz", "Y.tst.npz"),
    "raw": ("train_raw_texts.txt", "Y.trn.npz", "test_raw_texts.txt", "Y.tst.npz"),
}
META_FILE = "meta.json"
DENSE_FEATURE_FILES = ("X.trn.npy", "X.tst.npy")

# Propensity parameters when a directory's meta.json does not give them (Jain et al., 2016).


@dataclass(frozen=True)
class ArchiveLayout:
    """Where the data files sit inside an archive, relative to the folder it extracts to.

    `format` is "npz" (train/test = features file, labels file), "xc-text" (one file each) or
    "raw-json" (one JSON-lines file each, raw text with label ids).
    """

    folder: str
    format: str
    train: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class Mirror:
    """One place to download a variant ("bow": features and labels, "raw": texts and labels) from."""

    url: str
    variant: str
    archive: str  # "tar.gz" | "zip": the suffix of the downloaded file
    layout: ArchiveLayout


@dataclass(frozen=True)
class DatasetInfo:
    """Published shapes and propensity constants (A, B) of a data set, and its mirrors in order of preference."""

    name: str
    n_features: int
    n_labels: int
    n_train: int
    n_test: int
    labels_per_point: float
    propensity_a: float
    propensity_b: float
    mirrors: tuple[Mirror, ...] = field(default=(), repr=False)

    def mirrors_for(self, variant: str) -> tuple[Mirror, ...]:
        return tuple(m for m in self.mirrors if m.variant == variant)


def _pecos_mirror(name: str) -> Mirror:
    layout = ArchiveLayout(
        folder=f"xmc-base/{name}",
        format="npz",
        train=("tfidf-attnxml/X.trn.npz", "Y.trn.npz"),
        test=("tfidf-attnxml/X.tst.npz", "Y.tst.npz"),
    )
    return Mirror(PECOS_URL.format(name=name), "bow", "tar.gz", layout)


def _drive_mirror(drive_id: str, variant: str, folder: str, train: str, test: str, fmt: str) -> Mirror:
    layout = ArchiveLayout(folder=folder, format=fmt, train=(train,), test=(test,))
    return Mirror(DRIVE_URL.format(id=drive_id), variant, "zip", layout)


def _xc_text_drive(drive_id: str, folder: str, prefix: str) -> Mirror:
    return _drive_mirror(drive_id, "bow", folder, f"{prefix}train.txt", f"{prefix}test.txt", "xc-text")


REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "eurlex-4k", 5_000, 3_993, 15_539, 3_809, 5.31, 0.55, 1.5,
            (_pecos_mirror("eurlex-4k"), _xc_text_drive("1xWW1UykQBTD2IorVn7V8XubJatQDScol", "Eurlex", "eurlex_")),
        ),
        DatasetInfo(
            "wiki10-31k", 101_938, 30_938, 14_146, 6_616, 18.64, 0.55, 1.5,
            (_pecos_mirror("wiki10-31k"), _xc_text_drive("1uV-p682ggXQQTiKZyK5M6B0xJJk8_lJx", "Wiki10", "wiki10_")),
        ),
        DatasetInfo(
            "amazoncat-13k", 203_882, 13_330, 1_186_239, 306_782, 5.04, 0.55, 1.5,
            (
                _pecos_mirror("amazoncat-13k"),
                _xc_text_drive("1WvBWF9hH5ZlFcpCRhp8wLVGwdeGZXKD2", "AmazonCat", "amazonCat_"),
            ),
        ),
        DatasetInfo(
            "amazon-670k", 135_909, 670_091, 490_449, 153_025, 5.45, 0.6, 2.6,
            (
                _pecos_mirror("amazon-670k"),
                _xc_text_drive("1PV-wbKVv6Ng1K1XM1USqNxFhaQo2qfk6", "Amazon", "amazon_"),
                _drive_mirror(
                    "1WAzs7qfLY8ZoluHbY55WyakhibW27kS2", "raw", "Amazon-670K.raw",
                    "trn.raw.json.gz", "tst.raw.json.gz", "raw-json",
                ),
            ),
        ),
        DatasetInfo(
            "wiki-500k", 2_381_304, 501_070, 1_813_391, 783_743, 4.77, 0.5, 0.4,
            (
                _pecos_mirror("wiki-500k"),
                _xc_text_drive("1LkGdINF5coOfkm6J2xys3V1NMW7zz8U1", "WikipediaLarge-500K", "WikipediaLarge-500K_"),
            ),
        ),
        DatasetInfo(
            "amazon-3m", 337_067, 2_812_281, 1_717_899, 742_507, 36.17, 0.6, 2.6,
            (
                _pecos_mirror("amazon-3m"),
                _xc_text_drive("1ork7yeAcliD9JQiRdEx4QknhMFHjVrku", "Amazon-3M", "amazon-3M_"),
            ),
        ),
        DatasetInfo(
            "lf-amazontitles-131k", 40_000, 131_073, 294_805, 134_835, 2.29, 0.6, 2.6,
            (_xc_text_drive("1VlfcdJKJA99223fLEawRmrXhXpwjwJKn", "LF-AmazonTitles-131K", ""),),
        ),
    )
}


# ---------------------------------------------------------------------------------------------------
# Directory layouts


@dataclass(frozen=True)
class SplitFiles:
    """The files of one recognised layout: `format` is npz | xc-text | split-text | attentionxml."""

    format: str
    train: tuple[Path, ...]
    test: tuple[Path, ...]


def _layout_candidates(directory: Path) -> list[SplitFiles]:
    """Every layout that the directory could hold, most specific first (files may not exist)."""
    d = directory
    candidates = [
        SplitFiles("npz", (d / "X.trn.npz", d / "Y.trn.npz"), (d / "X.tst.npz", d / "Y.tst.npz")),
        SplitFiles(
            "npz",
            (d / "tfidf-attnxml" / "X.trn.npz", d / "Y.trn.npz"),
            (d / "tfidf-attnxml" / "X.tst.npz", d / "Y.tst.npz"),
        ),
        SplitFiles("xc-text", (d / "train.txt",), (d / "test.txt",)),
    ]
    prefixed_train = sorted(d.glob("*_train.txt"))
    prefixed_test = sorted(d.glob("*_test.txt"))
    for found in (prefixed_train, prefixed_test):
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise XMLSparseError(f"{d}: several candidate split files ({names}); expected exactly one")
    if prefixed_train or prefixed_test:
        train = prefixed_train[0] if prefixed_train else d / "<prefix>_train.txt"
        test = prefixed_test[0] if prefixed_test else d / "<prefix>_test.txt"
        candidates.append(SplitFiles("xc-text", (train,), (test,)))
    candidates += [
        SplitFiles("split-text", (d / "trn_X_Xf.txt", d / "trn_X_Y.txt"), (d / "tst_X_Xf.txt", d / "tst_X_Y.txt")),
        SplitFiles(
            "attentionxml",
            (d / "train_texts.txt", d / "train_labels.txt"),
            (d / "test_texts.txt", d / "test_labels.txt"),
        ),
    ]
    return candidates


def find_layout(directory: Path) -> SplitFiles | None:
    """The first complete layout in `directory`, or None."""
    for candidate in _layout_candidates(directory):
        if all(p.is_file() for p in candidate.train + candidate.test):
            return candidate
    return None


def _missing_layout_message(directory: Path) -> str:
    partial = []
    for candidate in _layout_candidates(directory):
        files = candidate.train + candidate.test
        present = [p.name for p in files if p.is_file()]
        if present:
            missing = [str(p.relative_to(directory)) for p in files if not p.is_file()]
            partial.append(f"has {', '.join(present)} but lacks {', '.join(missing)}")
    if partial:
        return f"{directory}: incomplete data set: " + "; ".join(partial)
    return (
        f"{directory}: no data set layout found; expected one of X.trn.npz+Y.trn.npz+X.tst.npz+Y.tst.npz, "
        "tfidf-attnxml/X.{trn,tst}.npz+Y.{trn,tst}.npz, train.txt+test.txt, *_train.txt+*_test.txt, "
        "trn_X_Xf.txt+trn_X_Y.txt+tst_X_Xf.txt+tst_X_Y.txt, train_texts.txt+train_labels.txt+test_texts.txt+"
        "test_labels.txt"
    )


def read_splits(files: SplitFiles, cached: bool = True) -> tuple[XMCData, XMCData]:
    """Read train and test of a layout; `cached` goes through the parse cache next to the sources."""
    if cached:
        return load_split(list(files.train)), load_split(list(files.test))
    if files.format == "attentionxml":
        # The test split must share the train split's label ids and vocabulary.
        train, label_map, vectorizer = read_attentionxml(*files.train)
        test, _, _ = read_attentionxml(*files.test, label_map=label_map, vectorizer=vectorizer)
        return train, test
    readers = {"npz": read_npz_pair, "xc-text": read_xc_text, "split-text": read_split_text}
    read = readers[files.format]
    return read(*files.train), read(*files.test)


# ---------------------------------------------------------------------------------------------------
# Loading


def dataset_dir(name: str, root: Path = Path("data"), variant: str = "bow") -> Path:
    """Where a registry data set is installed: root/<name> (BoW) or root/<name>-raw (raw text)."""
    return Path(root) / (name if variant == "bow" else f"{name}-{variant}")


def dataset_status(name: str, root: Path = Path("data"), variant: str = "bow") -> str:
    """Whether the converted files of the variant exist under root: "present" or "missing"."""
    directory = dataset_dir(name, root, variant)
    return "present" if all((directory / f).is_file() for f in INSTALLED_FILES[variant]) else "missing"


def download_command(name: str, root: Path = Path("data"), variant: str = "bow") -> str:
    """The command line that installs a registry data set under root."""
    command = f"xmlsparse download-dataset {name}"
    if Path(root) != Path("data"):
        command += f" --root {root}"
    if variant != "bow":
        command += f" --variant {variant}"
    return command


class _LoadedSplit(NamedTuple):
    """A split and the files its features and its labels came from (one file for XC text)."""

    data: XMCData
    features_file: Path
    labels_file: Path


def find_dataset_dir(spec: str | Path, root: Path) -> Path | None:
    """The folder a data set named by a path is read from: ``spec`` as given, else under ``root``;
    None when neither is a folder."""
    return next((folder for folder in (Path(spec), Path(root) / spec) if folder.is_dir()), None)


def load_dataset(
    spec: str | Path | Mapping, root: Path = Path("data"), features: str = "bow"
) -> tuple[XMCData, XMCData, DatasetInfo | None]:
    """Resolve a registry name, directory or mapping of paths to (train, test, info).

    The test split comes back with the training split's numbers of features and labels, since the
    model is sized by train. The rule is about ids, not declared counts: a test split that declares
    other counts (a header, a matrix's width) but whose feature and label ids all lie below train's
    counts is read with train's counts, and a warning says so; an id at or beyond train's count is
    an error naming the test file, both counts and the first point that uses it. Dense feature rows
    have no ids: their widths must be equal.
    """
    if features not in FEATURE_KINDS:
        raise XMLSparseError(f"features {features!r}: expected one of {', '.join(FEATURE_KINDS)}")
    root = Path(root)
    text = str(spec)
    info: DatasetInfo | None = None
    if isinstance(spec, Mapping):
        train, test = _load_mapping(spec, features)
    elif isinstance(spec, str) and text in REGISTRY:
        info = REGISTRY[text]
        train, test = _load_registry(info, root, features)
    else:
        directory = find_dataset_dir(text, root)
        if directory is None:
            raise XMLSparseError(
                f"data set {text!r} is neither a registry name ({', '.join(REGISTRY)}) nor a directory "
                f"(looked for {Path(text)} and {root / text})"
            )
        train, test = _load_directory(directory, features)
        info = _info_from_meta(directory, train.data, test.data)
    return train.data, _fit_test_to_train(train, test), info


def _fit_test_to_train(train: _LoadedSplit, test: _LoadedSplit) -> XMCData:
    """The test split with the training split's numbers of features and labels (the rule: load_dataset)."""
    data = test.data
    if isinstance(data.X, np.ndarray):
        if data.X.shape[1] != train.data.X.shape[1]:
            raise XMLSparseError(
                f"{test.features_file}: test feature rows have {data.X.shape[1]} columns but the training rows "
                f"({train.features_file}) have {train.data.X.shape[1]}; expected the same width"
            )
        X = data.X
    else:
        X = _fit_columns(data.X, data.n_features, test.features_file, train.data.n_features, train.features_file,
                         "feature")
    Y = _fit_columns(data.Y, data.n_labels, test.labels_file, train.data.n_labels, train.labels_file, "label")
    if X is data.X and Y is data.Y:
        return data
    return XMCData(X=X, Y=Y, n_features=train.data.n_features, n_labels=train.data.n_labels)


def _fit_columns(
    matrix: sp.csr_matrix, declared: int, path: Path, train_count: int, train_path: Path, kind: str
) -> sp.csr_matrix:
    """`matrix` ([points, declared] ids of one kind) with train_count columns; the rule: load_dataset."""
    if declared == train_count:
        return matrix
    beyond = np.flatnonzero(matrix.indices >= train_count)
    if beyond.size:
        # CSR stores rows in order: the first stored entry beyond train's range is in the first such point
        row = int(np.searchsorted(matrix.indptr, beyond[0], side="right")) - 1
        where = f"row {row} (counting from 0)" if path.suffix in (".npz", ".npy") else f"line {row + 2}"
        raise XMLSparseError(
            f"{path}: the test split has {declared} {kind}s but the training split ({train_path}) has {train_count}, "
            f"and {where} uses {kind} id {matrix.indices[beyond[0]]}; expected {kind} ids below {train_count}"
        )
    warnings.warn(
        f"{path}: the test split declares {declared} {kind}s and the training split ({train_path}) {train_count}; "
        f"its {kind} ids all lie below {train_count}, so it is read with {train_count} {kind}s",
        stacklevel=4,
    )
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(matrix.shape[0], train_count))


def _load_registry(info: DatasetInfo, root: Path, features: str) -> tuple[_LoadedSplit, _LoadedSplit]:
    directory = dataset_dir(info.name, root)
    if features == "dense":
        # Embeddings of the raw texts sit beside their labels in the raw variant's directory.
        for candidate in (directory, dataset_dir(info.name, root, "raw")):
            if all((candidate / f).is_file() for f in DENSE_FEATURE_FILES):
                return _load_directory(candidate, features)
        raise XMLSparseError(
            f"{info.name}: dense features expected as {' and '.join(DENSE_FEATURE_FILES)} in {directory} or "
            f"{dataset_dir(info.name, root, 'raw')}; get the raw texts to embed with: "
            f"{download_command(info.name, root, 'raw')}"
        )
    if dataset_status(info.name, root) != "present" and find_layout(directory) is None:
        raise XMLSparseError(
            f"data set {info.name} is not in {directory}; fetch it with: {download_command(info.name, root)}"
        )
    return _load_directory(directory, features)


def _load_directory(directory: Path, features: str) -> tuple[_LoadedSplit, _LoadedSplit]:
    layout = find_layout(directory)
    if features == "bow":
        if layout is None:
            if (directory / DENSE_FEATURE_FILES[0]).is_file():
                raise XMLSparseError(
                    f"{directory}: holds dense features {DENSE_FEATURE_FILES[0]} but no BoW features; "
                    "set features to dense"
                )
            raise XMLSparseError(_missing_layout_message(directory))
        train, test = read_splits(layout)
        return (
            _LoadedSplit(train, layout.train[0], layout.train[-1]),
            _LoadedSplit(test, layout.test[0], layout.test[-1]),
        )
    splits = []
    for split, features_file in zip(("trn", "tst"), DENSE_FEATURE_FILES):
        features_path = directory / features_file
        if not features_path.is_file():
            raise XMLSparseError(f"{directory}: features=dense expects {features_file}, which is missing")
        labels_path = directory / f"Y.{split}.npz"
        if labels_path.is_file():
            splits.append(_LoadedSplit(read_npz_pair(features_path, labels_path), features_path, labels_path))
        elif layout is not None:
            files = layout.train if split == "trn" else layout.test
            data = with_npy_features(load_split(list(files)), features_path, files[-1])
            splits.append(_LoadedSplit(data, features_path, files[-1]))
        else:
            raise XMLSparseError(
                f"{directory}: {features_file} found but no labels ({labels_path.name} or a text layout)"
            )
    return splits[0], splits[1]


_MAPPING_KEYS = ("train", "test", "train_features", "test_features")


def _mapping_paths(spec: Mapping, key: str) -> list[Path]:
    value = spec[key]
    values = value if isinstance(value, (list, tuple)) else [value]
    paths = [Path(v) for v in values]
    for path in paths:
        if not path.exists():
            raise XMLSparseError(f"dataset mapping key {key!r}: {path} does not exist")
    return paths


def _load_mapping(spec: Mapping, features: str) -> tuple[_LoadedSplit, _LoadedSplit]:
    for key in spec:
        if key not in _MAPPING_KEYS:
            raise XMLSparseError(f"dataset mapping: unknown key {key!r}; expected {', '.join(_MAPPING_KEYS)}")
    needed = _MAPPING_KEYS if features == "dense" else _MAPPING_KEYS[:2]
    for key in needed:
        if key not in spec:
            raise XMLSparseError(f"dataset mapping: key {key!r} is missing (features={features})")
    if features == "bow" and ("train_features" in spec or "test_features" in spec):
        raise XMLSparseError(
            "dataset mapping names train_features/test_features but features is 'bow'; set it to dense"
        )
    splits = []
    for split in ("train", "test"):
        paths = _mapping_paths(spec, split)
        data = load_split(paths[0] if len(paths) == 1 else paths)
        features_path = paths[0]
        if features == "dense":
            (features_path,) = _mapping_paths(spec, f"{split}_features")
            data = with_npy_features(data, features_path, paths[-1])
        splits.append(_LoadedSplit(data, features_path, paths[-1]))
    return splits[0], splits[1]


def _meta_number(meta: dict, keys: tuple[str, ...], default: float, path: Path) -> float:
    for key in keys:
        if key in meta:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise XMLSparseError(f"{path}: key {key!r} is {value!r}, expected a number")
            return float(value)
    return default


def _read_meta(directory: Path) -> dict | None:
    """The directory's meta.json as a dict, or None when there is none."""
    path = directory / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise XMLSparseError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise XMLSparseError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _info_from_meta(directory: Path, train: XMCData, test: XMCData) -> DatasetInfo | None:
    """Info for a directory that carries a meta.json: its name and A/B, the shapes of the loaded data."""
    meta = _read_meta(directory)
    if meta is None:
        return None
    path = directory / META_FILE
    name = str(meta.get("name", directory.name))
    known = REGISTRY.get(name)
    default_a = known.propensity_a if known else DEFAULT_PROPENSITY[0]
    default_b = known.propensity_b if known else DEFAULT_PROPENSITY[1]
    return DatasetInfo(
        name=name,
        n_features=int(train.n_features),
        n_labels=int(train.n_labels),
        n_train=int(train.n_points),
        n_test=int(test.n_points),
        labels_per_point=round(train.Y.nnz / max(train.n_points, 1), 2),
        propensity_a=_meta_number(meta, ("A", "propensity_a"), default_a, path),
        propensity_b=_meta_number(meta, ("B", "propensity_b"), default_b, path),
        mirrors=known.mirrors if known else (),
    )


# ---------------------------------------------------------------------------------------------------
# Listing


def dataset_rows(root: Path = Path("data")) -> list[dict]:
    """One row per registry data set for `xmlsparse datasets`: shapes, A/B and whether it is installed."""
    return [
        {
            "name": info.name,
            "n_train": info.n_train,
            "n_test": info.n_test,
            "n_features": info.n_features,
            "n_labels": info.n_labels,
            "labels_per_point": info.labels_per_point,
            "propensity_a": info.propensity_a,
            "propensity_b": info.propensity_b,
            "status": dataset_status(info.name, root),
        }
        for info in REGISTRY.values()
    ]


def format_dataset_rows(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    header = ("name", "train", "test", "features", "labels", "labels/point", "A", "B", "status")
    cells = [header] + [
        (
            row["name"],
            f"{row['n_train']:,}",
            f"{row['n_test']:,}",
            f"{row['n_features']:,}",
            f"{row['n_labels']:,}",
            f"{row['labels_per_point']:.2f}",
            f"{row['propensity_a']:g}",
            f"{row['propensity_b']:g}",
            row["status"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = []
    for line in cells:
        parts = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:-1], widths[1:-1])] + [line[-1]]
        lines.append("  ".join(parts))
    return "\n".join(lines)
