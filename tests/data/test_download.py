"""download_dataset against a real HTTP server on 127.0.0.1 serving archives built here."""

import gzip
import io
import json
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import scipy.sparse as sp

from xmlsparse.data import download
from xmlsparse.data.datasets import ArchiveLayout, DatasetInfo, Mirror, load_dataset
from xmlsparse.data.download import download_dataset
from xmlsparse.errors import XMLSparseError

from cli_checks import cli, error_line, tree

# A tiny data set: 4 train points, 3 test points, 6 features, 5 labels.
X_TRN = sp.csr_matrix(
    np.array([[1, 0, 0, 0.5, 0, 0], [0, 0.25, 0, 0, 0, 0], [0, 0, 1, 0, 0, 2], [0, 0, 0, 0, 3, 0]], np.float32)
)
Y_TRN = sp.csr_matrix(np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]], np.float32))
X_TST = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0], [0.5, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 1]], np.float32))
Y_TST = sp.csr_matrix(np.array([[0, 1, 0, 0, 0], [0, 0, 1, 0, 1], [1, 0, 0, 1, 0]], np.float32))

PECOS_LAYOUT = ArchiveLayout(
    "xmc-base/tiny", "npz", ("tfidf-attnxml/X.trn.npz", "Y.trn.npz"), ("tfidf-attnxml/X.tst.npz", "Y.tst.npz")
)
DRIVE_LAYOUT = ArchiveLayout("Tiny", "xc-text", ("tiny_train.txt",), ("tiny_test.txt",))
RAW_LAYOUT = ArchiveLayout("Tiny.raw", "raw-json", ("trn.raw.json.gz",), ("tst.raw.json.gz",))
TIMEOUT = dict(attempts=3, timeout=5.0)


def xc_text(X, Y) -> str:
    lines = [f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}"]
    for i in range(X.shape[0]):
        labels = ",".join(str(j) for j in Y[i].indices)
        features = " ".join(f"{j}:{v:g}" for j, v in zip(X[i].indices, X[i].data))
        lines.append(f"{labels} {features}")
    return "\n".join(lines) + "\n"


def npz_bytes(matrix) -> bytes:
    buffer = io.BytesIO()
    sp.save_npz(buffer, matrix)
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def pecos_archive() -> bytes:
    base = "xmc-base/tiny/"
    return tar_gz(
        {
            base + "tfidf-attnxml/X.trn.npz": npz_bytes(X_TRN),
            base + "tfidf-attnxml/X.tst.npz": npz_bytes(X_TST),
            base + "Y.trn.npz": npz_bytes(Y_TRN),
            base + "Y.tst.npz": npz_bytes(Y_TST),
            base + "X.trn.txt": b"raw text that the install does not need\n" * 4,
        }
    )


def drive_archive() -> bytes:
    return zip_bytes(
        {"Tiny/tiny_train.txt": xc_text(X_TRN, Y_TRN).encode(), "Tiny/tiny_test.txt": xc_text(X_TST, Y_TST).encode()}
    )


def tiny_registry(
    *mirrors: Mirror, n_train: int = 4, n_test: int = 3, n_features: int = 6, n_labels: int = 5
) -> dict[str, DatasetInfo]:
    return {"tiny": DatasetInfo("tiny", n_features, n_labels, n_train, n_test, 1.5, 0.6, 2.6, mirrors)}


def pecos_mirror(url: str) -> Mirror:
    return Mirror(url, "bow", "tar.gz", PECOS_LAYOUT)


def drive_mirror(url: str) -> Mirror:
    return Mirror(url, "bow", "zip", DRIVE_LAYOUT)


def assert_installed(directory: Path) -> None:
    for split, X, Y in (("trn", X_TRN, Y_TRN), ("tst", X_TST, Y_TST)):
        np.testing.assert_allclose(sp.load_npz(directory / f"X.{split}.npz").toarray(), X.toarray())
        np.testing.assert_array_equal(sp.load_npz(directory / f"Y.{split}.npz").toarray(), Y.toarray())
    assert json.loads((directory / "meta.json").read_text())["name"] == "tiny"


