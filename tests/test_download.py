"""Downloading weights: once, atomically, resumable, sha256-checked, with a clear offline error.
Served from a local HTTP server on 127.0.0.1 (tests never touch the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import pytest

from tests.patience import patience
from worker.inference.cache import download
from worker.inference.weights import WeightsError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str | None] = []
    chunk_delay_s = 0.0  # > 0: the body goes out in 16 slices, this far apart (a download that takes a while)

    def do_GET(self) -> None:  # noqa: N802
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        step = -(-len(body) // 16)
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            time.sleep(type(self).chunk_delay_s)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    _RangeHandler.requests = []
    _RangeHandler.chunk_delay_s = 0.0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/arcface_weights.h5"
    httpd.shutdown()


def test_downloads_once_into_the_cache_with_pinned_sha(tmp_path: Path, server):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    dest = download(server, tmp_path / "arcface_weights.h5", sha256=sha)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "arcface_weights.h5.part").exists()
    download(server, dest, sha256=sha)
    assert len(_RangeHandler.requests) == 1  # second call found the cached file


def test_resumes_a_partial_download(tmp_path: Path, server):
    dest = tmp_path / "w.h5"
    (tmp_path / "w.h5.part").write_bytes(PAYLOAD[:1000])
    download(server, dest)
    assert _RangeHandler.requests == ["bytes=1000-"]
    assert dest.read_bytes() == PAYLOAD


def test_sha_mismatch_leaves_no_file(tmp_path: Path, server):
    with pytest.raises(WeightsError, match="expected 00"):
        download(server, tmp_path / "w.h5", sha256="00" * 32)
    assert [p.name for p in tmp_path.iterdir()] == ["w.h5.lock"]  # no weights, no partial file


def test_offline_error_names_url_and_the_local_path_setting(tmp_path: Path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/arcface_weights.h5"
    with pytest.raises(WeightsError) as info:
        download(url, tmp_path / "w.h5", retries=1)
    assert url in str(info.value) and "ARCFACE_MODEL_PATH" in str(info.value)


def test_concurrent_first_downloads_fetch_the_file_once(tmp_path: Path, server):
    """Two processes (here threads: the lock is per open file) asking for the same file at once: one downloads,
    the other waits for it and uses the same file."""
    _RangeHandler.chunk_delay_s = 0.01
    got: list[bytes] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            got.append(download(server, tmp_path / "w.h5").read_bytes())
        except BaseException as exc:  # noqa: BLE001  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=patience(30))
    assert errors == [] and got == [PAYLOAD, PAYLOAD]
    assert _RangeHandler.requests == [None]


def test_a_cached_download_changed_on_disk_is_downloaded_again(tmp_path: Path, server):
    import structlog

    dest = download(server, tmp_path / "w.h5")
    with dest.open("r+b") as f:
        f.truncate(1000)
    with structlog.testing.capture_logs() as logs:
        assert download(server, dest).read_bytes() == PAYLOAD
    assert _RangeHandler.requests == [None, None]
    assert [(e["event"], e["problem"]) for e in logs] == [
        ("cache_file_corrupt", f"it has 1000 bytes, {len(PAYLOAD)} were written")
    ]
