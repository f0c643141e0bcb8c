"""The container images, built and run with podman (Docker does not run on these machines; podman runs the same
Dockerfile). Base images cannot be pulled here, so the test builds its own python:3.11-slim stand-in with
debootstrap (Debian bookworm, Python 3.11) once per machine and passes it as ``PYTHON_IMAGE``.

Built: the CPU worker (with stand-in weights baked in through ``WEIGHTS_URL``, served by the test), the producer
and the dashboard images. Run: the worker container with exactly the environment compose gives the ``worker``
service on a fresh host (``${VAR:-}`` resolved with no host variables, an empty ./models mounted over /models),
jobs pushed from the producer container with the ``producer`` service's environment, the health check inside,
metrics, SIGTERM; the dashboard showing a job. Redis is the test's own redis-server on a loopback address of
its own at port 6379, so compose's ``redis://redis:6379/0`` resolves to it through ``--add-host``.

Skipped, with the reason, only where podman cannot run (not installed: .ci/run installs it with apt when it can).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.compose_env import service_environment
from tests.conftest import FACES, REPO

pytestmark = pytest.mark.slow

BASE_IMAGE = "localhost/arcface-test-base:bookworm"
IMAGES = {
    "worker": "localhost/arcface-test-worker:latest",
    "producer": "localhost/arcface-test-producer:latest",
    "dashboard": "localhost/arcface-test-dashboard:latest",
}
PODMAN = ["podman", "--runtime", "runc"]
# podman's default limits are refused on these machines
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
WEIGHTS_HOST = "arcface-weights.test"
TIMINGS: dict[str, float] = {}


def _run(args: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:6])}... exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


def _why_podman_cannot_run() -> str | None:
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        why = (
            os.environ.get("CONTAINER_TOOLS_UNAVAILABLE")
            or "install them: apt-get install podman buildah runc debootstrap"
        )
        return f"{' and '.join(missing)} not installed ({why})"
    probe = subprocess.run(
        [*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        return f"podman cannot run here: {(probe.stderr or probe.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def podman():
    reason = _why_podman_cannot_run()
    if reason:
        pytest.skip(reason)


def _debian_mirror() -> str:
    """The machine's configured Debian source (deb822 or one-line format)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith(("#", " "))
            )
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1]
    return "http://deb.debian.org/debian"


def _pip_ca_bundle() -> Path:
    """The CA bundle pip is configured with on this machine (pip inside the build needs it)."""
    if os.environ.get("PIP_CERT"):
        return Path(os.environ["PIP_CERT"])
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".cert"):
            return Path(value.strip().strip("'\""))
    return Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(scope="module")
def base_image(podman):
    """A python:3.11-slim stand-in (Debian bookworm, python = python3.11), built once per machine."""
    if subprocess.run([*PODMAN, "image", "exists", BASE_IMAGE]).returncode == 0:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        pytest.skip(
            f"{BASE_IMAGE} is missing and debootstrap is not installed to build it (apt-get install debootstrap)"
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3.11,python3.11-venv,python3-pip,ca-certificates,passwd",
                "bookworm",
                str(root),
                _debian_mirror(),
            ],
            timeout=900,
        )
        (root / "usr/bin/python").symlink_to("python3.11")
        shutil.copyfile(_pip_ca_bundle(), root / "etc/ssl/certs/pip-ca-bundle.crt")
        for cache in (root / "var/cache/apt/archives", root / "var/lib/apt/lists"):
            for item in cache.glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        _run(
            [
                *PODMAN,
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV PIP_CERT=/etc/ssl/certs/pip-ca-bundle.crt",
                "--change",
                'CMD ["python"]',
                "-",
                BASE_IMAGE,
            ],
            timeout=600,
            stdin=tar.stdout,
        )
        tar.wait(60)
    TIMINGS["base image (debootstrap + import), s"] = round(time.monotonic() - started, 1)
    return BASE_IMAGE