def leftovers(root: Path) -> list[str]:
    """Everything in root except the installed data set folders."""
    return sorted(p.name for p in root.iterdir() if p.name not in ("tiny", "tiny-raw")) if root.exists() else []


# ---------------------------------------------------------------------------------------------------
# The server


class Server:
    """Routes a path to a handler(request_handler, nth_request_to_that_path); records every request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.routes = {}
        self.requests = []  # (path, query dict, headers dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> list:
        return [r for r in self.requests if r[0] == path]


@pytest.fixture
def server():
    state = Server(0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            parts = urlsplit(self.path)
            state.requests.append((parts.path, dict(parse_qsl(parts.query)), dict(self.headers)))
            route = state.routes.get(parts.path)
            if route is None:
                self.send_error(404)
                return
            route(self, len(state.hits(parts.path)))

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)


def send(handler, body: bytes, status: int = 200, content_type: str = "application/octet-stream", extra=None):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (extra or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def serve(body: bytes, honour_range: bool = True, content_type: str = "application/octet-stream"):
    def route(handler, nth):
        requested = handler.headers.get("Range")
        if honour_range and requested:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                send(handler, b"", 416, extra={"Content-Range": f"bytes */{len(body)}"})
                return
            extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
            send(handler, body[start:], 206, content_type, extra)
            return
        send(handler, body, 200, content_type)

    return route


def cut_first(body: bytes, then):
    """First request: announce the full length, send half, hang up. Later requests: `then`."""

    def route(handler, nth):
        if nth == 1:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/gzip")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        then(handler, nth)

    return route


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# Tests


def test_pecos_tar_gz_is_downloaded_converted_and_loadable(server, tmp_path):
    server.routes["/tiny.tar.gz"] = serve(pecos_archive())
    root = tmp_path / "data"
    messages = []
    out = download_dataset(
        "tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), progress=messages.append,
        **TIMEOUT,
    )
    assert out == root / "tiny"
    assert_installed(out)
    assert leftovers(root) == []
    assert sorted(p.name for p in out.iterdir()) == ["X.trn.npz", "X.tst.npz", "Y.trn.npz", "Y.tst.npz", "meta.json"]
    assert any("installed" in m for m in messages)
    train, test, info = load_dataset(out)
    assert (train.n_points, test.n_points, train.n_labels) == (4, 3, 5)
    assert info.name == "tiny" and (info.propensity_a, info.propensity_b) == (0.6, 2.6)


def test_falls_back_to_the_drive_zip_of_xc_text(server, tmp_path):
    server.routes["/uc"] = serve(drive_archive())
    root = tmp_path / "data"
    registry = tiny_registry(pecos_mirror(server.url("/missing.tar.gz")), drive_mirror(server.url("/uc?id=abc")))
    download_dataset("tiny", root, registry=registry, **TIMEOUT)
    assert_installed(root / "tiny")
    assert [r[0] for r in server.requests] == ["/missing.tar.gz", "/uc"]
    assert leftovers(root) == []


def test_cut_connection_is_resumed_with_a_range_request(server, tmp_path):
    body = pecos_archive()
    server.routes["/tiny.tar.gz"] = cut_first(body, serve(body))
    root = tmp_path / "data"
    messages = []
    download_dataset(
        "tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), progress=messages.append,
        **TIMEOUT,
    )
    first, second = server.hits("/tiny.tar.gz")
    assert "Range" not in first[2]
    assert second[2]["Range"] == f"bytes={len(body) // 2}-"
    assert any("retrying" in m for m in messages)
    assert_installed(root / "tiny")
    assert leftovers(root) == []


def test_server_that_ignores_range_restarts_from_scratch(server, tmp_path):
    body = pecos_archive()
    server.routes["/tiny.tar.gz"] = cut_first(body, serve(body, honour_range=False))
    root = tmp_path / "data"
    messages = []
    download_dataset(
        "tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), progress=messages.append,
        **TIMEOUT,
    )
    assert server.hits("/tiny.tar.gz")[1][2]["Range"] == f"bytes={len(body) // 2}-"
    assert any("ignored the request to resume" in m for m in messages)
    assert_installed(root / "tiny")


def test_part_file_from_an_earlier_run_is_resumed(server, tmp_path):
    body = pecos_archive()
    url = server.url("/tiny.tar.gz")
    root = tmp_path / "data"
    root.mkdir()
    (root / "tiny.tar.gz.part").write_bytes(body[:100])
    (root / "tiny.tar.gz.part.url").write_text(url)
    server.routes["/tiny.tar.gz"] = serve(body)
    download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(url)), **TIMEOUT)
    assert server.hits("/tiny.tar.gz")[0][2]["Range"] == "bytes=100-"
    assert_installed(root / "tiny")
    assert leftovers(root) == []


def test_part_file_of_another_source_is_not_resumed(server, tmp_path):
    body = pecos_archive()
    root = tmp_path / "data"
    root.mkdir()
    (root / "tiny.tar.gz.part").write_bytes(b"bytes of some other archive")
    (root / "tiny.tar.gz.part.url").write_text("http://elsewhere.invalid/tiny.tar.gz")
    server.routes["/tiny.tar.gz"] = serve(body)
    download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), **TIMEOUT)
    assert "Range" not in server.hits("/tiny.tar.gz")[0][2]
    assert_installed(root / "tiny")


def test_html_page_is_refused_naming_the_url(server, tmp_path):
    page = b"<!DOCTYPE html><html><head><title>Quota exceeded</title></head><body>Too many users</body></html>"
    server.routes["/tiny.tar.gz"] = serve(page, content_type="text/html; charset=utf-8")
    root = tmp_path / "data"
    url = server.url("/tiny.tar.gz")
    with pytest.raises(XMLSparseError) as caught:
        download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(url)), **TIMEOUT)
    message = str(caught.value)
    assert url in message and "HTML page" in message and "Quota exceeded" in message
    assert leftovers(root) == [] and not (root / "tiny").exists()


@pytest.mark.parametrize(
    "page",
    [
        # The current page: a form whose hidden inputs carry the confirmation.
        '<html><head><title>Google Drive - Virus scan warning</title></head><body>'
        '<form id="download-form" action="{base}/download" method="get">'
        '<input type="submit" value="Download anyway"/>'
        '<input type="hidden" name="id" value="abc"><input type="hidden" name="export" value="download">'
        '<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-123"></form>'
        "</body></html>",
        # The older page: a link with a confirm token.
        '<html><body><a id="uc-download-link" href="/download?export=download&amp;confirm=Xy_9&amp;id=abc">'
        "Download anyway</a></body></html>",
    ],
    ids=["form", "token"],
)
def test_drive_virus_scan_page_is_confirmed(server, tmp_path, page):
    server.routes["/uc"] = serve(page.format(base=server.url("")).encode(), content_type="text/html; charset=utf-8")
    server.routes["/download"] = serve(drive_archive())
    root = tmp_path / "data"
    registry = tiny_registry(drive_mirror(server.url("/uc?export=download&id=abc")))
    download_dataset("tiny", root, registry=registry, **TIMEOUT)
    assert_installed(root / "tiny")
    (confirmed,) = server.hits("/download")
    query = confirmed[1]
    assert query["id"] == "abc" and query["confirm"] in ("t", "Xy_9")
    if query["confirm"] == "t":
        assert query["uuid"] == "u-123"
    assert leftovers(root) == []


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "corrupt"),
        (pecos_archive()[:300], "corrupt"),
        (b"\x00\x01 these bytes are no archive", "not a tar.gz, tar or zip"),
        (zip_bytes({"Tiny/readme.txt": b"no data here"}), "no bow data set"),
    ],
    ids=["garbage-gzip", "truncated-tar-gz", "not-an-archive", "no-data-files"],
)
def test_bad_archive_is_refused_and_nothing_is_left(server, tmp_path, body, reason):
    server.routes["/tiny.tar.gz"] = serve(body)
    root = tmp_path / "data"
    with pytest.raises(XMLSparseError, match=reason):
        download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), **TIMEOUT)
    assert not root.exists()  # not even the root folder that the call created


def traversal_archives(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    absolute = str(tmp_path / "absolute-evil.txt")
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w:gz") as tar:
        info = tarfile.TarInfo("Tiny/tiny_train.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../outside.txt"
        tar.addfile(info)
    return {
        "dotdot-tar": (tar_gz({"Tiny/ok.txt": b"x", "../evil.txt": b"evil"}), "../evil.txt"),
        "absolute-tar": (tar_gz({absolute: b"evil"}), absolute.lstrip("/")),
        "dotdot-zip": (zip_bytes({"Tiny/ok.txt": b"x", "Tiny/../../evil.txt": b"evil"}), "evil.txt"),
        "symlink-out": (link.getvalue(), "outside the archive"),
    }


@pytest.mark.parametrize("case", ["dotdot-tar", "absolute-tar", "dotdot-zip", "symlink-out"])
def test_archive_members_escaping_the_folder_are_refused(tmp_path, case):
    body, named = traversal_archives(tmp_path)[case]
    archive = tmp_path / "evil.archive"
    archive.write_bytes(body)
    root = tmp_path / "data"
    with pytest.raises(XMLSparseError, match="refusing archive member") as caught:
        download_dataset("tiny", root, registry=tiny_registry(drive_mirror("http://127.0.0.1:9/")), from_file=archive)
    assert named in str(caught.value)
    written = sorted(p.name for p in tmp_path.rglob("*") if "evil" in p.name and p != archive)
    assert written == [] and leftovers(root) == []


def test_traversal_archive_served_over_http_is_refused(server, tmp_path):
    server.routes["/tiny.tar.gz"] = serve(tar_gz({"../evil.txt": b"evil"}))
    root = tmp_path / "data"
    with pytest.raises(XMLSparseError, match=r"refusing archive member '\.\./evil\.txt'"):
        download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), **TIMEOUT)
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert leftovers(root) == []


@pytest.mark.parametrize(
    "counts, message",
    [
        ({"n_train": 40}, "expects 40 train points, the archive has 4"),
        ({"n_test": 30}, "expects 30 test points, the archive has 3"),
        ({"n_features": 7}, "expects 7 features, the archive has 6"),
        ({"n_labels": 4}, "expects 4 labels, the archive has 5"),
    ],
    ids=["train-points", "test-points", "features", "labels"],
)
def test_counts_beyond_the_tolerance_are_refused_and_nothing_is_left(tmp_path, monkeypatch, counts, message):
    monkeypatch.setitem(download.REGISTRY, "tiny", tiny_registry(**counts)["tiny"])
    archive = tmp_path / "tiny.tar.gz"
    archive.write_bytes(pecos_archive())
    root = tmp_path / "data"
    line = error_line(cli("download-dataset", "tiny", "--root", root, "--from-file", archive))
    assert message in line and line.endswith("install it anyway with --force")
    assert not root.exists()


def test_force_installs_a_mismatch_and_warns_with_both_numbers(server, tmp_path):
    server.routes["/tiny.tar.gz"] = serve(pecos_archive())
    root = tmp_path / "data"
    messages = []
    with pytest.warns(UserWarning, match="expects 40 train points, the archive has 4"):
        download_dataset(
            "tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz")), n_train=40),
            progress=messages.append, force=True, **TIMEOUT,
        )
    assert "warning: tiny: the registry expects 40 train points, the archive has 4" in messages
    meta = json.loads((root / "tiny" / "meta.json").read_text())
    assert meta["warnings"] == ["tiny: the registry expects 40 train points, the archive has 4"]
    assert_installed(root / "tiny")


def repeated_archive(tmp_path: Path, times: int) -> Path:
    """The tiny train split repeated `times` times (4 x times points) in the Drive layout."""
    archive = tmp_path / "Tiny.zip"
    archive.write_bytes(
        zip_bytes(
            {
                "Tiny/tiny_train.txt": xc_text(sp.vstack([X_TRN] * times, "csr"), sp.vstack([Y_TRN] * times, "csr"))
                .encode(),
                "Tiny/tiny_test.txt": xc_text(X_TST, Y_TST).encode(),
            }
        )
    )
    return archive


@pytest.mark.parametrize("expected", [202, 199])
def test_points_within_one_percent_install_with_a_warning(tmp_path, expected):
    archive = repeated_archive(tmp_path, 50)  # 200 train points: 2 fewer than 202, 1 more than 199
    root = tmp_path / "data"
    registry = tiny_registry(drive_mirror("http://127.0.0.1:9/"), n_train=expected)
    with pytest.warns(UserWarning, match=f"expects {expected} train points, the archive has 200"):
        download_dataset("tiny", root, registry=registry, from_file=archive)
    assert json.loads((root / "tiny" / "meta.json").read_text())["warnings"] == [
        f"tiny: the registry expects {expected} train points, the archive has 200"
    ]


def test_points_just_beyond_one_percent_are_refused(tmp_path):
    archive = repeated_archive(tmp_path, 50)  # 200 train points: 3 fewer than 203 is beyond 1%
    root = tmp_path / "data"
    registry = tiny_registry(drive_mirror("http://127.0.0.1:9/"), n_train=203)
    with pytest.raises(XMLSparseError, match="expects 203 train points, the archive has 200"):
        download_dataset("tiny", root, registry=registry, from_file=archive)
    assert not root.exists()


def test_no_network_names_every_url_and_the_from_file_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = closed_port()
    urls = [f"http://127.0.0.1:{port}/tiny.tar.gz", f"http://127.0.0.1:{port}/uc?id=abc"]
    registry = tiny_registry(pecos_mirror(urls[0]), drive_mirror(urls[1]))
    started = time.monotonic()
    with pytest.raises(XMLSparseError) as caught:
        download_dataset("tiny", registry=registry, **TIMEOUT)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    for url in urls:
        assert url in message
    assert "refused" in message.lower()
    assert "xmlsparse download-dataset tiny --from-file ARCHIVE" in message
    assert leftovers(tmp_path / "data") == []


def test_from_file_installs_and_keeps_the_archive(tmp_path):
    archive = tmp_path / "Tiny.zip"
    archive.write_bytes(drive_archive())
    root = tmp_path / "data"
    out = download_dataset("tiny", root, registry=tiny_registry(drive_mirror("http://127.0.0.1:9/")), from_file=archive)
    assert_installed(out)
    assert archive.is_file() and leftovers(root) == []


def test_from_file_finds_an_unlisted_layout(tmp_path):
    # A folder layout that no mirror of the entry names: found by detection.
    archive = tmp_path / "other.tar.gz"
    archive.write_bytes(
        tar_gz(
            {"anything/train.txt": xc_text(X_TRN, Y_TRN).encode(), "anything/test.txt": xc_text(X_TST, Y_TST).encode()}
        )
    )
    root = tmp_path / "data"
    download_dataset("tiny", root, registry=tiny_registry(drive_mirror("http://127.0.0.1:9/")), from_file=archive)
    assert_installed(root / "tiny")


def test_from_file_html_page_is_refused(tmp_path):
    page = tmp_path / "tiny.zip"
    page.write_text("<!doctype html><html><body>Sign in</body></html>")
    with pytest.raises(XMLSparseError, match="is an HTML page, not an archive"):
        download_dataset("tiny", tmp_path / "data", registry=tiny_registry(), from_file=page)


def test_user_url_and_second_call_says_present(server, tmp_path):
    server.routes["/mirror/Tiny.zip"] = serve(drive_archive())
    root = tmp_path / "data"
    registry = tiny_registry(drive_mirror(server.url("/not-used")))
    download_dataset("tiny", root, registry=registry, url=server.url("/mirror/Tiny.zip"), **TIMEOUT)
    assert_installed(root / "tiny")
    assert [r[0] for r in server.requests] == ["/mirror/Tiny.zip"]
    messages = []
    out = download_dataset("tiny", root, registry=registry, progress=messages.append, **TIMEOUT)
    assert out == root / "tiny"
    assert messages == [f"tiny is already present in {root / 'tiny'}"]
    assert len(server.requests) == 1


def test_install_keeps_user_files_in_an_existing_folder(tmp_path):
    root = tmp_path / "data"
    (root / "tiny").mkdir(parents=True)
    features = root / "tiny" / "X.trn.npy"
    np.save(features, np.zeros((4, 2), np.float32))
    archive = tmp_path / "Tiny.zip"
    archive.write_bytes(drive_archive())
    download_dataset("tiny", root, registry=tiny_registry(drive_mirror("http://127.0.0.1:9/")), from_file=archive)
    assert_installed(root / "tiny")
    assert features.is_file()


def test_raw_variant_writes_texts_and_labels(server, tmp_path):
    def json_lines(Y) -> bytes:
        records = [
            {"uid": str(i), "title": f"title {i}", "content": f"some\ncontent {i}", "target_ind": Y[i].indices.tolist()}
            for i in range(Y.shape[0])
        ]
        return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())

    archive = zip_bytes({"Tiny.raw/trn.raw.json.gz": json_lines(Y_TRN), "Tiny.raw/tst.raw.json.gz": json_lines(Y_TST)})
    server.routes["/raw"] = serve(archive)
    root = tmp_path / "data"
    registry = tiny_registry(Mirror(server.url("/raw"), "raw", "zip", RAW_LAYOUT))
    out = download_dataset("tiny", root, variant="raw", registry=registry, **TIMEOUT)
    assert out == root / "tiny-raw"
    texts = (out / "train_raw_texts.txt").read_text().splitlines()
    assert texts[1] == "title 1 some content 1" and len(texts) == 4
    np.testing.assert_array_equal(sp.load_npz(out / "Y.tst.npz").toarray(), Y_TST.toarray())
    assert leftovers(root) == []


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(XMLSparseError, match="unknown data set 'nope'"):
        download_dataset("nope", tmp_path)
    with pytest.raises(XMLSparseError, match="variant 'text'"):
        download_dataset("eurlex-4k", tmp_path, variant="text")
    with pytest.raises(XMLSparseError, match="not both"):
        download_dataset("eurlex-4k", tmp_path, url="http://127.0.0.1:9/x.zip", from_file=tmp_path / "x.zip")
    with pytest.raises(XMLSparseError, match="no such file"):
        download_dataset("eurlex-4k", tmp_path, from_file=tmp_path / "x.zip")


def test_server_errors_are_retried_a_bounded_number_of_times(server, tmp_path):
    server.routes["/tiny.tar.gz"] = lambda handler, nth: handler.send_error(503)
    root = tmp_path / "data"
    with pytest.raises(XMLSparseError, match="gave up after 3 attempts: HTTP 503"):
        download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(server.url("/tiny.tar.gz"))), **TIMEOUT)
    assert len(server.hits("/tiny.tar.gz")) == 3
    assert leftovers(root) == []


def test_whole_file_already_on_disk_is_not_fetched_again(server, tmp_path):
    # A conversion that failed for want of memory or disk leaves the complete .part behind.
    body = pecos_archive()
    url = server.url("/tiny.tar.gz")
    root = tmp_path / "data"
    root.mkdir()
    (root / "tiny.tar.gz.part").write_bytes(body)
    (root / "tiny.tar.gz.part.url").write_text(url)
    server.routes["/tiny.tar.gz"] = serve(body)
    download_dataset("tiny", root, registry=tiny_registry(pecos_mirror(url)), **TIMEOUT)
    (request,) = server.hits("/tiny.tar.gz")
    assert request[2]["Range"] == f"bytes={len(body)}-"
    assert_installed(root / "tiny")


# ---------------------------------------------------------------------------------------------------
# Through the command line


def eurlex_sample(tmp_path: Path) -> Path:
    """300 train and 100 test points with eurlex-4k's 5,000 features and 3,993 labels, in its Drive layout."""
    rng = np.random.default_rng(0)

    def split(n: int) -> str:
        rows = np.arange(n)
        X = sp.csr_matrix((np.ones(n, np.float32), (rows, rng.integers(0, 5000, n))), shape=(n, 5000))
        Y = sp.csr_matrix((np.ones(n, np.float32), (rows, rng.integers(0, 3993, n))), shape=(n, 3993))
        return xc_text(X, Y)

    archive = tmp_path / "Eurlex.zip"
    archive.write_bytes(zip_bytes({"Eurlex/eurlex_train.txt": split(300).encode(),
                                   "Eurlex/eurlex_test.txt": split(100).encode()}))
    return archive


