"""Running the images of tests/test_container.py (loaded there with ``pytest_plugins``, built by
:mod:`tests.container_images`): the test's redis-server on a loopback address at port 6379, free ports, the
shared ./data and ./models, a container's logs and events, and the producer image with compose's environment."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.compose_env import service_environment
from tests.conftest import FACES
from tests.container_images import IMAGES, PODMAN, ULIMITS, free_loopback, run
from tests.patience import patience


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


class _Redis:
    """The test's own redis-server on 6379 at a loopback address of its own (compose's redis://redis:6379/0)."""

    def __init__(self, data_dir: Path) -> None:
        from producer.redisconn import redis_server_binary

        self.host = free_loopback(6379)
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                self.host,
                "--port",
                "6379",
                "--dir",
                str(data_dir),
                "--save",
                "",
                "--logfile",
                str(data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(host=self.host, port=6379)
        deadline = time.monotonic() + patience(10)
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(patience(10))


@pytest.fixture(scope="module")
def redis_6379(tmp_path_factory):
    server = _Redis(tmp_path_factory.mktemp("redis6379"))
    yield server
    server.stop()


def shared_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """./data with three faces and an empty ./models, readable by the image's non-root user."""
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    models.mkdir()
    for name in ("amy1", "amy2", "sheldon1"):
        shutil.copyfile(FACES / name.rstrip("0123456789") / f"{name}.png", data / f"{name}.png")
        (data / f"{name}.png").chmod(0o644)
    data.chmod(0o755)
    models.chmod(0o755)
    return data, models


def container_logs(name: str) -> list[str]:
    out = run([*PODMAN, "logs", name], check=False)
    return (out.stdout + out.stderr).splitlines()


def _events(name: str) -> list[dict]:
    found = []
    for line in container_logs(name):
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def wait_for_event(name: str, event: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [e for e in _events(name) if e.get("event") == event]
        if hits:
            return hits[0]
        state = run([*PODMAN, "inspect", "--format", "{{.State.Running}}", name], check=False).stdout.strip()
        if state == "false":
            raise AssertionError(f"container {name} stopped before {event}:\n" + "\n".join(container_logs(name)[-40:]))
        time.sleep(0.5)
    raise AssertionError(f"no {event} from {name} within {timeout}s:\n" + "\n".join(container_logs(name)[-40:]))


def env_args(env: dict[str, str]) -> list[str]:
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


def run_producer(redis_host: str, data: Path, *args: str, **env: str) -> dict:
    """arcface-producer in the producer image, with the compose producer service's environment (plus ``env``)."""
    out = run(
        [
            *PODMAN,
            "run",
            "--rm",
            "--network=host",
            "--add-host",
            f"redis:{redis_host}",
            *ULIMITS,
            *env_args({**service_environment("producer"), **env}),
            "-v",
            f"{data}:/data:ro",
            IMAGES["producer"],
            *args,
            "--json",
        ],
        timeout=patience(180),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