def _free_loopback(port: int) -> str:
    """A 127.x.y.z address of this test's own where ``port`` is free (never 127.0.0.1)."""
    for _ in range(50):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return host
            except OSError:
                continue
    raise RuntimeError(f"no free loopback address for port {port}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory) -> Path:
    """ArcFace with seeded random weights in deepface's .h5 format: the same bytes on every run, so the image's
    weights layer stays cached between runs."""
    import keras

    from tests.conftest import randomise_statistics
    from worker.model import build_arcface
    from worker.weights import save_deepface_h5

    keras.utils.set_random_seed(1234)
    model = build_arcface()
    randomise_statistics(model, seed=1234)
    return save_deepface_h5(model, tmp_path_factory.mktemp("baked") / "arcface_weights.h5")


@pytest.fixture(scope="module")
def reference_engine(stand_in_weights):
    from worker.engine import Engine
    from worker.model import load_face_model

    return Engine(load_face_model(stand_in_weights), allowed_batch_sizes=(1, 2))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def weights_server(stand_in_weights):
    """Serves the stand-in weights at http://arcface-weights.test/ (port 80 on a loopback address of its own,
    named through --add-host), so the build argument WEIGHTS_URL is the same on every run."""
    host = _free_loopback(80)
    try:
        server = http.server.ThreadingHTTPServer(
            (host, 80), functools.partial(_Quiet, directory=str(stand_in_weights.parent))
        )
        url = f"http://{WEIGHTS_HOST}/{stand_in_weights.name}"
    except OSError:  # not root: any port (the weights layer is then rebuilt each run)
        server = http.server.ThreadingHTTPServer(
            (host, 0), functools.partial(_Quiet, directory=str(stand_in_weights.parent))
        )
        url = f"http://{WEIGHTS_HOST}:{server.server_address[1]}/{stand_in_weights.name}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield host, url
    server.shutdown()


def _image_size(tag: str) -> int:
    return int(_run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", tag]).stdout.strip())


def _build(target: str, *args: str) -> None:
    started = time.monotonic()
    old = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Id}}", IMAGES[target]], capture_output=True, text=True
    ).stdout.strip()
    _run(
        [
            *PODMAN,
            "build",
            "--format",
            "docker",
            "--network=host",
            "--pull=never",
            *ULIMITS,
            "--build-arg",
            f"PYTHON_IMAGE={BASE_IMAGE}",
            "--target",
            target,
            "-t",
            IMAGES[target],
            *args,
            str(REPO),
        ],
        timeout=1200,
    )
    TIMINGS[f"build {target}, s"] = round(time.monotonic() - started, 1)
    new = _run([*PODMAN, "image", "inspect", "--format", "{{.Id}}", IMAGES[target]]).stdout.strip()
    if old and old != new:  # the previous build of this tag: no longer needed (kept if something still uses it)
        subprocess.run([*PODMAN, "rmi", old], capture_output=True)


@pytest.fixture(scope="module")
def images(base_image, weights_server, stand_in_weights, request):
    """The three images, built from the repository's Dockerfile (layers cached between runs)."""
    host, url = weights_server
    sha = hashlib.sha256(stand_in_weights.read_bytes()).hexdigest()
    _build("producer")
    _build("dashboard")
    _build(
        "worker",
        "--add-host",
        f"{WEIGHTS_HOST}:{host}",
        "--build-arg",
        f"WEIGHTS_URL={url}",
        "--build-arg",
        f"WEIGHTS_SHA256={sha}",
    )
    sizes = {name: _image_size(tag) for name, tag in IMAGES.items()}
    yield sizes
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if report is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            report.write("\n")
            report.write_line(
                "container images: "
                + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items())
                + f" (base {_image_size(BASE_IMAGE) / 1e9:.2f} GB); "
                + ", ".join(f"{k} {v}" for k, v in TIMINGS.items())
            )


class _Redis:
    """The test's own redis-server on 6379 at a loopback address of its own (compose's redis://redis:6379/0)."""

    def __init__(self, data_dir: Path) -> None:
        from producer.redisconn import redis_server_binary

        self.host = _free_loopback(6379)
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
        deadline = time.monotonic() + 10
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
        self.proc.wait(10)


@pytest.fixture(scope="module")
def redis_6379(tmp_path_factory):
    server = _Redis(tmp_path_factory.mktemp("redis6379"))
    yield server
    server.stop()


def _shared_dirs(tmp_path: Path) -> tuple[Path, Path]:
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


def _logs(name: str) -> list[str]:
    out = _run([*PODMAN, "logs", name], check=False)
    return (out.stdout + out.stderr).splitlines()