def test_a_300_point_archive_is_not_installed_as_eurlex_4k(tmp_path):
    archive = eurlex_sample(tmp_path)
    root = tmp_path / "data"
    line = error_line(cli("download-dataset", "eurlex-4k", "--root", root, "--from-file", archive))
    assert "the registry expects 15539 train points, the archive has 300" in line
    assert "the registry expects 3809 test points, the archive has 100" in line
    assert "--force" in line
    assert not root.exists()


def test_force_installs_it_with_the_warning_on_stderr(tmp_path):
    archive = eurlex_sample(tmp_path)
    root = tmp_path / "data"
    result = cli("download-dataset", "eurlex-4k", "--root", root, "--from-file", archive, "--force")
    assert result.exit_code == 0, result.output
    assert "warning: eurlex-4k: the registry expects 15539 train points, the archive has 300" in result.stderr
    assert "warning: eurlex-4k: the registry expects 3809 test points, the archive has 100" in result.stderr
    assert sp.load_npz(root / "eurlex-4k" / "Y.trn.npz").shape == (300, 3993)
    assert tree(root) == ["eurlex-4k", *(f"eurlex-4k/{n}" for n in sorted(["X.trn.npz", "X.tst.npz", "Y.trn.npz",
                                                                           "Y.tst.npz", "meta.json"]))]


