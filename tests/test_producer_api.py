"""The producer library's surface without a worker: only documented exceptions, a pool sized for concurrent
waiters, the embedded-Redis notice, and mypy on a small program using the typed client API."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, face_paths
from tests.patience import patience


@pytest.fixture()
def client(worker_env):
    from producer.client.face_client import FaceClient

    return FaceClient()


def test_waiters_block_concurrently_and_raise_only_documented_errors(client, monkeypatch):
    """150 threads wait on queued jobs (no worker): every one gets ResultTimeout after its own timeout, all at
    about the same time (each holds its own pooled connection); with a pool of 8 they queue for connections
    and still raise nothing but ResultTimeout."""
    from producer.client.face_client import FaceClient
    from producer.contract.errors import ArcFaceError, ResultTimeout

    ids = client.embed_many([face_paths()[0]] * 150)

    def wait_all(c: FaceClient, job_ids: list[str], timeout: float) -> tuple[list[BaseException], float]:
        errors: list[BaseException] = []
        lock = threading.Lock()

        def one(jid: str) -> None:
            try:
                c.result(jid, timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - the test collects whatever escapes
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=one, args=(j,)) for j in job_ids]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(patience(120))
        return errors, time.monotonic() - start

    errors, took = wait_all(client, ids, 2.0)
    assert len(errors) == 150 and all(isinstance(e, ResultTimeout) for e in errors), {type(e).__name__ for e in errors}
    assert took < patience(8), f"150 concurrent waiters of 2 s took {took:.1f}s"  # one after another: 300 s
    small = FaceClient(client.settings.model_copy(update={"redis_max_connections": 8}))
    errors, took = wait_all(small, ids[:60], 0.5)
    assert len(errors) == 60 and all(isinstance(e, ArcFaceError) and isinstance(e, ResultTimeout) for e in errors), {
        type(e).__name__ for e in errors
    }


def test_bad_arguments_raise_input_error_not_pydantic(client):
    from producer.contract.errors import InputError

    for kwargs in (
        {"threshold": 5},
        {"threshold": float("nan")},
        {"threshold": "0.5"},
        {"threshold": True},
        {"detect": "yolo"},
        {"ref": "r" * 1025},
        {"job_id": "order.42"},
    ):
        with pytest.raises(InputError):
            client.verify(face_paths()[0], face_paths()[1], **kwargs)
    with pytest.raises(InputError, match="image a"):
        client.verify(Path("/nonexistent/a.png"), face_paths()[1])
    with pytest.raises(InputError):
        client.result("x", timeout=float("nan"))
    assert len(client.queue) == 0


def test_redis_down_is_redis_unavailable(worker_env):
    from producer.client.face_client import FaceClient
    from producer.contract.errors import RedisUnavailable
    from producer.settings import ProducerSettings
    from tests.redis_server import free_port

    with pytest.raises(RedisUnavailable):
        FaceClient(ProducerSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))


def _python(
    *args: str, env: dict[str, str] | None = None, timeout: float = patience(60)
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in the repository (``env``: exactly this environment), its output captured as text."""
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_embedded_redis_is_announced_and_can_be_forbidden(monkeypatch):
    from producer.redisconn import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="afe-") as d:  # unix socket paths are short
        env = {"ARCFACE_DATA_DIR": d, "PYTHONPATH": str(REPO)}
        base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("ARCFACE_")}
        try:
            proc = _python("-m", "producer.cli", "status", "no-such-job", env={**base, **env})
            assert proc.returncode == 2
            assert "using the embedded Redis" in proc.stderr and "ARCFACE_REDIS_URL" in proc.stderr
        finally:
            EmbeddedRedis(Path(d)).shutdown()
        forbidden = _python(
            "-m", "producer.cli", "status", "no-such-job", env={**base, **env, "ARCFACE_EMBEDDED_REDIS": "false"}
        )
        assert forbidden.returncode == 2 and "ARCFACE_REDIS_URL is required" in forbidden.stderr
        assert not (Path(d) / "redis" / "redis.sock").exists()


def _mypy_strict(path: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on one file, as a user of the installed library would run it."""
    return _python(
        "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental", str(path), timeout=patience(300)
    )


def test_mypy_accepts_the_typed_client_example():
    proc = _mypy_strict(REPO / "examples" / "typed_client.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and mypy does catch misuse: a VerifyResult has no embedding
    bad = Path(tempfile.mkdtemp()) / "bad.py"
    bad.write_text(
        "from producer.client import FaceClient\n\n"
        "def f(c: FaceClient) -> None:\n    print(c.result_verify('x').embedding)\n"
    )
    proc = _mypy_strict(bad)
    assert proc.returncode == 1 and '"VerifyResult" has no attribute "embedding"' in proc.stdout, proc.stdout