def _events(name: str) -> list[dict]:
    found = []
    for line in _logs(name):
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def _wait_for_event(name: str, event: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [e for e in _events(name) if e.get("event") == event]
        if hits:
            return hits[0]
        state = _run([*PODMAN, "inspect", "--format", "{{.State.Running}}", name], check=False).stdout.strip()
        if state == "false":
            raise AssertionError(f"container {name} stopped before {event}:\n" + "\n".join(_logs(name)[-40:]))
        time.sleep(0.5)
    raise AssertionError(f"no {event} from {name} within {timeout}s:\n" + "\n".join(_logs(name)[-40:]))


def _env_args(env: dict[str, str]) -> list[str]:
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


def _producer(redis_host: str, data: Path, *args: str, **env: str) -> dict:
    """arcface-producer in the producer image, with the compose producer service's environment (plus ``env``)."""
    out = _run(
        [
            *PODMAN,
            "run",
            "--rm",
            "--network=host",
            "--add-host",
            f"redis:{redis_host}",
            *ULIMITS,
            *_env_args({**service_environment("producer"), **env}),
            "-v",
            f"{data}:/data:ro",
            IMAGES["producer"],
            *args,
            "--json",
        ],
        timeout=180,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_container_with_the_compose_environment_serves_the_producer_container_and_stops_cleanly(
    images, redis_6379, reference_engine, tmp_path
):
    from rq.registry import StartedJobRegistry
    from rq.worker import Worker

    from producer.jobs import JSONSerializer

    data, models = _shared_dirs(tmp_path)
    env = service_environment("worker")  # what compose passes on a fresh host: ARCFACE_MODEL_PATH is empty
    assert env["ARCFACE_MODEL_PATH"] == ""
    # the image serves metrics on 9100; on this shared host network another port when 9100 is taken
    metrics_port = 9100 if _port_free(9100) else _free_port()
    extra = [] if metrics_port == 9100 else ["-e", f"ARCFACE_METRICS_PORT={metrics_port}"]
    name = f"arcface-test-worker-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    _run(
        [
            *PODMAN,
            "run",
            "-d",
            "--name",
            name,
            "--network=host",
            "--add-host",
            f"redis:{redis_6379.host}",
            *ULIMITS,
            *_env_args(env),
            *extra,
            "-v",
            f"{models}:/models:ro",
            "-v",
            f"{data}:/data:ro",
            IMAGES["worker"],
        ]
    )
    try:
        loaded = _wait_for_event(name, "model_loaded", 240)
        assert loaded["source"] == "/opt/arcface/cache/arcface_weights.h5"  # the baked weights, no mount, no download
        _wait_for_event(name, "worker_started", 240)
        TIMINGS["worker container start to worker_started, s"] = round(time.monotonic() - started, 1)

        embed = _producer(redis_6379.host, data, "embed", "/data/amy1.png", "--wait")
        got = np.asarray(embed["result"]["embedding"], dtype=np.float32)
        ref = reference_engine.embed_images([(data / n).read_bytes() for n in ("amy1.png", "amy2.png", "sheldon1.png")])
        assert embed["status"] == "finished" and float(np.max(np.abs(got - ref[0]))) < 1e-4
        same = _producer(redis_6379.host, data, "verify", "/data/amy1.png", "/data/amy2.png", "--wait")
        other = _producer(
            redis_6379.host, data, "verify", "/data/amy1.png", "/data/sheldon1.png", "--path", "--wait"
        )  # read from /data
        assert abs(same["result"]["distance"] - (1.0 - float(ref[0] @ ref[1]))) < 1e-4
        assert abs(other["result"]["distance"] - (1.0 - float(ref[0] @ ref[2]))) < 1e-4

        health = _run([*PODMAN, "exec", name, "arcface-worker-health"], check=False)
        assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout + health.stderr
        config = json.loads(
            _run([*PODMAN, "image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGES["worker"]]).stdout
        )
        assert config["Test"][-1] == "arcface-worker-health"  # the image's HEALTHCHECK survived the build
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "arcface_jobs_total{" in metrics

        _run([*PODMAN, "kill", "--signal", "TERM", name])
        assert _run([*PODMAN, "wait", name], timeout=90).stdout.strip() == "0"
        connection = redis.Redis(host=redis_6379.host, port=6379)
        assert StartedJobRegistry("arcface", connection=connection, serializer=JSONSerializer).get_job_ids() == []
        assert Worker.all(connection=connection) == []
        lines = _logs(name)
        assert all(isinstance(json.loads(line), dict) for line in lines), lines  # the container's output: JSON only
        assert json.loads(lines[-1])["event"] == "worker_stopped"
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)


def test_producer_image_has_no_tensorflow_and_runs_as_a_non_root_user(images):
    probe = _run(
        [
            *PODMAN,
            "run",
            "--rm",
            *ULIMITS,
            "--entrypoint",
            "python",
            IMAGES["producer"],
            "-c",
            "import importlib.util, os; print(importlib.util.find_spec('tensorflow') is None, os.getuid())",
        ]
    )
    assert probe.stdout.split() == ["True", "10001"]
    assert "arcface-producer" in _run([*PODMAN, "run", "--rm", *ULIMITS, IMAGES["producer"]]).stdout  # default: --help
    assert images["producer"] < images["worker"] / 4


def test_dashboard_image_shows_a_job_with_the_json_serializer(images, redis_6379, tmp_path):
    data, _ = _shared_dirs(tmp_path)
    job_id = _producer(redis_6379.host, data, "embed", "/data/amy1.png", ARCFACE_QUEUE="dashboard-test")[
        "job_id"
    ]  # no worker: queued
    port = _free_port()
    name = f"arcface-test-dashboard-{uuid.uuid4().hex[:8]}"
    env = service_environment("dashboard")  # compose's, plus this test's port; loopback only on the shared host network
    _run(
        [
            *PODMAN,
            "run",
            "-d",
            "--name",
            name,
            "--network=host",
            "--add-host",
            f"redis:{redis_6379.host}",
            *ULIMITS,
            *_env_args(env),
            "-e",
            f"RQ_DASHBOARD_PORT={port}",
            "-e",
            "RQ_DASHBOARD_BIND=127.0.0.1",
            IMAGES["dashboard"],
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/0/view/job/{job_id}", timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("dashboard not answering:\n" + "\n".join(_logs(name)[-30:])) from None
                time.sleep(0.5)
        assert page.status == 200
        data = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/0/data/job/{job_id}.json", timeout=10).read()
        )
        assert data["id"] == job_id and data["status"] == "queued"
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
