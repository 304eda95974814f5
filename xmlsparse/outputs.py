"""Checks that an output path can be written, made before the work whose result goes there.

A command that trains or scores for minutes and then finds that ``--out`` names a missing or
read-only folder has wasted those minutes; these checks fail in the first second instead, with one
line naming the path. They try a real write (a nameless temporary file) rather than read permission
bits, which miss read-only mounts and say nothing true for root.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from xmlsparse.errors import XMLSparseError


def _write_error(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None when one can."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def check_output_file(path: Path) -> None:
    """Raise ``XMLSparseError`` unless a file can be written at ``path``: its folder exists and takes
    new files (written beside the target and renamed over it, see ``atomic_write``), and ``path`` is
    not a folder."""
    if path.is_dir():
        raise XMLSparseError(f"{path}: is a folder; give a file path")
    folder = path.parent
    if not folder.exists():
        raise XMLSparseError(f"{path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise XMLSparseError(f"{path}: {folder} is not a folder")
    reason = _write_error(folder)
    if reason is not None:
        raise XMLSparseError(f"{path}: cannot write in {folder} ({reason})")


def check_output_dir(path: Path) -> None:
    """Raise ``XMLSparseError`` unless ``path`` is, or can be made (with its parents), a folder that
    takes new files."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f" {existing}"
        raise XMLSparseError(f"{path}:{where} is a file, not a folder")
    reason = _write_error(existing)
    if reason is not None:
        raise XMLSparseError(f"{path}: cannot write in {existing} ({reason})")
