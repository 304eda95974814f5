"""Room for the files a command writes: free disk and available memory, and folders created
for the work that are removed again when it fails.

Commands check these before any work, so that one that cannot finish says so at once instead of
failing (or being killed) half-way, and remove the folders they created when they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from xmlsparse.errors import XMLSparseError
from xmlsparse.outputs import nearest_existing

MEMINFO = Path("/proc/meminfo")


@contextlib.contextmanager
def created_folder(path: Path, what: str) -> Iterator[Path]:
    """Create ``path`` and its missing parents; when the block raises, remove those of them left empty.

    A created folder that holds something when the block fails (a download kept to resume) stays,
    and so do its parents.
    """
    path = Path(path)
    missing = []  # deepest first
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise XMLSparseError(f"{what} {path} cannot be created ({err.strerror or err})") from err
    try:
        yield path
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def free_disk_bytes(path: Path) -> int:
    """Bytes free to this user on the file system that ``path`` is (or would be created) on."""
    return shutil.disk_usage(nearest_existing(path)).free


def available_memory_bytes() -> int | None:
    """Memory that can be allocated without swapping, or None where the system does not say.

    MemAvailable of ``MEMINFO`` (Linux) counts the page cache that can be dropped; elsewhere the
    free physical pages, a lower bound.
    """
    try:
        with open(MEMINFO, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n_bytes: int) -> str:
    """``n_bytes`` in binary units with one decimal, e.g. "1.5 GiB"."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value, unit = float(n_bytes), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{n_bytes} B" if unit == 0 else f"{value:.1f} {units[unit]}"
