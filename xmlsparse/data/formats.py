"""Readers and writers for the data formats of extreme multi-label classification.

Every reader returns an `XMCData`: features as CSR float32 (or dense float32 rows), labels as
CSR float32 with sorted indices. Bad input raises one `XMLSparseError` that names the file and,
where it applies, the 1-based line number and what was expected.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import math
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.datasets import dump_svmlight_file, load_svmlight_file
from sklearn.feature_extraction.text import TfidfVectorizer

from xmlsparse.atomic import atomic_write
from xmlsparse.data.cache import load_cached
from xmlsparse.data.types import PathLike, XMCData
from xmlsparse.errors import XMLSparseError

DEFAULT_MAX_FEATURES = 100_000
"""Vocabulary size of the tf-idf features built from AttentionXML text."""


# ---------------------------------------------------------------------------------------------
# svmlight-style text: XC text ("N D L", "l1,l2 f:v ...") and the split format ("N D" + "N L")


@dataclass(frozen=True)
class _Columns:
    """What the id:value pairs of a text body index, for parsing and for error messages."""

    kind: str  # "feature" or "label"
    symbol: str  # the header field that bounds them: "D" or "L"
    count: int


_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # an archive with members, an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class _GzipReader(gzip.GzipFile):
    """A gzip file whose damaged or truncated content raises an XMLSparseError naming the file.

    Only `read` and `readline` are wrapped: they are all that the readers here and scikit-learn's
    svmlight parser (which iterates over lines, i.e. calls readline) use.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self.source = path

    def _damaged(self, error: Exception) -> XMLSparseError:
        return XMLSparseError(f"{self.source}: damaged gzip-compressed data ({error}); expected a complete gzip file")

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(size)
        except _GZIP_ERRORS as e:
            raise self._damaged(e) from None

    def readline(self, size: int | None = -1) -> bytes:
        try:
            return super().readline(size)
        except _GZIP_ERRORS as e:
            raise self._damaged(e) from None


