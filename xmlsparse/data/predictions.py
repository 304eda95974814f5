"""Prediction files: per-point label scores, read into and written from a scipy CSR matrix [N, L].

Two forms are understood:
- npz: a `scipy.sparse.save_npz` score matrix (pyxclib / PECOS);
- text: one point a line, `label:score label:score ...` (0-based ids, any order), an empty
  line for a point without predictions, and optionally a first header line `N L`.
"""

from __future__ import annotations

import re
import zipfile
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import scipy.sparse as sp

from xmlsparse.atomic import atomic_write
from xmlsparse.errors import XMLSparseError

_ZIP_MAGIC = b"PK\x03\x04"
_HEADER = re.compile(r"\s*\d+\s+\d+\s*")
_PAIRS = re.compile(r"\s*(?:[^\s:]+:[^\s:]+(?:\s+|$))*")  # label:score tokens, nothing else


def read_predictions(path: str | Path, n_labels: int | None = None) -> sp.csr_matrix:
    """Score matrix [N, L] of a prediction file; L is n_labels, else the header's, else max id + 1.

    Stored entries are predictions (an explicit 0.0 score included); indices come back sorted.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_npz = f.read(4) == _ZIP_MAGIC
    except OSError as e:
        raise XMLSparseError(f"{path}: cannot read prediction file ({e.strerror or e})") from e
    return _read_npz(path, n_labels) if is_npz else _read_text(path, n_labels)


def write_predictions(
    path: str | Path, topk_idx: np.ndarray, topk_scores: np.ndarray, n_labels: int | None = None
) -> None:
    """Write top-k predictions [N, k] (ids best first, -1 = none) as npz (`.npz` suffix) or text.

    The text form starts with the header `N L` (L = n_labels, else max id + 1). The file
    appears complete or not at all.
    """
    path = Path(path)
    idx, values = np.asarray(topk_idx), np.asarray(topk_scores)
    scores = _topk_matrix(idx, values, n_labels)  # also checks the arrays
    if path.suffix == ".npz":
        with atomic_write(path, "wb") as f:
            sp.save_npz(f, scores)
    else:
        with atomic_write(path, "w") as f:
            _write_text(f, idx, values, scores.shape[1])


def _read_npz(path: Path, n_labels: int | None) -> sp.csr_matrix:
    try:
        scores = sp.load_npz(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise XMLSparseError(f"{path}: not a scipy sparse matrix saved with save_npz ({e})") from e
    if scores.ndim != 2:
        raise XMLSparseError(f"{path}: expected a 2-d score matrix, got shape {scores.shape}")
    scores = sp.csr_matrix(scores)
    n_cols = scores.shape[1] if n_labels is None else n_labels
    if scores.nnz and scores.indices.min() < 0:
        row = _row_of(scores.indptr, int(np.argmax(scores.indices < 0)))
        raise XMLSparseError(f"{path}, row {row}: negative label id {scores.indices.min()}")
    if scores.nnz and scores.indices.max() >= n_cols:
        row = _row_of(scores.indptr, int(np.argmax(scores.indices >= n_cols)))
        raise XMLSparseError(
            f"{path}, row {row}: label id {scores[row].indices.max()} is out of range for {n_cols} labels"
        )
    scores = sp.csr_matrix((scores.data, scores.indices, scores.indptr), shape=(scores.shape[0], n_cols))
    _check_unique(scores, lambda row: f"{path}, row {row}")
    return scores


def _read_text(path: Path, n_labels: int | None) -> sp.csr_matrix:
    labels, values = array("q"), array("d")
    indptr = array("q", [0])
    header: tuple[int, int] | None = None
    first_point_line = 1
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1 and _HEADER.fullmatch(line):
                    n, n_cols = line.split()
                    header = int(n), int(n_cols)
                    first_point_line = 2
                    continue
                try:
                    if not _PAIRS.fullmatch(line):
                        raise ValueError
                    parts = line.replace(":", " ").split()
                    line_labels = list(map(int, parts[0::2]))
                    line_values = list(map(float, parts[1::2]))
                except ValueError:
                    for token in line.split():  # find the token to blame
                        _parse_token(token, path, lineno)
                    raise XMLSparseError(f"{path}, line {lineno}: expected label:score tokens") from None
                labels.extend(line_labels)
                values.extend(line_values)
                indptr.append(len(labels))
    except UnicodeDecodeError as e:
        raise XMLSparseError(f"{path}: not a UTF-8 text prediction file ({e.reason} at byte {e.start})") from e

    def where(row: int) -> str:
        return f"{path}, line {row + first_point_line}"

    n_points = len(indptr) - 1
    ids = np.frombuffer(labels, dtype=np.int64) if labels else np.zeros(0, dtype=np.int64)
    if header is not None:
        if header[0] != n_points:
            raise XMLSparseError(f"{path}: header announces {header[0]} points but {n_points} lines follow it")
        if n_labels is not None and header[1] != n_labels:
            raise XMLSparseError(f"{path}: header announces {header[1]} labels, expected {n_labels}")
        n_labels = header[1]
    ptr = np.frombuffer(indptr, dtype=np.int64)
    if ids.size and ids.min() < 0:
        pos = int(np.argmax(ids < 0))
        raise XMLSparseError(f"{where(_row_of(ptr, pos))}: negative label id {ids[pos]}")
    if n_labels is None:
        n_labels = int(ids.max()) + 1 if ids.size else 0
    elif ids.size and ids.max() >= n_labels:
        pos = int(np.argmax(ids >= n_labels))
        raise XMLSparseError(
            f"{where(_row_of(ptr, pos))}: label id {ids[pos]} is out of range for {n_labels} labels "
            f"(0..{n_labels - 1})"
        )
    data = np.frombuffer(values, dtype=np.float64) if values else np.zeros(0)
    scores = sp.csr_matrix((data.copy(), ids.copy(), ptr.copy()), shape=(n_points, n_labels))
    _check_unique(scores, where)
    return scores


def _parse_token(token: str, path: Path, lineno: int) -> tuple[int, float]:
    label, sep, score = token.partition(":")
    if not sep or not label or not score or ":" in score:
        raise XMLSparseError(f"{path}, line {lineno}: bad token {token!r}, expected label:score")
    try:
        label_id = int(label)
    except ValueError:
        raise XMLSparseError(f"{path}, line {lineno}: label id {label!r} in {token!r} is not an integer") from None
    try:
        return label_id, float(score)
    except ValueError:
        raise XMLSparseError(f"{path}, line {lineno}: score {score!r} in {token!r} is not a number") from None


def _row_of(indptr: np.ndarray, position: int) -> int:
    """Row that holds stored entry number `position` of a CSR matrix."""
    return int(np.searchsorted(indptr, position, side="right")) - 1


def _check_unique(scores: sp.csr_matrix, where: Callable[[int], str]) -> None:
    """Sorts each row's indices in place; a label listed twice for one point is an error."""
    scores.sort_indices()
    rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr))
    repeated = (np.diff(scores.indices) == 0) & (np.diff(rows) == 0)
    if repeated.any():
        pos = int(np.argmax(repeated))
        raise XMLSparseError(f"{where(int(rows[pos]))}: label {scores.indices[pos]} is listed twice")


