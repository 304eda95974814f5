"""Fetch a registry data set, check that it is what it claims to be, and install it in the npz layout.

No mirror publishes a checksum, so what can be verified is: the HTTP length, that the body is an archive
(not an HTML quota or error page), that no archive member escapes the extraction folder, and the N/D/L
counts of the extracted files against the registry. Counts beyond `POINTS_TOLERANCE` refuse the archive,
naming both numbers, unless `force` installs it with a warning; counts within it warn.

Downloads stream into `<root>/<name>.<ext>.part` and resume from it with HTTP Range requests; the data
set directory appears only when complete (built in a temporary folder inside root, then moved). A failed
install leaves root as it was, but for the bytes of a cut download, kept to resume.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from html import unescape
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit
from urllib.request import HTTPCookieProcessor, Request, build_opener

import numpy as np
import scipy.sparse
from tqdm import tqdm

from xmlsparse import __version__
from xmlsparse.data import storage
from xmlsparse.data.datasets import (
    INSTALLED_FILES,
    META_FILE,
    REGISTRY,
    VARIANTS,
    ArchiveLayout,
    DatasetInfo,
    SplitFiles,
    dataset_dir,
    dataset_status,
    download_command,
    find_layout,
    read_splits,
)
from xmlsparse.data.formats import write_npz_pair
from xmlsparse.errors import XMLSparseError
from xmlsparse.outputs import check_output_dir

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
HTML_SNIFF_BYTES = 1 << 16  # enough of an HTML page to find a confirm form or a title
MAX_CONFIRM_HOPS = 3  # Drive answers at most one confirm page; more means a loop
RETRY_DELAY_S = 1.0  # grows linearly with the attempt number
RETRY_STATUS = {429, 500, 502, 503, 504}
USER_AGENT = f"xmlsparse/{__version__}"

ARCHIVE_SUFFIXES = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".zip": "zip", ".tar": "tar"}

# How far an archive's counts may be from the registry's and still install. Features and labels must
# match exactly: they fix the model's input width and the label ids that the published metrics refer
# to. The points of each split may differ by 1%: some redistributions drop a few empty or duplicate
# points, while a wrong file or a sample of the set is off by far more.
POINTS_TOLERANCE = 0.01

Report = Callable[[str], None]


def download_dataset(
    name: str,
    root: Path = Path("data"),
    variant: str = "bow",
    url: str | None = None,
    from_file: Path | None = None,
    progress: Report | None = None,
    *,
    registry: Mapping[str, DatasetInfo] | None = None,
    attempts: int = 5,
    timeout: float = 60.0,
    force: bool = False,
) -> Path:
    """Install a registry data set under root/<name> (raw variant: root/<name>-raw) and return that folder.

    Tries the registry's mirrors in order, or only `url`, or installs the local archive `from_file`.
    `progress` receives one line per step (the default logs them); `registry` replaces the built-in one.
    An archive whose counts differ from the registry's beyond `POINTS_TOLERANCE` is refused, or with
    `force` installed with a warning. Raises XMLSparseError, before any work when root cannot be written.
    """
    registry = REGISTRY if registry is None else registry
    report = progress if progress is not None else log.info
    if name not in registry:
        raise XMLSparseError(f"unknown data set {name!r}; known: {', '.join(registry)}")
    if variant not in VARIANTS:
        raise XMLSparseError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if url is not None and from_file is not None:
        raise XMLSparseError("give either a URL or a local archive (--url or --from-file), not both")
    info = registry[name]
    root = Path(root)
    target = dataset_dir(name, root, variant)
    if dataset_status(name, root, variant) == "present":
        report(f"{name} is already present in {target}")
        return target
    mirrors = info.mirrors_for(variant)
    known_layouts = [m.layout for m in mirrors]
    if from_file is not None:
        archive = Path(from_file)
        if not archive.is_file():
            raise XMLSparseError(f"--from-file {archive}: no such file")
    elif url is not None:
        sources = [(url, _suffix_of(url), known_layouts)]
    else:
        sources = [(m.url, m.archive, _first(m.layout, known_layouts)) for m in mirrors]
        if not sources:
            raise XMLSparseError(
                f"no mirror is known for {name} ({variant}); install an archive with --url or --from-file"
            )
    check_output_dir(root, "data root")
    check_output_dir(target, "data set folder")

    with storage.created_folder(root, "data root"):
        if from_file is not None:
            report(f"installing {name} from {archive}")
            _install(archive, info, variant, known_layouts, target, str(archive), report, force)
        else:
            _install_from_sources(sources, name, info, variant, root, target, report, force, attempts, timeout)
    return target


def _install_from_sources(
    sources: list[tuple[str, str, list[ArchiveLayout]]], name: str, info: DatasetInfo, variant: str, root: Path,
    target: Path, report: Report, force: bool, attempts: int, timeout: float,
) -> None:
    """Download and install from the first (url, archive suffix, layouts) that works; raises naming each failure."""
    failures = []
    for source_url, suffix, layouts in sources:
        part = root / f"{target.name}.{suffix}.part"
        report(f"downloading {name} from {source_url}")
        try:
            _fetch(source_url, part, attempts=attempts, timeout=timeout, report=report, label=name)
        except XMLSparseError as err:
            if not part.is_file() or part.stat().st_size == 0:
                _remove_part(part)  # nothing worth resuming
            failures.append(f"{source_url}: {err}")
            report(failures[-1])
            continue
        try:
            _install(part, info, variant, layouts, target, source_url, report, force)
        except XMLSparseError as err:
            _remove_part(part)  # the archive itself is bad: resuming it cannot help
            failures.append(f"{source_url}: {err}")
            report(failures[-1])
            continue
        _remove_part(part)
        return
    command = download_command(name, root, variant) + " --from-file ARCHIVE"
    parts = dict.fromkeys(root / f"{target.name}.{suffix}.part" for _, suffix, _ in sources)
    kept = [str(part) for part in parts if part.is_file()]
    resume = f". The bytes received are kept to resume in {', '.join(kept)}" if kept else ""
    raise XMLSparseError(
        f"could not download {name}: " + "; ".join(failures) + resume
        + f". Fetch the archive by other means and install it with: {command}"
    )


def _first(layout: ArchiveLayout, layouts: list[ArchiveLayout]) -> list[ArchiveLayout]:
    return [layout] + [other for other in layouts if other != layout]


def _suffix_of(url: str) -> str:
    path = urlsplit(url).path.lower()
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES.items() if path.endswith(suffix)), "archive")


def _source_note(part: Path) -> Path:
    """Beside a .part: the URL its bytes came from, so that bytes of another source are never resumed."""
    return part.with_name(part.name + ".url")


def _remove_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _source_note(part).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# HTTP


class _PageParser(HTMLParser):
    """The forms (action and hidden inputs), the link targets and the title of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.forms.append((values.get("action", ""), {}))
        elif tag == "input" and self.forms and values.get("type", "").lower() == "hidden" and values.get("name"):
            self.forms[-1][1][values["name"]] = values.get("value", "")
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _confirm_url(page: str, url: str, cookies: CookieJar) -> str | None:
    """The URL that Google Drive's "can't scan for viruses" page leads to, or None for any other page."""
    parser = _PageParser()
    parser.feed(page)
    for action, inputs in parser.forms:
        if "confirm" in inputs:
            return _with_query(urljoin(url, action or url), inputs)
    for link in parser.links:
        if "confirm=" in link:
            return urljoin(url, link)
    token = re.search(r"confirm=([0-9A-Za-z_-]+)", unescape(page))
    if token:
        return _with_query(url, {"confirm": token.group(1)})
    for cookie in cookies:
        if cookie.name.startswith("download_warning"):
            return _with_query(url, {"confirm": cookie.value})
    return None


