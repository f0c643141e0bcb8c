"""Downloading weights: once, atomically, resumable, sha256-checked, with a clear offline error.
Served from a local HTTP server on 127.0.0.1 (tests never touch the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from worker.inference.weights import WeightsError, download

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    _RangeHandler.requests = []
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
    assert list(tmp_path.iterdir()) == []


def test_offline_error_names_url_and_the_local_path_setting(tmp_path: Path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/arcface_weights.h5"
    with pytest.raises(WeightsError) as info:
        download(url, tmp_path / "w.h5", retries=1)
    assert url in str(info.value) and "ARCFACE_MODEL_PATH" in str(info.value)
