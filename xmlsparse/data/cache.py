"""A binary cache of parsed splits, so that each text file is parsed once.

The cache is an uncompressed .npz beside the first source file (`train.txt` ->
`train.txt.xmlsparse-cache.npz`), or, when that folder is read-only, in `$XMLSPARSE_CACHE_DIR`
(default `~/.cache/xmlsparse/`) under a hash of the sources' absolute paths. It records the size
and mtime of every source; any change, a new format version or an unreadable file means a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from xmlsparse.atomic import atomic_write
from xmlsparse.data.types import PathLike, XMCData
from xmlsparse.errors import XMLSparseError

CACHE_VERSION = 1
"""Bump when the parsed content or the cache layout changes, so that old caches are rebuilt."""

CACHE_SUFFIX = ".xmlsparse-cache.npz"

_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def cache_dir() -> Path:
    """Where caches of sources in read-only folders go."""
    configured = os.environ.get("XMLSPARSE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "xmlsparse"


def load_cached(
    source_paths: Sequence[PathLike], build: Callable[[], XMCData], *, variant: str = ""
) -> XMCData:
    """Return the cached split for these sources, or `build()` it and cache the result.

    `variant` names how the sources are read (reader and its options); a different variant rebuilds.
    """
    sources = [Path(p) for p in source_paths]
    fingerprint = _fingerprint(sources, variant)
    beside, fallback = _beside_path(sources), _fallback_path(sources, variant)
    for candidate in (beside, fallback):
        data = _read_cache(candidate, fingerprint)
        if data is not None:
            return data

    data = build()
    targets = [beside, fallback] if _is_writable_dir(beside.parent) else [fallback]
    failures = []
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_cache(target, fingerprint, data)
            return data
        except OSError as e:
            failures.append(f"{target}: {e.strerror or e}")
    warnings.warn(
        f"could not write a data cache ({'; '.join(failures)}); the sources will be parsed again next time",
        stacklevel=2,
    )
    return data


def _fingerprint(sources: Sequence[Path], variant: str) -> str:
    stamps = []
    for path in sources:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise XMLSparseError(f"{path}: file not found") from None
        stamps.append([path.name, st.st_size, st.st_mtime_ns])
    return json.dumps({"version": CACHE_VERSION, "variant": variant, "sources": stamps})


def _beside_path(sources: Sequence[Path]) -> Path:
    return sources[0].with_name(sources[0].name + CACHE_SUFFIX)


def _fallback_path(sources: Sequence[Path], variant: str) -> Path:
    key = "\n".join([variant, *(str(p.resolve()) for p in sources)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / f"{sources[0].name}.{digest}{CACHE_SUFFIX}"


def _is_writable_dir(folder: Path) -> bool:
    # the mode bits count too: a folder marked read-only stays untouched even for root
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


def _read_cache(path: Path, fingerprint: str) -> XMCData | None:
    """The cached split if `path` holds one for this fingerprint; None if missing, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint:
                return None
            if "X_dense" in stored.files:
                X = stored["X_dense"]
            else:
                X = _csr_from(stored, "X")
            return XMCData(
                X=X, Y=_csr_from(stored, "Y"), n_features=int(stored["n_features"]), n_labels=int(stored["n_labels"])
            )
    except _UNREADABLE as e:
        warnings.warn(f"{path}: unreadable data cache ({e}); parsing the sources again", stacklevel=3)
        return None


def _csr_from(stored: np.lib.npyio.NpzFile, name: str) -> sp.csr_matrix:
    matrix = sp.csr_matrix(
        (stored[f"{name}_data"], stored[f"{name}_indices"], stored[f"{name}_indptr"]),
        shape=tuple(stored[f"{name}_shape"]),
    )
    matrix.has_sorted_indices = True  # written from sorted matrices; spares a check over every row
    return matrix


def _csr_arrays(matrix: sp.csr_matrix, name: str) -> dict[str, np.ndarray]:
    matrix = sp.csr_matrix(matrix)
    if not matrix.has_sorted_indices:
        matrix = matrix.sorted_indices()
    return {
        f"{name}_data": matrix.data,
        f"{name}_indices": matrix.indices,
        f"{name}_indptr": matrix.indptr,
        f"{name}_shape": np.array(matrix.shape, dtype=np.int64),
    }


def _write_cache(path: Path, fingerprint: str, data: XMCData) -> None:
    if isinstance(data.X, np.ndarray):
        features = {"X_dense": np.asarray(data.X)}
    else:
        features = _csr_arrays(data.X, "X")
    with atomic_write(path) as f:
        np.savez(
            f,
            fingerprint=np.array(fingerprint),
            n_features=np.array(data.n_features),
            n_labels=np.array(data.n_labels),
            **features,
            **_csr_arrays(data.Y, "Y"),
        )