def _page_title(page: str) -> str:
    parser = _PageParser()
    parser.feed(page)
    return " ".join(parser.title.split())


_ARCHIVE_MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"PK\x05\x06")


def _looks_like_html(content_type: str, head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    if start.startswith((b"<!doctype", b"<html")):
        return True
    return "text/html" in content_type.lower() and not head.startswith(_ARCHIVE_MAGIC)


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


def _range_total(content_range: str | None) -> int | None:
    match = re.match(r"bytes \*/(\d+)", content_range or "")
    return int(match.group(1)) if match else None


def _fetch(url: str, part: Path, *, attempts: int, timeout: float, report: Report, label: str) -> None:
    """Stream `url` into `part`, resuming the bytes already there; return once part holds the whole body.

    Retries (at most `attempts` failures) when the connection is cut mid-file or the server is briefly
    unavailable; follows Google Drive's confirm page; refuses any other HTML page.
    """
    note = _source_note(part)
    if part.exists() and (not note.is_file() or note.read_text(encoding="utf-8") != url):
        part.unlink()  # bytes of another source
    note.write_text(url, encoding="utf-8")
    cookies = CookieJar()
    opener = build_opener(HTTPCookieProcessor(cookies))
    current, hops, failures, progressed = url, 0, 0, False

    def retry_or_raise(reason: str) -> None:
        nonlocal failures
        failures += 1
        if failures >= attempts:
            raise XMLSparseError(f"gave up after {failures} attempts: {reason}")
        report(f"{reason}; retrying ({failures}/{attempts - 1})")
        time.sleep(RETRY_DELAY_S * failures)

    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = opener.open(Request(current, headers=headers), timeout=timeout)
        except HTTPError as err:
            err.close()
            if err.code == 416 and offset:
                if _range_total(err.headers.get("Content-Range")) == offset:
                    return  # the whole body is already on disk
                part.unlink()
                retry_or_raise(f"the server refused to resume at byte {offset}; starting over")
                continue
            if err.code in RETRY_STATUS:
                retry_or_raise(f"HTTP {err.code} {err.reason}")
                continue
            raise XMLSparseError(f"HTTP {err.code} {err.reason}") from err
        except (URLError, OSError, ValueError, http.client.HTTPException) as err:
            reason = str(getattr(err, "reason", err))
            if not progressed:  # unreachable from the start: the next mirror is a better bet than waiting
                raise XMLSparseError(reason) from err
            retry_or_raise(reason)
            continue
        with response:
            try:
                head = response.read(HTML_SNIFF_BYTES)
            except (OSError, http.client.HTTPException) as err:
                progressed = True
                retry_or_raise(f"connection lost ({err})")
                continue
            if _looks_like_html(response.headers.get("Content-Type", ""), head):
                page = head.decode("utf-8", "replace")
                next_url = _confirm_url(page, current, cookies) if hops < MAX_CONFIRM_HOPS else None
                if next_url is None:
                    title = _page_title(page)
                    titled = f" ({title!r})" if title else ""
                    where = "" if current == url else f" (at {current})"
                    raise XMLSparseError(f"answered with an HTML page{titled}{where} instead of an archive")
                report("following the download confirmation page")
                current, hops = next_url, hops + 1
                continue
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if response.status == 206:
                if _range_start(response.headers.get("Content-Range")) != offset:
                    part.unlink()
                    retry_or_raise(f"the server resumed at the wrong byte (asked for {offset}); starting over")
                    continue
                mode = "ab"
            else:
                if offset:
                    report(f"the server ignored the request to resume at byte {offset}; starting over")
                mode, offset = "wb", 0
            received, cut = _stream(response, head, part, mode, offset, expected, label)
        if cut is None and (expected is None or received == expected):
            return
        progressed = True
        reason = cut or f"connection closed after {offset + received} of {offset + expected} bytes"
        retry_or_raise(reason)


def _stream(
    response: http.client.HTTPResponse, head: bytes, part: Path, mode: str, offset: int,
    expected: int | None, label: str,
) -> tuple[int, str | None]:
    """Append the body to part; returns (bytes written, why the transfer broke off or None)."""
    total = offset + expected if expected is not None else None
    bar = tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
        disable=not sys.stderr.isatty(), leave=False,
    )
    received, cut = 0, None
    with open(part, mode) as out, bar:
        chunk = head
        while chunk:
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as err:
                cut = f"connection lost after {offset + received} bytes ({type(err).__name__}: {err})"
                break
    return received, cut


