"""Helpers for tests that run real worker processes (``python -m worker.cli``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import REPO
from tests.patience import patience

if TYPE_CHECKING:
    from producer.client.face_client import FaceClient


# Another model than the tests' default worker (``arcface``): another name and another input scale over the same
# 512-d weights, so its embeddings differ while their dimension does not.
OTHER_MODEL_ENV = {"ARCFACE_MODEL_NAME": "arcface-b", "ARCFACE_INPUT_SCALE": "0.002"}


def queue_env(redis_url: str, prefix: str, **settings: str) -> dict[str, str]:
    """A worker's environment: ``ARCFACE_REDIS_URL``, a fresh ``ARCFACE_QUEUE`` (``<prefix>-<random>``) and
    ``settings`` (``ARCFACE_*`` names)."""
    return {"ARCFACE_REDIS_URL": redis_url, "ARCFACE_QUEUE": f"{prefix}-{uuid.uuid4().hex[:8]}", **settings}


class WorkerProcess:
    """An ``arcface-worker`` subprocess with its JSON log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str, **overrides: str) -> None:
        self.log_path = log_path
        self.env = full_env = {
            "ARCFACE_PRECISION": "float32",  # a fixed precision unless a test asks: no bf16 measuring at each start
            **os.environ,
            **env,
            "ARCFACE_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "ARCFACE_LOG_LEVEL": "DEBUG",
            **overrides,
        }
        self.log_file = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=full_env,
            cwd=REPO,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_ready(self, timeout: float = patience(120)) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == "worker_started" for e in self.events()):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def batches(self) -> list[dict]:
        return [e for e in self.events() if e.get("event") == "batch"]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(patience(10))

    def wait(self, timeout: float = patience(60)) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(patience(10))
        self.log_file.close()

    def client(self) -> FaceClient:
        """A FaceClient on this worker's Redis and queue."""
        from producer.client.face_client import FaceClient
        from producer.settings import ProducerSettings

        return FaceClient(ProducerSettings(redis_url=self.env["ARCFACE_REDIS_URL"], queue=self.env["ARCFACE_QUEUE"]))


@contextmanager
def ready_worker(env: dict[str, str], log_path: Path, timeout: float = patience(120)) -> Iterator[WorkerProcess]:
    """A worker started with ``env`` and ready to serve; stopped when the block ends."""
    worker = WorkerProcess(env, log_path)
    try:
        worker.wait_ready(timeout)
        yield worker
    finally:
        worker.stop()