def _topk_matrix(idx: np.ndarray, scores: np.ndarray, n_labels: int | None) -> sp.csr_matrix:
    if idx.ndim != 2 or idx.shape != scores.shape:
        raise XMLSparseError(
            f"top-k ids {idx.shape} and scores {scores.shape} must be two matrices of the same shape"
        )
    idx = idx.astype(np.int64, copy=False)
    if n_labels is None:
        n_labels = int(idx.max()) + 1 if idx.size else 0
    if idx.size and (idx.min() < -1 or idx.max() >= n_labels):
        raise XMLSparseError(
            f"top-k ids span [{idx.min()}, {idx.max()}], expected -1 (none) or 0..{n_labels - 1}"
        )
    valid = idx >= 0
    indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    matrix = sp.csr_matrix((scores[valid], idx[valid], indptr), shape=(idx.shape[0], n_labels))
    _check_unique(matrix, lambda row: f"top-k row {row}")
    return matrix


def _write_text(f: IO[str], idx: np.ndarray, values: np.ndarray, n_labels: int) -> None:
    """One line per row of the top-k arrays, in their order, padding (-1) left out."""
    # 9 significant digits restore a float32 exactly; %r is the shortest exact form of a float64.
    item = "%d:%.9g" if values.dtype.itemsize <= 4 else "%d:%r"
    line_formats: dict[int, str] = {}
    f.write(f"{idx.shape[0]} {n_labels}\n")
    valid = idx >= 0
    # Label, score, label, score, ... so that one %-format call writes a whole line.
    flat = [None] * (2 * int(valid.sum()))
    flat[0::2], flat[1::2] = idx[valid].tolist(), values[valid].tolist()
    ends = np.cumsum(valid.sum(axis=1)).tolist()
    for start, end in zip([0] + ends[:-1], ends):
        count = end - start
        if count not in line_formats:
            line_formats[count] = " ".join([item] * count) + "\n"
        f.write(line_formats[count] % tuple(flat[2 * start : 2 * end]))