# ---------------------------------------------------------------------------------------------------
# Archives


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if _looks_like_html("", head):
        raise XMLSparseError(f"{path} is an HTML page, not an archive")
    raise XMLSparseError(f"{path} is not a tar.gz, tar or zip archive (it starts with {head[:8]!r})")


def _unsafe_name(name: str) -> str | None:
    """Why an archive member name would land outside the extraction folder, or None when it is safe."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix):
        return "absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "path with '..'"
    return None


def _check_tar_member(member: tarfile.TarInfo) -> None:
    reason = _unsafe_name(member.name)
    if reason is None and (member.issym() or member.islnk()):
        base = PurePosixPath(member.name).parent if member.issym() else PurePosixPath()
        target = (base / member.linkname).as_posix()
        if _unsafe_name(member.linkname) is not None or _unsafe_name(os.path.normpath(target)) is not None:
            reason = f"link to {member.linkname!r} outside the archive"
    if reason is None and not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        reason = "device or pipe"
    if reason is not None:
        raise XMLSparseError(f"refusing archive member {member.name!r}: {reason}")


def _wanted(name: str, suffixes: set[tuple[str, ...]] | None) -> bool:
    if suffixes is None:
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return any(parts[-len(suffix):] == suffix for suffix in suffixes if len(parts) >= len(suffix))


_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)


def _extract(archive: Path, kind: str, dest: Path, suffixes: set[tuple[str, ...]] | None) -> None:
    """Extract the members whose paths end with one of `suffixes` (all when None), refusing unsafe ones."""
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    reason = _unsafe_name(info.filename)
                    if reason is not None:
                        raise XMLSparseError(f"refusing archive member {info.filename!r}: {reason}")
                    if _wanted(info.filename, suffixes):
                        zf.extract(info, dest)
        else:
            with tarfile.open(archive, "r:gz" if kind == "tar.gz" else "r:") as tar:
                for member in tar:
                    _check_tar_member(member)
                    if _wanted(member.name, suffixes):
                        tar.extract(member, dest, set_attrs=False, **extra)
    except _CORRUPT as err:
        raise XMLSparseError(f"archive {archive} is corrupt ({type(err).__name__}: {err})") from err


def _locate(extracted: Path, layouts: Iterable[ArchiveLayout]) -> SplitFiles | None:
    """The files of the first layout found: at the layout's folder, or by their relative paths anywhere."""
    for layout in layouts:
        exact = extracted / layout.folder
        paths = []
        for relative in layout.train + layout.test:
            candidate = exact / relative
            if not candidate.is_file():
                matches = sorted(extracted.rglob(PurePosixPath(relative).name))
                matches = [m for m in matches if m.as_posix().endswith("/" + relative)]
                candidate = matches[0] if len(matches) == 1 else None
            if candidate is None:
                break
            paths.append(candidate)
        else:
            n = len(layout.train)
            return SplitFiles(layout.format, tuple(paths[:n]), tuple(paths[n:]))
    return None