def _open_raw(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise XMLSparseError(f"{path}: file not found") from None
    except OSError as e:
        raise XMLSparseError(f"{path}: cannot read ({e.strerror})") from None


def _open_binary(path: Path) -> BinaryIO:
    """Open a text source for reading bytes; gzip-compressed content is decompressed on the fly.

    The content decides, not the name: a `.gz` file and a compressed file named `.txt` both read.
    """
    f = _open_raw(path)
    if f.read(len(_GZIP_MAGIC)) != _GZIP_MAGIC:
        f.seek(0)
        return f
    f.close()
    return _GzipReader(path)


def _head(path: Path, size: int = 64) -> bytes:
    with _open_raw(path) as f:
        return f.read(size)


def _content_kind(head: bytes) -> str:
    """What a file's first bytes say it is, for a binary file that is not what its name promises."""
    if not head:
        return "the file is empty"
    if head.startswith(_GZIP_MAGIC):
        return "it is gzip-compressed"
    if head.startswith(_NPY_MAGIC):
        return "it is a .npy array"
    try:
        # an incremental decoder accepts a character cut in two by the end of `head`
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        return f"it is binary data starting {head[:8]!r}"
    first_line = text.removeprefix("\ufeff").split("\n")[0].strip()
    return f"it is text starting '{first_line[:40]}'"


def _read_header(f: IO[bytes], path: Path, fields: Sequence[str], meaning: str) -> list[int]:
    """Read the first line as len(fields) non-negative integers; D and L must be positive."""
    # editors on Windows may start UTF-8 text with a byte order mark; it is no part of the header
    line = f.readline().removeprefix(codecs.BOM_UTF8)
    expected = " ".join(fields)
    if not line.strip():
        what = "is empty" if not line else "starts with a blank line"
        raise XMLSparseError(f"{path} {what}; expected a header line '{expected}' ({meaning})")
    tokens = line.split()
    if len(tokens) != len(fields) or not all(t.isdigit() for t in tokens):
        found = line.decode("utf-8", "replace").strip()[:80]
        raise XMLSparseError(f"{path} line 1: expected the header '{expected}' ({meaning}), found '{found}'")
    values = [int(t) for t in tokens]
    for name, value in zip(fields[1:], values[1:]):
        if value < 1:
            raise XMLSparseError(f"{path} line 1: header field {name}={value}; expected a positive count")
    return values


def _parse_svmlight_body(
    f: BinaryIO, path: Path, n_points: int, columns: _Columns, n_labels: int | None
) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
    """Parse the lines after the header with scikit-learn's svmlight reader.

    Returns the id:value pairs as CSR [n_points, columns.count] and, when `n_labels` is given
    (XC text), the leading comma-separated label lists as a binary CSR [n_points, n_labels].
    """
    try:
        pairs, label_lists = load_svmlight_file(
            f, n_features=columns.count, dtype=np.float32, multilabel=True, zero_based=True
        )
    except XMLSparseError:
        raise  # damaged gzip data: the file, not a line, is at fault
    except ValueError as e:
        raise _locate_error(path, columns, n_labels, str(e)) from None
    label_ptr, label_ids = _flatten(label_lists)
    del label_lists  # one Python tuple a point: by far the largest thing held here
    pair_ptr = pairs.indptr
    if pairs.shape[0] != n_points:
        rows = _rows_of_parsed_points(path, n_points, pairs.shape[0])
        pair_ptr = _spread_indptr(pair_ptr, rows, n_points)
        label_ptr = _spread_indptr(label_ptr, rows, n_points)
    # rebuilding lets scipy pick int32 indices where they fit (the reader returns int64)
    pairs = sp.csr_matrix((pairs.data, pairs.indices, pair_ptr), shape=(n_points, columns.count))
    # the reader takes 'nan' and 'inf' for numbers; training on them ends in a NaN loss much later
    if not np.isfinite(pairs.data).all():
        raise _locate_error(path, columns, n_labels, "a value is not finite")

    if n_labels is None:
        if label_ids.size:  # a token without ':' is where the reader expects a label list
            raise _locate_error(path, columns, None, "a token is not 'id:value'")
        return pairs, None

    # the reader parses label ids as floats; check them all at once, find the line only on failure
    if label_ids.size and (
        (label_ids < 0).any() or (label_ids >= n_labels).any() or (label_ids != np.floor(label_ids)).any()
    ):
        raise _locate_error(path, columns, n_labels, "bad label id")
    return pairs, _binary_label_matrix(label_ptr, label_ids.astype(np.int64), n_labels)


def _flatten(lists: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Row pointer and concatenated values of a list of per-point id lists."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.float64, count=int(indptr[-1]))
    return indptr, values


def _binary_label_matrix(indptr: np.ndarray, label_ids: np.ndarray, n_labels: int) -> sp.csr_matrix:
    """CSR [N, L] with value 1 per listed label; a label listed twice on one line counts once."""
    n_points = indptr.size - 1
    matrix = sp.csr_matrix(
        (np.ones(label_ids.size, dtype=np.float32), label_ids, indptr), shape=(n_points, n_labels)
    )
    if not matrix.has_canonical_format:
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
    return matrix


def _body_lines(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """(1-based line number, tokens) of every line after the header; '#' starts a comment, as for the reader."""
    with _open_binary(path) as f:
        f.readline()
        for line_no, line in enumerate(f, start=2):
            yield line_no, line.partition(b"#")[0].split()


def _rows_of_parsed_points(path: Path, n_points: int, n_parsed: int) -> np.ndarray:
    """Point index of each parsed (non-blank) line, when blank lines are points without labels or features.

    The reader skips blank lines; they count as empty points when the first `n_points` body lines
    hold all the content. Called only when the parsed count differs from the header's.
    """
    blank = np.array([not tokens for _, tokens in _body_lines(path)], dtype=bool)
    content = np.flatnonzero(~blank)
    beyond = content[content >= n_points]
    if beyond.size:
        raise XMLSparseError(
            f"{path} line {beyond[0] + 2}: the header (line 1) says N={n_points} points but the body goes on "
            f"({n_parsed} non-blank lines)"
        )
    if blank.size < n_points:
        raise XMLSparseError(
            f"{path}: the header (line 1) says N={n_points} points but the body has only {blank.size} lines "
            f"(ends at line {blank.size + 1})"
        )
    return content


def _spread_indptr(indptr: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Row pointer that puts the given rows at positions `rows` of n_rows; the other rows are empty."""
    lengths = np.zeros(n_rows, dtype=np.int64)
    lengths[rows] = np.diff(indptr)
    spread = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=spread[1:])
    return spread


def _locate_error(path: Path, columns: _Columns, n_labels: int | None, reader_message: str) -> XMLSparseError:
    """Scan the file for the first line that breaks the format; only called once parsing failed."""
    for line_no, tokens in _body_lines(path):
        problem = _line_problem(tokens, columns, n_labels)
        if problem:
            return XMLSparseError(f"{path} line {line_no}: {problem}")
    return XMLSparseError(f"{path}: {reader_message}")


def _line_problem(tokens: list[bytes], columns: _Columns, n_labels: int | None) -> str | None:
    if tokens and n_labels is not None and b":" not in tokens[0]:
        for label in tokens[0].split(b","):
            if not label.isdigit():
                return f"label id '{_show(label)}' is not a non-negative integer (expected 'l1,l2,... f:v ...')"
            if int(label) >= n_labels:
                return f"label id {int(label)} >= L={n_labels} from the header"
        tokens = tokens[1:]
    previous = -1
    for token in tokens:
        index, colon, value = token.partition(b":")
        if not colon:
            return f"token '{_show(token)}' is not '{columns.kind}_id:value'"
        if not index.isdigit():
            return f"{columns.kind} id '{_show(index)}' is not a non-negative integer"
        index_value = int(index)
        if index_value >= columns.count:
            return f"{columns.kind} id {index_value} >= {columns.symbol}={columns.count} from the header"
        try:
            number = float(value)
        except ValueError:
            return f"value '{_show(value)}' of {columns.kind} {index_value} is not a number"
        if not math.isfinite(number):
            return f"value '{_show(value)}' of {columns.kind} {index_value} is not finite; expected a finite number"
        if index_value <= previous:
            return f"{columns.kind} ids must be increasing and unique ({index_value} after {previous})"
        previous = index_value
    return None


def _show(token: bytes) -> str:
    text = token.decode("utf-8", "replace")
    return text if len(text) <= 40 else text[:37] + "..."


def read_xc_text(path: PathLike) -> XMCData:
    """Read XC text: header 'N D L', then one point a line 'l1,l2,... f:v f:v ...' (0-based ids)."""
    path = Path(path)
    with _open_binary(path) as f:
        n_points, n_features, n_labels = _read_header(f, path, ("N", "D", "L"), "points, features, labels")
        X, Y = _parse_svmlight_body(f, path, n_points, _Columns("feature", "D", n_features), n_labels)
    return XMCData(X=X, Y=Y, n_features=n_features, n_labels=n_labels)


def write_xc_text(path: PathLike, data: XMCData) -> None:
    """Write XC text (labels only, relevance values are not kept); the file appears complete or not at all."""
    if data.X.shape[1] > data.n_features or data.Y.shape[1] > data.n_labels:
        raise ValueError(
            f"X {data.X.shape} / Y {data.Y.shape} do not fit n_features={data.n_features}, n_labels={data.n_labels}"
        )
    with atomic_write(path) as f:
        f.write(f"{data.n_points} {data.n_features} {data.n_labels}\n".encode())
        dump_svmlight_file(data.X, data.Y, f, zero_based=True, multilabel=True)


def read_split_text(features_path: PathLike, labels_path: PathLike) -> XMCData:
    """Read the split format: 'N D' + 'f:v ...' lines, and 'N L' + 'l:relevance ...' lines."""
    features_path, labels_path = Path(features_path), Path(labels_path)
    with _open_binary(features_path) as xf, _open_binary(labels_path) as yf:
        n_points, n_features = _read_header(xf, features_path, ("N", "D"), "points, features")
        n_label_points, n_labels = _read_header(yf, labels_path, ("N", "L"), "points, labels")
        if n_points != n_label_points:
            raise XMLSparseError(
                f"{features_path} has N={n_points} points but {labels_path} has N={n_label_points} "
                "(line 1 of each); they must describe the same points"
            )
        X, _ = _parse_svmlight_body(xf, features_path, n_points, _Columns("feature", "D", n_features), None)
        Y, _ = _parse_svmlight_body(yf, labels_path, n_points, _Columns("label", "L", n_labels), None)
    return XMCData(X=X, Y=Y, n_features=n_features, n_labels=n_labels)


# ---------------------------------------------------------------------------------------------
# binary formats: scipy CSR .npz (pyxclib, PECOS) and dense .npy feature rows


def _first_non_finite_row(values: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the first NaN or infinity in dense rows, or None when all are finite."""
    # blocks of about 16M values keep the mask small for a memory-mapped file of any size
    block = max(1, (1 << 24) // max(values.shape[1], 1))
    for start in range(0, values.shape[0], block):
        finite = np.isfinite(values[start : start + block])
        if not finite.all():
            row, column = np.argwhere(~finite)[0]
            return start + int(row), int(column)
    return None


def _check_finite_csr(matrix: sp.csr_matrix, path: Path) -> None:
    bad = np.flatnonzero(~np.isfinite(matrix.data))
    if bad.size:
        row = int(np.searchsorted(matrix.indptr, bad[0], side="right")) - 1
        raise XMLSparseError(
            f"{path}: row {row} (counting from 0) holds {matrix.data[bad[0]]} in column {matrix.indices[bad[0]]}; "
            "expected finite values"
        )


def read_csr_npz(path: Path) -> sp.csr_matrix:
    """A CSR matrix saved by scipy.sparse.save_npz, as float32 with sorted, summed indices and finite values."""
    head = _head(path)
    if not head.startswith(_ZIP_MAGICS):
        # numpy would take the file for a pickle and advise allow_pickle, which is beside the point
        raise XMLSparseError(
            f"{path}: not an npz archive ({_content_kind(head)}); "
            "expected a CSR matrix saved by scipy.sparse.save_npz"
        )
    try:
        matrix = sp.load_npz(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise XMLSparseError(
            f"{path}: cannot read a sparse matrix ({e}); expected a CSR matrix saved by scipy.sparse.save_npz"
        ) from None
    if matrix.format != "csr":
        raise XMLSparseError(
            f"{path}: key 'format' is '{matrix.format}'; expected a CSR matrix saved by scipy.sparse.save_npz"
        )
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    matrix.sum_duplicates()  # also sorts the indices
    _check_finite_csr(matrix, path)
    return matrix


def read_npy_features(path: PathLike) -> np.ndarray:
    """Dense finite float32 feature rows [N, d]; memory-mapped when the file already holds float32."""
    path = Path(path)
    head = _head(path)
    if head.startswith(_ZIP_MAGICS):
        raise XMLSparseError(f"{path}: is an .npz archive; expected a 2-D numeric array [points, dims] in .npy format")
    if not head.startswith(_NPY_MAGIC):
        # numpy would take the file for a pickle and advise allow_pickle, which is beside the point
        raise XMLSparseError(
            f"{path}: not a .npy file ({_content_kind(head)}); "
            "expected a 2-D numeric array [points, dims] in .npy format"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise XMLSparseError(f"{path}: cannot read a .npy array ({e})") from None
    if array.ndim != 2 or array.dtype.kind not in "fiu":
        found = f"shape {array.shape} of {array.dtype}"
        raise XMLSparseError(f"{path}: expected a 2-D numeric array [points, dims] in .npy format, found {found}")
    # checked after the conversion: float64 values beyond float32's range become infinite in it,
    # which the check below reports with the row (numpy's overflow warning would not name it)
    with np.errstate(over="ignore"):
        rows = array if array.dtype == np.float32 else np.asarray(array, dtype=np.float32)
    bad = _first_non_finite_row(rows)
    if bad is not None:
        row, column = bad
        raise XMLSparseError(
            f"{path}: row {row} (counting from 0) holds {rows[row, column]} in column {column}; "
            "expected finite feature values"
        )
    return rows


def _check_same_points(x_rows: int, x_path: Path, y_rows: int, y_path: Path) -> None:
    if x_rows != y_rows:
        raise XMLSparseError(
            f"{x_path} has {x_rows} rows but {y_path} has {y_rows}; features and labels must describe the same points"
        )


def read_npz_pair(x_path: PathLike, y_path: PathLike) -> XMCData:
    """Features from a CSR .npz (or dense .npy) and labels from a CSR .npz."""
    x_path, y_path = Path(x_path), Path(y_path)
    X = read_npy_features(x_path) if x_path.suffix == ".npy" else read_csr_npz(x_path)
    Y = read_csr_npz(y_path)
    _check_same_points(X.shape[0], x_path, Y.shape[0], y_path)
    return XMCData(X=X, Y=Y, n_features=X.shape[1], n_labels=Y.shape[1])


def with_npy_features(data: XMCData, features_path: PathLike, labels_path: PathLike) -> XMCData:
    """The same points with dense .npy feature rows in place of `data.X`; `labels_path` names the labels' file."""
    features = read_npy_features(features_path)
    _check_same_points(features.shape[0], Path(features_path), data.n_points, Path(labels_path))
    return XMCData(X=features, Y=data.Y, n_features=features.shape[1], n_labels=data.n_labels)


def write_npz_pair(x_path: PathLike, y_path: PathLike, data: XMCData) -> None:
    """Write X (CSR to .npz, dense to .npy) and Y (CSR .npz), each atomically."""
    with atomic_write(x_path) as f:
        if isinstance(data.X, np.ndarray):
            np.save(f, np.asarray(data.X, dtype=np.float32))
        else:
            sp.save_npz(f, sp.csr_matrix(data.X, dtype=np.float32))
    with atomic_write(y_path) as f:
        sp.save_npz(f, sp.csr_matrix(data.Y, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# AttentionXML text: one tokenised document a line + space-separated label strings a line


def _read_text_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only (documents may hold other Unicode line breaks)."""
    with _open_binary(path) as f:
        raw = f.read().removeprefix(codecs.BOM_UTF8)  # a byte order mark is no part of the first line
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        raise XMLSparseError(f"{path} line {line_no}: not valid UTF-8 ({e.reason})") from None
    if not text:
        raise XMLSparseError(f"{path} is empty; expected one point a line")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_attentionxml(
    texts_path: PathLike,
    labels_path: PathLike,
    label_map: dict[str, int] | None = None,
    vectorizer: TfidfVectorizer | None = None,
    *,
    max_features: int = DEFAULT_MAX_FEATURES,
) -> tuple[XMCData, dict[str, int], TfidfVectorizer]:
    """Read AttentionXML text and turn it into tf-idf features and label ids.

    Training files: pass no `label_map`/`vectorizer`; labels get ids in order of first appearance
    and a sublinear tf-idf vectorizer is fitted. Test files: pass the training map and vectorizer;
    labels the map does not know are dropped (with a warning that counts them).
    """
    texts_path, labels_path = Path(texts_path), Path(labels_path)
    texts = _read_text_lines(texts_path)
    label_lines = _read_text_lines(labels_path)
    if len(texts) != len(label_lines):
        raise XMLSparseError(
            f"{texts_path} has {len(texts)} lines but {labels_path} has {len(label_lines)}; "
            "expected one line per point in each"
        )

    if label_map is None:
        label_map = {}
        for line in label_lines:
            for label in line.split():
                label_map.setdefault(label, len(label_map))
    rows = [sorted({label_map[label] for label in line.split() if label in label_map}) for line in label_lines]
    n_unknown = sum(label not in label_map for line in label_lines for label in line.split())
    if n_unknown:
        warnings.warn(
            f"{labels_path}: dropped {n_unknown} label occurrences not in the training label map", stacklevel=2
        )
    label_ptr, label_ids = _flatten(rows)
    Y = _binary_label_matrix(label_ptr, label_ids.astype(np.int64), len(label_map))

    try:
        if vectorizer is None:
            vectorizer = TfidfVectorizer(
                token_pattern=r"\S+", lowercase=False, sublinear_tf=True, max_features=max_features, dtype=np.float32
            )
            X = vectorizer.fit_transform(texts)
        else:
            X = vectorizer.transform(texts)
    except ValueError as e:
        raise XMLSparseError(f"{texts_path}: cannot build tf-idf features ({e})") from None
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sort_indices()
    return XMCData(X=X, Y=Y, n_features=X.shape[1], n_labels=len(label_map)), label_map, vectorizer


def save_label_map(path: PathLike, label_map: dict[str, int]) -> None:
    """Write one label string a line, in id order (line i + 1 holds label id i)."""
    labels = sorted(label_map, key=label_map.__getitem__)
    if [label_map[label] for label in labels] != list(range(len(labels))):
        raise ValueError("label ids must be 0 .. len(label_map) - 1")
    with atomic_write(path) as f:
        f.write("".join(f"{label}\n" for label in labels).encode("utf-8"))


def load_label_map(path: PathLike) -> dict[str, int]:
    """Read a label map written by save_label_map."""
    path = Path(path)
    label_map: dict[str, int] = {}
    for line_no, label in enumerate(_read_text_lines(path), start=1):
        if not label or label != label.strip() or len(label.split()) != 1:
            raise XMLSparseError(f"{path} line {line_no}: expected one label string without spaces, found '{label}'")
        if label in label_map:
            raise XMLSparseError(f"{path} line {line_no}: label '{label}' repeats line {label_map[label] + 1}")
        label_map[label] = line_no - 1
    return label_map


# ---------------------------------------------------------------------------------------------
# one entry point for a split, whatever its format


def _text_name(path: Path) -> tuple[str, str]:
    """A text file's name without a trailing '.gz', and that suffix ('' if none): the readers decompress."""
    if path.name.endswith(".gz"):
        return path.name[: -len(".gz")], ".gz"
    return path.name, ""


def _labels_partner(path: Path) -> Path | None:
    """The labels file that goes with a features/texts file, from the naming conventions."""
    name, gz = _text_name(path)
    if name.endswith("_X_Xf.txt"):
        return path.with_name(name[: -len("Xf.txt")] + "Y.txt" + gz)
    if name.endswith("_texts.txt"):
        return path.with_name(name[: -len("texts.txt")] + "labels.txt" + gz)
    if name.startswith("X.") and path.suffix in (".npz", ".npy"):
        return path.with_name("Y." + name[2:]).with_suffix(".npz")
    return None


def _training_pair(texts_path: Path, labels_path: Path) -> tuple[Path, Path]:
    """The AttentionXML training files whose vocabulary and label map a split uses (itself if it is them)."""
    if "train" in texts_path.name or "trn" in texts_path.name:
        return texts_path, labels_path

    def to_train(p: Path) -> Path:
        return p.with_name(p.name.replace("test", "train", 1).replace("tst", "trn", 1))

    train_texts, train_labels = to_train(texts_path), to_train(labels_path)
    if not (train_texts.is_file() and train_labels.is_file()):
        raise XMLSparseError(
            f"{texts_path}: AttentionXML text needs the training files {train_texts} and {train_labels} "
            "beside it (the vocabulary and the label map come from them)"
        )
    return train_texts, train_labels


def _read_attentionxml_split(texts_path: Path, labels_path: Path) -> XMCData:
    train_texts, train_labels = _training_pair(texts_path, labels_path)
    train, label_map, vectorizer = read_attentionxml(train_texts, train_labels)
    if (train_texts, train_labels) == (texts_path, labels_path):
        return train
    return read_attentionxml(texts_path, labels_path, label_map, vectorizer)[0]


def load_split(path_or_paths: PathLike | Sequence[PathLike]) -> XMCData:
    """Read one split, choosing the reader from the file names; text formats go through the cache.

    Accepted: an XC text file; `*_X_Xf.txt` (+ `*_X_Y.txt`); `*_texts.txt` (+ `*_labels.txt`, with
    the training files beside it); `X.*.npz|npy` (+ `Y.*.npz`). Text files may be gzip-compressed
    (named with or without '.gz'). The partner file is found by name when only the first is given;
    pairs are (features, labels).
    """
    given = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    paths = [Path(p) for p in given]
    if len(paths) == 1 and (partner := _labels_partner(paths[0])) is not None:
        paths.append(partner)

    if len(paths) == 1 and paths[0].suffix not in (".npz", ".npy"):
        xc_path = paths[0]
        return load_cached([xc_path], lambda: read_xc_text(xc_path), variant="xc-text")
    if len(paths) == 2:
        first, second = paths
        first_name, _ = _text_name(first)
        if first_name.endswith("_X_Xf.txt"):
            return load_cached(paths, lambda: read_split_text(first, second), variant="split-text")
        if first_name.endswith("_texts.txt"):
            sources = list(dict.fromkeys([first, second, *_training_pair(first, second)]))
            return load_cached(
                sources,
                lambda: _read_attentionxml_split(first, second),
                variant=f"attentionxml-tfidf-{DEFAULT_MAX_FEATURES}",
            )
        if first.suffix in (".npz", ".npy") and second.suffix == ".npz":
            return read_npz_pair(first, second)  # already binary: a cache would only double the disk use
    shown = ", ".join(str(p) for p in paths)
    raise XMLSparseError(
        f"cannot tell the data format of {shown}: expected an XC text file, '*_X_Xf.txt' + '*_X_Y.txt', "
        "'*_texts.txt' + '*_labels.txt', or 'X.*.npz|npy' + 'Y.*.npz'"
    )
