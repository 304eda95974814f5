"""Checks that an output path can be written, made before the work whose result goes there.

A command that trains or scores for minutes and then finds that ``--out`` names a missing or
read-only folder has wasted those minutes; these checks fail in the first second instead, with one
line naming the path. A folder counts as writable when its permission bits allow writing (root
passes ``os.access`` everywhere, but a folder marked read-only is meant to stay untouched) and a
real file can be created in it (which permission bits alone miss on read-only mounts).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from xmlsparse.errors import XMLSparseError

_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor (where a mkdir would start)."""
    path = Path(path)
    # lexists: a dangling link is something in the way, not a free name
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _write_error(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (empty when its permission bits forbid it), or None
    when one can."""
    try:
        if not folder.stat().st_mode & _WRITE_BITS:
            return ""
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def _not_writable(folder: Path, reason: str) -> str:
    return f"{folder} is not writable" + (f" ({reason})" if reason else "")


def check_output_file(path: Path) -> None:
    """Raise ``XMLSparseError`` unless a file can be written at ``path``: its folder exists and takes
    new files (written beside the target and renamed over it, see ``atomic_write``), and ``path`` is
    not a folder."""
    path = Path(path)
    if path.is_dir():
        raise XMLSparseError(f"{path}: is a folder; give a file path")
    folder = path.parent
    if not folder.exists():
        raise XMLSparseError(f"{path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise XMLSparseError(f"{path}: {folder} is not a folder")
    reason = _write_error(folder)
    if reason is not None:
        raise XMLSparseError(f"{path}: {_not_writable(folder, reason)}")


def check_output_dir(path: Path, what: str = "output folder") -> None:
    """Raise ``XMLSparseError`` unless ``path`` is, or can be made (with its parents), a folder that
    takes new files. ``what`` names the path in the message, e.g. "output folder" or "data root"."""
    path = Path(path)
    existing = nearest_existing(path)
    if not existing.is_dir():
        if existing == path:
            raise XMLSparseError(f"{what} {path} exists and is not a folder")
        raise XMLSparseError(f"{what} {path} cannot be created: {existing} is not a folder")
    reason = _write_error(existing)
    if reason is not None:
        if existing == path:
            raise XMLSparseError(f"{what} {_not_writable(path, reason)}")
        raise XMLSparseError(f"{what} {path} cannot be created: {_not_writable(existing, reason)}")