def _detect(extracted: Path) -> SplitFiles | None:
    """A data set layout in any folder of the extracted tree (shallowest first)."""
    folders = sorted((p for p in extracted.rglob("*") if p.is_dir()), key=lambda p: (len(p.parts), str(p)))
    for folder in [extracted] + folders:
        found = find_layout(folder)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------
# Conversion


Shape = tuple[int, int | None, int]  # points, features (None for raw text), labels


def _read_raw_json(path: Path) -> tuple[list[str], list[list[int]]]:
    """Texts (title and content on one line) and label ids of a JSON-lines file with `target_ind`."""
    texts, labels = [], []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                    ids = sorted({int(i) for i in record["target_ind"]})
                except (ValueError, KeyError, TypeError) as err:
                    where = f"{path.name} line {number}"
                    raise XMLSparseError(f"{where}: expected JSON with a target_ind list ({err})") from err
                if ids and ids[0] < 0:
                    raise XMLSparseError(f"{path.name} line {number}: negative label id {ids[0]}")
                texts.append(" ".join(f"{record.get('title', '')} {record.get('content', '')}".split()))
                labels.append(ids)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise XMLSparseError(f"{path.name}: unreadable ({err})") from err
    return texts, labels


def _label_matrix(rows: list[list[int]], n_labels: int) -> scipy.sparse.csr_matrix:
    indptr = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
    indices = np.fromiter((i for row in rows for i in row), dtype=np.int32, count=int(indptr[-1]))
    return scipy.sparse.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(len(rows), n_labels))


def _convert_raw(files: SplitFiles, staging: Path, n_labels: int) -> tuple[Shape, Shape]:
    """Texts one a line and label matrices; `n_labels` columns, more when a larger id occurs."""
    splits = [_read_raw_json(files.train[0]), _read_raw_json(files.test[0])]
    n_labels = max(n_labels, 1 + max((row[-1] for _, labels in splits for row in labels if row), default=-1))
    for (texts, labels), split, text_name in zip(splits, ("trn", "tst"), ("train_raw_texts.txt", "test_raw_texts.txt")):
        (staging / text_name).write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        scipy.sparse.save_npz(staging / f"Y.{split}.npz", _label_matrix(labels, n_labels))
    return (len(splits[0][0]), None, n_labels), (len(splits[1][0]), None, n_labels)


