"""The container images of tests/test_container.py (loaded there with ``pytest_plugins``): podman, the test's own
python:3.11-slim stand-in base image (debootstrap), the stand-in weights and the server the worker image's build
downloads them from, and the three images built from the repository's Dockerfile. Also how commands are run."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

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


def run(args: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
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
        run(
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
        run(
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


def free_loopback(port: int) -> str:
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


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory) -> Path:
    """ArcFace with seeded random weights in deepface's .h5 format: the same bytes on every run, so the image's
    weights layer stays cached between runs."""
    import keras

    from tests.conftest import randomise_statistics
    from worker.inference.model import build_arcface
    from worker.inference.weights import save_deepface_h5

    keras.utils.set_random_seed(1234)
    model = build_arcface()
    randomise_statistics(model, seed=1234)
    return save_deepface_h5(model, tmp_path_factory.mktemp("baked") / "arcface_weights.h5")


@pytest.fixture(scope="module")
def reference_engine(stand_in_weights):
    from worker.inference.engine import Engine
    from worker.inference.model import load_face_model

    return Engine(load_face_model(stand_in_weights), allowed_batch_sizes=(1, 2))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def weights_server(stand_in_weights):
    """Serves the stand-in weights at http://arcface-weights.test/ (port 80 on a loopback address of its own,
    named through --add-host), so the build argument WEIGHTS_URL is the same on every run."""
    host = free_loopback(80)
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
    return int(run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", tag]).stdout.strip())


def _build(target: str, *args: str) -> None:
    started = time.monotonic()
    old = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Id}}", IMAGES[target]], capture_output=True, text=True
    ).stdout.strip()
    run(
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
    new = run([*PODMAN, "image", "inspect", "--format", "{{.Id}}", IMAGES[target]]).stdout.strip()
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
