"""Synthetic extreme multi-label data sets with the statistics of the real ones.

Labels have power-law (Zipf-like) frequencies and come in topics: groups of
labels of similar popularity that a point draws most of its labels from. The
features carry the labels' signal, so that a linear model learns them:

- dense: the sum of the point's label embeddings (its topic's centre plus a
  label-specific direction) and Gaussian noise, L2-normalised rows;
- bow: words from the point's topics and labels mixed with Zipf background
  words, sublinear tf-idf weighted (train document frequencies), L2-normalised.

Points are drawn in blocks of ``BLOCK_POINTS``, each block from its own random
stream derived from the seed, and streamed to disk, so that a set of the full
size of Amazon-670K (or larger) is written in bounded memory and the files
depend on the arguments only. What memory remains grows with the labels (the
label and feature models) and the points (row counts); ``estimate_footprint``
adds it up with the disk the files take, and ``generate`` refuses a shape that
does not fit the free disk or the available memory before it writes anything.

Output layout (the synthetic/PECOS layout that ``load_dataset`` reads):
``X.trn.npy`` (dense) or ``X.trn.npz`` (bow CSR), ``Y.trn.npz`` (label CSR),
the same for ``tst``, and ``meta.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from xmlsparse.data import storage
from xmlsparse.errors import XMLSparseError
from xmlsparse.outputs import check_output_dir, nearest_existing
from xmlsparse.metrics import DEFAULT_PROPENSITY

BLOCK_POINTS = 8192
DEFAULT_DIM = 768

# Label model. Topics hold labels of consecutive popularity ranks, so that
# drawing a topic by its total popularity and then labels within it keeps each
# label's overall frequency close to its Zipf weight.
LABEL_EXPONENT = 0.75
TOPIC_SIZE = 64
# Share of a point's labels drawn from the whole label space instead of its topic:
# head labels then co-occur with labels of every topic, as in real data.
GLOBAL_LABEL_FRACTION = 0.25

# Dense features: label embedding = topic centre + a label-specific direction,
# the signed mean of a few random atoms (no L x d table is ever held).
N_ATOMS = 4096
ATOMS_PER_LABEL = 8
# Each of a point's labels adds its topic centre; a weight below 1 keeps the
# shared centre from drowning the label-specific directions.
TOPIC_WEIGHT = 0.5
# Noise per coordinate relative to the norm of the point's signal: the same
# per-direction signal-to-noise ratio at every width (noise norm 2x the
# signal's at d = 768, 0.8x at d = 128).
NOISE_SCALE = 0.072

# Bag-of-words features.
WORD_EXPONENT = 1.0
DOC_TOKENS = 80
TOPIC_WORDS = 16
LABEL_WORDS = 4
TOPIC_TOKEN_SHARE = 0.15
LABEL_TOKEN_SHARE = 0.1

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed so that the same arguments give byte-identical files


@dataclass(frozen=True)
class SyntheticShape:
    """Sizes and propensity constants of one synthetic set."""

    name: str
    like: str | None
    scale: float
    n_train: int
    n_test: int
    n_labels: int
    n_features: int
    labels_per_point: float
    propensity_a: float
    propensity_b: float
    features: str  # "dense": n_features is the width of the rows; "bow": the vocabulary size


@dataclass(frozen=True)
class Preset:
    n_features: int
    n_labels: int
    n_train: int
    n_test: int
    labels_per_point: float
    propensity_a: float
    propensity_b: float
    dim: int


# Shapes that are not real data sets. "quickstart" trains in seconds on a CPU.
PRESETS: dict[str, Preset] = {
    "quickstart": Preset(
        n_features=5000, n_labels=2000, n_train=4000, n_test=1000, labels_per_point=5.45,
        propensity_a=DEFAULT_PROPENSITY[0], propensity_b=DEFAULT_PROPENSITY[1], dim=128,
    ),
}


def resolve_shape(
    like: str | None = None,
    scale: float = 1.0,
    n_train: int | None = None,
    n_test: int | None = None,
    n_labels: int | None = None,
    n_features: int | None = None,
    labels_per_point: float | None = None,
    features: str = "dense",
    dim: int | None = None,
) -> SyntheticShape:
    """Sizes of a set: those of ``like`` (a preset or registry name) times ``scale``, then explicit overrides."""
    if features not in ("dense", "bow"):
        raise XMLSparseError(f"features must be 'dense' or 'bow', got {features!r}")
    if not scale > 0:
        raise XMLSparseError(f"scale must be positive, got {scale!r}")
    if like is None and scale != 1.0:
        raise XMLSparseError(f"scale={scale} multiplies the sizes of a data set named by 'like', and none is given")
    propensity = DEFAULT_PROPENSITY
    default_dim = DEFAULT_DIM
    if like is not None:
        base = _like_sizes(like)
        propensity = (base.propensity_a, base.propensity_b)
        default_dim = getattr(base, "dim", DEFAULT_DIM)
        n_train = n_train if n_train is not None else max(1, round(base.n_train * scale))
        n_test = n_test if n_test is not None else max(1, round(base.n_test * scale))
        n_labels = n_labels if n_labels is not None else max(1, round(base.n_labels * scale))
        if features == "bow" and n_features is None:
            n_features = base.n_features
        if labels_per_point is None:
            labels_per_point = base.labels_per_point
    if features == "dense":
        dim = default_dim if dim is None else dim
        if n_features is not None and n_features != dim:
            raise XMLSparseError(
                f"n_features={n_features} applies to bow features; dense features have dim={dim} columns"
            )
        if int(dim) != dim or dim < 1:
            raise XMLSparseError(f"dim must be a positive integer, got {dim!r}")
        n_features = dim
    elif dim is not None:
        raise XMLSparseError(f"dim={dim} applies to dense features; bow features have n_features columns")
    sizes = {"n_train": n_train, "n_test": n_test, "n_labels": n_labels, "n_features": n_features}
    for key, value in sizes.items():
        if value is None:
            raise XMLSparseError(f"{key} is required when no data set to imitate ('like') is given")
        if int(value) != value or value < 1:
            raise XMLSparseError(f"{key} must be a positive integer, got {value!r}")
    if labels_per_point is None:
        raise XMLSparseError("labels_per_point is required when no data set to imitate ('like') is given")
    if not 1.0 <= labels_per_point <= n_labels:
        raise XMLSparseError(f"labels_per_point must lie in [1, n_labels={n_labels}], got {labels_per_point!r}")
    return SyntheticShape(
        name=f"synthetic-{like}" if like else "synthetic",
        like=like,
        scale=float(scale),
        n_train=int(n_train),
        n_test=int(n_test),
        n_labels=int(n_labels),
        n_features=int(n_features),
        labels_per_point=float(labels_per_point),
        propensity_a=float(propensity[0]),
        propensity_b=float(propensity[1]),
        features=features,
    )


def generate(
    out_dir: str | Path,
    like: str | None = None,
    scale: float = 1.0,
    n_train: int | None = None,
    n_test: int | None = None,
    n_labels: int | None = None,
    n_features: int | None = None,
    labels_per_point: float | None = None,
    features: str = "dense",
    dim: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a synthetic train/test pair into ``out_dir`` and return it.

    ``like`` names a preset (``PRESETS``) or a registry data set whose sizes are
    taken times ``scale`` (points and labels; the vocabulary and labels per
    point stay); explicit sizes override them. ``dim`` is the width of dense
    features (768, or the preset's). The same arguments give byte-identical files.

    Raises XMLSparseError before anything is written when ``out_dir`` cannot be
    written or the set would not fit the free disk or the available memory, and
    when writing fails; ``out_dir`` then holds what it held before (folders this
    call created are removed). ``progress`` receives the size estimate.
    """
    shape = resolve_shape(like, scale, n_train, n_test, n_labels, n_features, labels_per_point, features, dim)
    out = Path(out_dir)
    check_output_dir(out, "output folder")
    footprint = check_room(shape, out)
    if progress is not None:
        progress(
            f"writing {describe_shape(shape)}: about {storage.format_bytes(footprint.output_bytes)} of files, "
            f"{storage.format_bytes(footprint.memory_bytes)} of memory"
        )
    # Built before the folder is touched: an interrupt while the models grow leaves nothing to clean up.
    models = _build_models(shape, seed)
    with storage.created_folder(out, "output folder"):
        staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=out))
        try:
            with tqdm(
                total=shape.n_train + shape.n_test, unit="points", unit_scale=True, desc=shape.name,
                disable=not sys.stderr.isatty(), leave=False,
            ) as bar:
                names = _write_splits(shape, seed, models, staging, bar)
            for name in names:  # meta.json comes last: its presence marks a complete set
                os.replace(staging / name, out / name)
        except OSError as err:  # a full disk or a folder changed under us: one line, not a traceback
            raise XMLSparseError(f"writing the synthetic set into {out} failed: {err.strerror or err}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    stale_suffix = ".npz" if shape.features == "dense" else ".npy"
    for split in ("trn", "tst"):  # a feature file of the other kind would be ambiguous to readers
        (out / f"X.{split}{stale_suffix}").unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class Footprint:
    """What ``generate`` needs for a shape, in bytes."""

    output_bytes: int  # the finished files
    disk_bytes: int  # the peak on disk: the finished files and the staging files beside them
    memory_bytes: int  # the peak growth of the process's memory


def estimate_footprint(shape: SyntheticShape) -> Footprint:
    """Disk and memory that ``generate`` needs for ``shape``, summed from the arrays it allocates.

    Memory follows the largest of three phases: building the label model, building the feature
    model, and writing (both models, one block's arrays, and the per-point row counts kept to
    assemble a CSR file). The byte counts per element add up the arrays alive together at each
    phase's peak; tests/data/test_synthetic.py checks the estimate against a measured peak.
    """
    n_points = shape.n_train + shape.n_test
    largest_split = max(shape.n_train, shape.n_test)
    n_labels = shape.n_labels
    per_point = shape.labels_per_point
    block = min(BLOCK_POINTS, largest_split)
    topic_size = min(TOPIC_SIZE, n_labels)
    n_topics = -(-n_labels // topic_size)
    # CSR files: a 4-byte index and a 4-byte value per entry, 8-byte row pointers. The raw
    # staging files hold the entries once more until the set is complete.
    label_entries = n_points * per_point  # an upper bound: repeated draws are dropped
    output = 8 * label_entries + 8 * (n_points + 2)
    staging = 8 * label_entries
    # Label model: 24 bytes per label kept (cdf, topic ids and weights); 56 while it is built.
    label_model = 24 * n_labels
    build_labels = 56 * n_labels
    # A block's label draws: Gumbel keys, their order and the ranked ids of a topic per point.
    block_arrays = block * (48 * topic_size + 64 * per_point)
    # One split's row counts: kept per block, concatenated and summed into row pointers.
    rows = 40 * largest_split
    if shape.features == "dense":
        width = shape.n_features
        output += 4 * n_points * width
        basis = 4 * (n_topics + N_ATOMS) * width
        entries = ATOMS_PER_LABEL + 1  # a label's loadings: its topic centre and its atoms
        # int64 atom ids, their sorted copy, columns and order, float32 signs and values
        build_features = label_model + basis + 48 * entries * n_labels
        models = label_model + basis + (8 * entries + 8) * n_labels
        # the block's loadings product, then signal, noise and norms of B x d float32
        block_arrays += block * (24 * entries * per_point + 12 * width)
    else:
        vocabulary = shape.n_features
        word_entries = n_points * DOC_TOKENS  # a point's distinct words are at most its tokens
        output += 8 * word_entries + 8 * (n_points + 2)
        staging += 8 * word_entries
        # word weights, ids and cdfs (44 per word); topic and label words drawn as float64/int64
        build_features = label_model + 44 * vocabulary + 100 * n_labels
        # background cdf, document frequencies and a block's count of them; label words
        models = label_model + 24 * vocabulary + 17 * n_labels
        block_arrays += block * DOC_TOKENS * 64  # per token: rows, sources, words, pair keys, sort
        rows += 8 * n_points  # the feature row counts of both splits wait for the idf
    arrays = max(build_labels, build_features, models + block_arrays + rows)
    # The process grows past the arrays counted: by up to 5% in sort buffers and sparse-product
    # scratch (measured at 4M labels), and by a block's arrays that the allocator keeps while the
    # next block allocates.
    memory = 1.1 * arrays + block_arrays
    return Footprint(int(output), int(output + staging), int(memory))


def describe_shape(shape: SyntheticShape) -> str:
    """The name and sizes of ``shape`` on one line, as messages give them."""
    scaled = f" at scale {shape.scale:g}" if shape.like is not None and shape.scale != 1.0 else ""
    return (
        f"{shape.name}{scaled} ({shape.n_train:,} train and {shape.n_test:,} test points, {shape.n_labels:,} labels, "
        f"{shape.n_features:,} {shape.features} features)"
    )


def check_room(shape: SyntheticShape, out_dir: Path) -> Footprint:
    """``shape``'s footprint; raises when it exceeds the free disk at ``out_dir`` or the available memory."""
    need = estimate_footprint(shape)
    free_disk = storage.free_disk_bytes(out_dir)
    free_memory = storage.available_memory_bytes()
    short = []
    if need.disk_bytes > free_disk:
        short.append(
            f"about {storage.format_bytes(need.disk_bytes)} of disk, but {storage.format_bytes(free_disk)} "
            f"are free at {nearest_existing(out_dir)}"
        )
    if free_memory is not None and need.memory_bytes > free_memory:
        short.append(
            f"about {storage.format_bytes(need.memory_bytes)} of memory, but "
            f"{storage.format_bytes(free_memory)} are available"
        )
    if short:
        raise XMLSparseError(
            f"{describe_shape(shape)} needs " + " and ".join(short) + "; lower the scale or the sizes"
        )
    return need


def _like_sizes(like: str):
    """The preset or registry entry named ``like`` (both have the size and propensity fields)."""
    if like in PRESETS:
        return PRESETS[like]
    from xmlsparse.data.datasets import REGISTRY  # only needed to imitate a real set; it pulls in the readers

    if like not in REGISTRY:
        known = ", ".join(sorted([*PRESETS, *REGISTRY]))
        raise XMLSparseError(f"unknown data set to imitate: like={like!r}; known: {known}")
    return REGISTRY[like]


# ---------------------------------------------------------------- generation model


@dataclass
class _LabelModel:
    n_labels: int
    label_cdf: np.ndarray  # float64 [L] cumulative Zipf weight in label-id order
    label_topic: np.ndarray  # int32 [L]
    topic_labels: np.ndarray  # int32 [T, S] label ids, -1 pads the last topic
    topic_log_weight: np.ndarray  # float64 [T, S] log Zipf weight, -inf on pads
    topic_cdf: np.ndarray  # float64 [T] cumulative total weight of topics


def _label_model(n_labels: int, rng: np.random.Generator) -> _LabelModel:
    weight_by_rank = np.arange(1, n_labels + 1, dtype=np.float64) ** -LABEL_EXPONENT
    label_of_rank = rng.permutation(n_labels).astype(np.int32)  # ids carry no popularity order
    weight = np.empty(n_labels)
    weight[label_of_rank] = weight_by_rank
    topic_size = min(TOPIC_SIZE, n_labels)
    n_topics = -(-n_labels // topic_size)
    pad = n_topics * topic_size - n_labels
    topic_labels = np.concatenate([label_of_rank, np.full(pad, -1, np.int32)]).reshape(n_topics, topic_size)
    with np.errstate(divide="ignore"):
        topic_log_weight = np.log(np.concatenate([weight_by_rank, np.zeros(pad)])).reshape(n_topics, topic_size)
    label_topic = np.empty(n_labels, np.int32)
    label_topic[label_of_rank] = np.arange(n_labels, dtype=np.int32) // topic_size
    return _LabelModel(
        n_labels=n_labels,
        label_cdf=np.cumsum(weight),
        label_topic=label_topic,
        topic_labels=topic_labels,
        topic_log_weight=topic_log_weight,
        topic_cdf=np.cumsum(np.exp(topic_log_weight).sum(axis=1)),
    )


def _sample_cdf(cdf: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    picks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return np.minimum(picks, len(cdf) - 1)


def _draw_labels(model: _LabelModel, rng: np.random.Generator, n_points: int, mean: float) -> sp.csr_matrix:
    """Label rows of a block: a topic, labels within it by weight (no repeats), plus global draws."""
    n_point_labels = 1 + rng.poisson(mean - 1.0, n_points)
    n_global = rng.binomial(n_point_labels, GLOBAL_LABEL_FRACTION)
    n_in_topic = n_point_labels - n_global
    topics = _sample_cdf(model.topic_cdf, rng, n_points)
    # Gumbel top-k: the k largest perturbed log weights are a weighted draw without replacement.
    keys = model.topic_log_weight[topics] + rng.gumbel(size=(n_points, model.topic_labels.shape[1]))
    order = np.argsort(-keys, axis=1, kind="stable")
    ranked = np.take_along_axis(model.topic_labels[topics], order, axis=1)
    keep = (np.arange(ranked.shape[1]) < n_in_topic[:, None]) & (ranked >= 0)
    rows = np.concatenate([np.nonzero(keep)[0], np.repeat(np.arange(n_points), n_global)])
    labels = np.concatenate([ranked[keep], _sample_cdf(model.label_cdf, rng, int(n_global.sum()))])
    pairs = np.unique(rows.astype(np.int64) * model.n_labels + labels)  # drop repeats, sort by (row, label)
    counts = np.bincount(pairs // model.n_labels, minlength=n_points)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = (pairs % model.n_labels).astype(np.int32)
    return sp.csr_matrix(
        (np.ones(len(indices), np.float32), indices, indptr), shape=(n_points, model.n_labels)
    )


@dataclass
class _DenseModel:
    loadings: sp.csr_matrix  # float32 [L, T + A]: each label's weights on topic centres and atoms
    basis: np.ndarray  # float32 [T + A, d]: topic centres, then atoms


def _dense_model(labels: _LabelModel, dim: int, rng: np.random.Generator) -> _DenseModel:
    n_topics = labels.topic_labels.shape[0]
    n_atoms = N_ATOMS
    per_label = ATOMS_PER_LABEL
    basis = rng.standard_normal((n_topics + n_atoms, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    atoms = n_topics + _distinct_atoms(rng, labels.n_labels, per_label)
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=atoms.shape) / np.float32(np.sqrt(per_label))
    columns = np.concatenate([labels.label_topic[:, None], atoms], axis=1)
    values = np.concatenate([np.full((labels.n_labels, 1), TOPIC_WEIGHT, np.float32), signs], axis=1)
    order = np.argsort(columns, axis=1, kind="stable")
    loadings = sp.csr_matrix(
        (
            np.take_along_axis(values, order, axis=1).ravel(),
            np.take_along_axis(columns, order, axis=1).ravel().astype(np.int32),
            np.arange(0, columns.size + 1, columns.shape[1]),
        ),
        shape=(labels.n_labels, n_topics + n_atoms),
    )
    return _DenseModel(loadings=loadings, basis=basis)


def _distinct_atoms(rng: np.random.Generator, n_labels: int, per_label: int) -> np.ndarray:
    """``per_label`` distinct atom ids per label, without an L x N_ATOMS table."""
    atoms = rng.integers(0, N_ATOMS, size=(n_labels, per_label))
    while True:
        ordered = np.sort(atoms, axis=1)
        clash = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
        if len(clash) == 0:
            return atoms
        atoms[clash] = rng.integers(0, N_ATOMS, size=(len(clash), per_label))


def _dense_block(model: _DenseModel, y: sp.csr_matrix, rng: np.random.Generator) -> np.ndarray:
    signal = np.asarray((y @ model.loadings) @ model.basis, dtype=np.float32)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= np.float32(NOISE_SCALE) * np.linalg.norm(signal, axis=1, keepdims=True)
    signal += noise
    signal /= np.maximum(np.linalg.norm(signal, axis=1, keepdims=True), np.float32(1e-12))
    return signal


@dataclass
class _WordModel:
    n_words: int
    background_cdf: np.ndarray  # float64 [D] cumulative Zipf weight in word-id order
    topic_words: np.ndarray  # int32 [T, TOPIC_WORDS]
    label_words: np.ndarray  # int32 [L, LABEL_WORDS]
    label_topic: np.ndarray  # int32 [L]


def _word_model(labels: _LabelModel, n_words: int, rng: np.random.Generator) -> _WordModel:
    weight_by_rank = np.arange(1, n_words + 1, dtype=np.float64) ** -WORD_EXPONENT
    word_of_rank = rng.permutation(n_words).astype(np.int32)
    weight = np.empty(n_words)
    weight[word_of_rank] = weight_by_rank
    # Topic and label words are content words: Zipf over the ranks after the most frequent ones.
    content = weight_by_rank.copy()
    content[: min(n_words // 200, n_words - 1)] = 0.0
    content_cdf = np.cumsum(content)
    n_topics = labels.topic_labels.shape[0]
    topic_words = word_of_rank[_sample_cdf(content_cdf, rng, n_topics * TOPIC_WORDS)]
    label_words = word_of_rank[_sample_cdf(content_cdf, rng, labels.n_labels * LABEL_WORDS)]
    return _WordModel(
        n_words=n_words,
        background_cdf=np.cumsum(weight),
        topic_words=topic_words.reshape(n_topics, TOPIC_WORDS),
        label_words=label_words.reshape(labels.n_labels, LABEL_WORDS),
        label_topic=labels.label_topic,
    )


def _bow_block(model: _WordModel, y: sp.csr_matrix, rng: np.random.Generator) -> sp.csr_matrix:
    """Word counts of a block: each token is a background, topic or label word of the point."""
    n_points = y.shape[0]
    n_tokens = 1 + rng.poisson(DOC_TOKENS - 1, n_points)
    rows = np.repeat(np.arange(n_points), n_tokens)
    source = rng.random(len(rows))
    words = _sample_cdf(model.background_cdf, rng, len(rows)).astype(np.int32)
    from_labels = source < TOPIC_TOKEN_SHARE + LABEL_TOKEN_SHARE
    owners = rows[from_labels]
    n_point_labels = np.diff(y.indptr)
    slots = y.indptr[owners] + (rng.random(len(owners)) * n_point_labels[owners]).astype(np.int64)
    token_labels = y.indices[slots]
    from_topic = source[from_labels] < TOPIC_TOKEN_SHARE
    picks = rng.integers(0, max(TOPIC_WORDS, LABEL_WORDS), size=len(owners))
    topic_picks = model.topic_words[model.label_topic[token_labels], picks % TOPIC_WORDS]
    label_picks = model.label_words[token_labels, picks % LABEL_WORDS]
    words[from_labels] = np.where(from_topic, topic_picks, label_picks)
    pairs, counts = np.unique(rows.astype(np.int64) * model.n_words + words, return_counts=True)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(pairs // model.n_words, minlength=n_points))])
    return sp.csr_matrix(
        (counts.astype(np.float32), (pairs % model.n_words).astype(np.int32), indptr),
        shape=(n_points, model.n_words),
    )


def _tfidf_rows(indices: np.ndarray, counts: np.ndarray, row_nnz: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """Sublinear tf times idf, rows L2-normalised (float32)."""
    values = (1.0 + np.log(counts, dtype=np.float32)) * idf[indices]
    rows = np.repeat(np.arange(len(row_nnz)), row_nnz)
    norms = np.sqrt(np.bincount(rows, weights=values * values, minlength=len(row_nnz))).astype(np.float32)
    return values / np.maximum(norms, np.float32(1e-12))[rows]


# ---------------------------------------------------------------- writing


class _CsrStaging:
    """Rows of a CSR matrix appended block by block to raw files, assembled into an npz at the end."""

    def __init__(self, folder: Path, stem: str, n_cols: int):
        self.indices_path = folder / f"{stem}.indices.raw"
        self.values_path = folder / f"{stem}.values.raw"
        self.n_cols = n_cols
        self.row_nnz: list[np.ndarray] = []

    def append(self, block: sp.csr_matrix) -> None:
        self.row_nnz.append(np.diff(block.indptr))
        with open(self.indices_path, "ab") as indices_file, open(self.values_path, "ab") as values_file:
            indices_file.write(np.ascontiguousarray(block.indices, np.int32).data)
            values_file.write(np.ascontiguousarray(block.data, np.float32).data)

    def write_npz(
        self,
        path: Path,
        transform: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Write a ``scipy.sparse.save_npz``-compatible file; ``transform(indices, values, row_nnz)`` maps values."""
        row_nnz = np.concatenate(self.row_nnz) if self.row_nnz else np.zeros(0, np.int64)
        nnz = int(row_nnz.sum())
        index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
        indptr = np.concatenate([[0], np.cumsum(row_nnz)]).astype(index_dtype)
        shape = (len(row_nnz), self.n_cols)

        def indices() -> Iterator[np.ndarray]:
            for block_indices, _, _ in self._blocks(with_values=False):
                yield block_indices

        def values() -> Iterator[np.ndarray]:
            for block_indices, block_values, block_row_nnz in self._blocks(with_values=True):
                yield block_values if transform is None else transform(block_indices, block_values, block_row_nnz)

        _write_npz(
            path,
            [
                ("format", np.array("csr", dtype="S3"), None),
                ("shape", np.array(shape, dtype=np.int64), None),
                ("indptr", indptr, None),
                ("indices", np.dtype(np.int32), ((nnz,), indices())),
                ("data", np.dtype(np.float32), ((nnz,), values())),
            ],
        )

    def _blocks(self, with_values: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        with open(self.indices_path, "rb") as indices_file, open(self.values_path, "rb") as values_file:
            for block_row_nnz in self.row_nnz:
                n = int(block_row_nnz.sum())
                block_indices = np.fromfile(indices_file, dtype=np.int32, count=n)
                block_values = np.fromfile(values_file, dtype=np.float32, count=n) if with_values else None
                yield block_indices, block_values, block_row_nnz


def _write_npz(path: Path, entries: list[tuple[str, np.ndarray | np.dtype, tuple | None]]) -> None:
    """An uncompressed ``np.savez`` file whose large arrays are written from chunk iterators.

    Each entry is (name, array, None) or (name, dtype, (shape, chunks)).
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array_or_dtype, streamed in entries:
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            with archive.open(info, "w", force_zip64=True) as member:
                if streamed is None:
                    np.lib.format.write_array(member, array_or_dtype, allow_pickle=False)
                    continue
                shape, chunks = streamed
                _write_npy_header(member, array_or_dtype, shape)
                for chunk in chunks:
                    member.write(np.ascontiguousarray(chunk, array_or_dtype).data)


def _write_npy_header(file, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(file, header)


def _block_rng(seed: int, split: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(split, block))))


def _blocks(n_points: int) -> Iterable[tuple[int, int]]:
    for number, start in enumerate(range(0, n_points, BLOCK_POINTS)):
        yield number, min(BLOCK_POINTS, n_points - start)


@dataclass
class _Models:
    labels: _LabelModel
    dense: _DenseModel | None  # set for dense features
    words: _WordModel | None  # set for bow features


def _build_models(shape: SyntheticShape, seed: int) -> _Models:
    model_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(2**16,))))
    labels = _label_model(shape.n_labels, model_rng)
    dense = _dense_model(labels, shape.n_features, model_rng) if shape.features == "dense" else None
    words = _word_model(labels, shape.n_features, model_rng) if shape.features == "bow" else None
    return _Models(labels, dense, words)


def _write_splits(shape: SyntheticShape, seed: int, models: _Models, folder: Path, bar: tqdm) -> list[str]:
    """Generate both splits into ``folder``, points counted on ``bar``; returns the file names, meta.json last."""
    labels, dense, words = models.labels, models.dense, models.words
    document_freq = np.zeros(shape.n_features, np.int64)
    word_staging: dict[str, _CsrStaging] = {}
    label_nnz = {}
    names = []
    for split_id, (split, n_points) in enumerate({"trn": shape.n_train, "tst": shape.n_test}.items()):
        label_staging = _CsrStaging(folder, f"Y.{split}", shape.n_labels)
        label_nnz[split] = 0
        with contextlib.ExitStack() as stack:
            if dense is not None:
                dense_file = stack.enter_context(open(folder / f"X.{split}.npy", "wb"))
                _write_npy_header(dense_file, np.dtype(np.float32), (n_points, shape.n_features))
                names.append(f"X.{split}.npy")
            else:
                word_staging[split] = _CsrStaging(folder, f"X.{split}", shape.n_features)
            for block, size in _blocks(n_points):
                rng = _block_rng(seed, split_id, block)
                y = _draw_labels(labels, rng, size, shape.labels_per_point)
                label_staging.append(y)
                label_nnz[split] += y.nnz
                if dense is not None:
                    dense_file.write(_dense_block(dense, y, rng).data)
                else:
                    x = _bow_block(words, y, rng)
                    word_staging[split].append(x)
                    if split == "trn":
                        document_freq += np.bincount(x.indices, minlength=shape.n_features)
                bar.update(size)
        label_staging.write_npz(folder / f"Y.{split}.npz")
        names.append(f"Y.{split}.npz")
    if words is not None:  # tf-idf needs the train document frequencies, known only now
        idf = (np.log((1.0 + shape.n_train) / (1.0 + document_freq)) + 1.0).astype(np.float32)
        for split, staging in word_staging.items():
            staging.write_npz(folder / f"X.{split}.npz", lambda i, v, r: _tfidf_rows(i, v, r, idf))
            names.append(f"X.{split}.npz")
    for path in folder.glob("*.raw"):  # free the disk before the files are moved
        path.unlink()
    meta = {
        **asdict(shape),
        "kind": "synthetic",
        "seed": seed,
        "labels_per_point": round(label_nnz["trn"] / shape.n_train, 4),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    names.append("meta.json")
    return names