def _convert(files: SplitFiles, staging: Path, n_labels: int) -> tuple[Shape, Shape]:
    """Write the installed files into staging; returns (points, features, labels) of train and test."""
    if files.format == "raw-json":
        return _convert_raw(files, staging, n_labels)
    train, test = read_splits(files, cached=False)
    for split, data in (("trn", train), ("tst", test)):
        write_npz_pair(staging / f"X.{split}.npz", staging / f"Y.{split}.npz", data)
    return (train.n_points, train.n_features, train.n_labels), (test.n_points, test.n_features, test.n_labels)


def _count_checks(info: DatasetInfo, train: Shape, test: Shape) -> tuple[list[str], list[str]]:
    """Messages for the counts that differ from the registry's: (beyond the tolerance, within it)."""
    checks = [
        ("train points", info.n_train, train[0], POINTS_TOLERANCE),
        ("test points", info.n_test, test[0], POINTS_TOLERANCE),
    ]
    if train[1] is not None:
        checks.append(("features", info.n_features, train[1], 0.0))
    checks.append(("labels", info.n_labels, train[2], 0.0))
    beyond, within = [], []
    for what, expected, actual, tolerance in checks:
        if actual != expected:
            found = beyond if abs(actual - expected) > tolerance * expected else within
            found.append(f"{info.name}: the registry expects {expected} {what}, the archive has {actual}")
    if train[1:] != test[1:]:
        beyond.append(
            f"{info.name}: train has {train[1]} features and {train[2]} labels, "
            f"test has {test[1]} features and {test[2]} labels"
        )
    return beyond, within


def _move_into_place(staging: Path, target: Path, variant: str) -> None:
    """os.replace the finished folder onto target; into an existing folder file by file (status needs them all)."""
    if not target.exists():
        os.replace(staging, target)
        return
    # The folder may hold the user's own files (dense features): keep them, replace ours.
    names = [META_FILE] + list(INSTALLED_FILES[variant])
    for name in names:
        os.replace(staging / name, target / name)


def _install(
    archive: Path, info: DatasetInfo, variant: str, layouts: list[ArchiveLayout], target: Path,
    source: str, report: Report, force: bool,
) -> None:
    """Extract, locate, convert and verify `archive`, then move the data set folder into place.

    Counts beyond the tolerance refuse the archive unless `force`; installed mismatches warn.
    """
    kind = _archive_kind(archive)
    suffixes = {PurePosixPath(rel).parts for layout in layouts for rel in layout.train + layout.test}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        extracted, staging = Path(tmp) / "extracted", Path(tmp) / "dataset"
        staging.mkdir()
        report(f"extracting {archive.name}")
        _extract(archive, kind, extracted, suffixes or None)
        try:
            files = _locate(extracted, layouts)
            if files is None and variant == "bow":
                if suffixes:  # the layouts' files are not there: look at everything
                    shutil.rmtree(extracted, ignore_errors=True)
                    _extract(archive, kind, extracted, None)
                files = _detect(extracted)
            if files is None:
                expected = ", ".join(f"{lay.folder}/{rel}" for lay in layouts for rel in lay.train + lay.test)
                found = f" (expected {expected})" if expected else ""
                raise XMLSparseError(f"no {variant} data set that xmlsparse reads is in it{found}")
            report(f"converting {', '.join(p.name for p in files.train + files.test)}")
            beyond, within = _count_checks(info, *_convert(files, staging, info.n_labels))
        except XMLSparseError as err:
            # Name the member inside the archive, not the temporary folder it was extracted to.
            reason = str(err).replace(f"{extracted}{os.sep}", "")
            raise XMLSparseError(f"archive {archive}: {reason}") from err
        if beyond and not force:
            raise XMLSparseError(
                f"archive {archive}: " + "; ".join(beyond) + f" (features and labels must match, points within "
                f"{POINTS_TOLERANCE:.0%}); install it anyway with --force"
            )
        mismatches = beyond + within
        for message in mismatches:
            warnings.warn(message, stacklevel=3)
            report(f"warning: {message}")
        meta = {
            "name": info.name,
            "kind": "download",
            "variant": variant,
            "source": source,
            "propensity_a": info.propensity_a,
            "propensity_b": info.propensity_b,
            "warnings": mismatches,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, target, variant)
    report(f"{info.name} installed in {target}")
