"""Files that appear complete or not at all: written beside their target, then renamed over it."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union

PathLike = Union[str, os.PathLike]

_PARTIAL_SUFFIX = ".tmp"


def _partial_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (``mode`` "wb" or "w"); it replaces ``path`` only once
    the block ends without an exception, after an fsync, so a crash leaves the old file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_partial_prefix(path), suffix=_PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_partial_writes(path: PathLike) -> list[Path]:
    """Delete the temporary files that writes of ``path`` killed before their rename left beside it
    (a killed checkpoint write leaves one as large as the checkpoint); returns the deleted paths."""
    path = Path(path)
    removed = []
    for partial in path.parent.glob(f"{glob.escape(_partial_prefix(path))}*{_PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
            removed.append(partial)
    return removed


def write_json(path: PathLike, value: Any) -> None:
    """``value`` as indented JSON at ``path``, through :func:`atomic_write`."""
    with atomic_write(path, "w") as handle:
        handle.write(json.dumps(value, indent=2) + "\n")