@pytest.mark.parametrize("root_existed", [False, True])
@pytest.mark.parametrize("failure", ["not-an-archive", "no-data-files", "unreachable-url"])
def test_a_failed_install_leaves_the_root_as_it_was(tmp_path, failure, root_existed):
    root = tmp_path / "data" / "xmc"
    if root_existed:
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    if failure == "unreachable-url":
        source = ["--url", f"http://127.0.0.1:{closed_port()}/Eurlex.zip"]
    else:
        archive = tmp_path / "Eurlex.zip"
        archive.write_bytes(b"\x00\x01 no archive" if failure == "not-an-archive" else zip_bytes({"Eurlex/a": b""}))
        before = tree(tmp_path)
        source = ["--from-file", archive]
    error_line(cli("download-dataset", "eurlex-4k", "--root", root, *source))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["file", "under-a-file", "read-only", "under-read-only", "data-set-is-a-file"])
def test_root_that_cannot_be_written_fails_before_any_work(tmp_path, read_only_folder, monkeypatch, case):
    monkeypatch.setattr(download, "_install", lambda *args: pytest.fail("the path is checked before any work"))
    archive = eurlex_sample(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "eurlex-4k").write_text("keep me")
    root, expected = {
        "file": (a_file, f"data root {a_file} exists and is not a folder"),
        "under-a-file": (a_file / "data", f"data root {a_file / 'data'} cannot be created: {a_file} is not a folder"),
        "read-only": (read_only_folder, f"data root {read_only_folder} is not writable"),
        "under-read-only": (
            read_only_folder / "data",
            f"data root {read_only_folder / 'data'} cannot be created: {read_only_folder} is not writable",
        ),
        "data-set-is-a-file": (taken, f"data set folder {taken / 'eurlex-4k'} exists and is not a folder"),
    }[case]
    before = tree(tmp_path)
    line = error_line(cli("download-dataset", "eurlex-4k", "--root", root, "--from-file", archive))
    assert line == f"error: {expected}"
    assert tree(tmp_path) == before and a_file.read_text() == "keep me"
