"""Build the CPU images with podman where base images cannot be pulled, and print how to run them.

    python docker/images.py [--weights FILE | --weights-url URL [--weights-sha256 HEX]] [--redis-url URL]
    (or ./dev image ...)

Docker Hub is out of reach on some machines, so ``python:3.11-slim-bookworm`` is replaced by a stand-in made
here once per machine: Debian bookworm (minbase, Python 3.11) from the machine's own Debian mirror with
debootstrap, imported into podman as :data:`BASE_IMAGE` with pip's CA bundle. The repository's Dockerfile is then
built unchanged, with ``PYTHON_IMAGE`` pointing at it (``docker build`` keeps its normal path). ``--weights FILE``
bakes a local weights file in: it is served on a loopback address of its own for the build's ``WEIGHTS_URL``.
podman runs with runc and explicit ulimits (its defaults are refused on such machines): :data:`PODMAN`,
:data:`ULIMITS`. tests/test_container.py builds its images with these same functions. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/arcface-python:3.11-slim-bookworm"
TAGS = {
    "worker": "localhost/arcface-service:cpu",
    "producer": "localhost/arcface-service:producer",
    "dashboard": "localhost/arcface-service:dashboard",
}
PODMAN = ["podman", "--runtime", "runc"]
# podman's default limits are refused on these machines
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
WEIGHTS_HOST = "arcface-weights.test"
TOOLS = "podman buildah runc debootstrap"


class ImageError(RuntimeError):
    """A build step that cannot run here (a missing tool) or failed."""


def run(args: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``args`` with output captured as text; with ``check``, a non-zero exit raises :class:`ImageError` with the
    output's tail."""
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise ImageError(
            f"{' '.join(args[:6])}... exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


def why_podman_cannot_run(missing_hint: str = "") -> str | None:
    """None when podman with runc runs here; otherwise why not, in one line (``missing_hint`` in place of the
    apt-get command where they are not installed)."""
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed ({missing_hint or f'apt-get install {TOOLS}'})"
    probe = subprocess.run(
        [*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        return f"podman cannot run here: {(probe.stderr or probe.stdout).strip()[-500:]}"
    return None


def debian_mirror() -> str:
    """The machine's configured Debian source for bookworm (deb822 or one-line format)."""
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


def pip_ca_bundle() -> Path:
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


def image_exists(tag: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", tag]).returncode == 0


def image_size(tag: str) -> int:
    """The image's size in bytes, as podman reports it."""
    return int(run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", tag]).stdout.strip())


def build_base_image(scale: float = 1.0) -> float | None:
    """Make :data:`BASE_IMAGE`, the python:3.11-slim stand-in (Debian bookworm, ``python`` = python3.11), unless
    it exists. Returns the seconds it took (None: it was there). Timeouts are multiplied by ``scale``."""
    if image_exists(BASE_IMAGE):
        return None
    if shutil.which("debootstrap") is None:
        raise ImageError(
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
                debian_mirror(),
            ],
            timeout=900 * scale,
        )
        (root / "usr/bin/python").symlink_to("python3.11")
        shutil.copyfile(pip_ca_bundle(), root / "etc/ssl/certs/pip-ca-bundle.crt")
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
            timeout=600 * scale,
            stdin=tar.stdout,
        )
        tar.wait(60 * scale)
    return round(time.monotonic() - started, 1)


def free_loopback(port: int) -> str:
    """A 127.x.y.z address where ``port`` is free (never 127.0.0.1)."""
    for _ in range(50):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return host
            except OSError:
                continue
    raise ImageError(f"no free loopback address for port {port}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def weights_server(weights: Path) -> Iterator[tuple[str, str]]:
    """Serves ``weights`` at http://arcface-weights.test/<name> (port 80 on a loopback address of its own, named to
    the build through ``--add-host``): yields that address and the URL. The same URL on every run keeps the image's
    weights layer cached; where port 80 cannot be bound (not root), any port (the layer is rebuilt each time)."""
    handler = functools.partial(_Quiet, directory=str(weights.parent))
    host = free_loopback(80)
    try:
        server = http.server.ThreadingHTTPServer((host, 80), handler)
        url = f"http://{WEIGHTS_HOST}/{weights.name}"
    except OSError:
        server = http.server.ThreadingHTTPServer((host, 0), handler)
        url = f"http://{WEIGHTS_HOST}:{server.server_address[1]}/{weights.name}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield host, url
    finally:
        server.shutdown()


def build(target: str, tag: str, *args: str, scale: float = 1.0) -> float:
    """``podman build`` of the Dockerfile's ``target`` on :data:`BASE_IMAGE` as ``tag`` (layers cached between
    runs; the image the tag named before is removed unless still in use). Returns the seconds it took."""
    started = time.monotonic()
    old = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True
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
            tag,
            *args,
            str(REPO),
        ],
        timeout=1200 * scale,
    )
    new = run([*PODMAN, "image", "inspect", "--format", "{{.Id}}", tag]).stdout.strip()
    if old and old != new:
        subprocess.run([*PODMAN, "rmi", old], capture_output=True)
    return round(time.monotonic() - started, 1)


def build_images(
    tags: dict[str, str],
    weights: Path | None = None,
    weights_url: str = "",
    weights_sha256: str = "",
    scale: float = 1.0,
) -> dict[str, float]:
    """The base image when missing, then each target of ``tags`` (producer, dashboard, worker) from the
    Dockerfile. The worker bakes in ``weights`` (a local file, served for the build, its SHA-256 checked) or
    ``weights_url``; with neither it downloads deepface's weights when it starts. Returns seconds per step."""
    timings: dict[str, float] = {}
    base = build_base_image(scale)
    if base is not None:
        timings["base image (debootstrap + import)"] = base
    for target in ("producer", "dashboard"):
        if target in tags:
            timings[f"build {target}"] = build(target, tags[target], scale=scale)
    if "worker" not in tags:
        return timings
    if weights is None:
        args = ["--build-arg", f"WEIGHTS_URL={weights_url}", "--build-arg", f"WEIGHTS_SHA256={weights_sha256}"]
        timings["build worker"] = build("worker", tags["worker"], *args, scale=scale)
        return timings
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    with weights_server(weights) as (host, url):
        args = ["--add-host", f"{WEIGHTS_HOST}:{host}"]
        args += ["--build-arg", f"WEIGHTS_URL={url}", "--build-arg", f"WEIGHTS_SHA256={sha}"]
        timings["build worker"] = build("worker", tags["worker"], *args, scale=scale)
    return timings


def run_commands(tags: dict[str, str], redis_url: str) -> dict[str, list[str]]:
    """How to run a worker container and a producer container from the images (host network: ``redis_url`` as
    this host reaches Redis; ./data shared read-only at /data, as compose does; ./models at /models)."""
    common = ["--network=host", *ULIMITS, "-e", f"ARCFACE_REDIS_URL={redis_url}"]
    data = ["-v", f"{Path.cwd() / 'data'}:/data:ro"]
    models = ["-v", f"{Path.cwd() / 'models'}:/models:ro"]
    return {
        "worker": [*PODMAN, "run", "-d", "--name", "arcface-worker", *common, "-e", "ARCFACE_SHARED_ROOT=/data"]
        + [*data, *models, tags["worker"]],
        "producer": [*PODMAN, "run", "--rm", *common, *data, tags["producer"], "verify", "/data/a.jpg", "/data/b.jpg"]
        + ["--wait"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./dev image",
        description="Build the worker, producer and dashboard images with podman on a locally made Debian base "
        "(no registry of base images needed) and print how to run them.",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, help="bake this local weights file (.h5) into the worker image")
    weights.add_argument("--weights-url", default="", help="bake the weights at this URL in (fetched by the build)")
    parser.add_argument("--weights-sha256", default="", help="the SHA-256 the --weights-url file must have")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="Redis as this host reaches it (printed commands)"
    )
    args = parser.parse_args(argv)
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    why = why_podman_cannot_run()
    if why:
        print(f"./dev image: {why}", file=sys.stderr)
        return 1
    print(f"building {', '.join(TAGS.values())} on {BASE_IMAGE} (made with debootstrap when missing)", flush=True)
    try:
        timings = build_images(TAGS, args.weights, args.weights_url, args.weights_sha256)
    except (ImageError, subprocess.TimeoutExpired) as exc:
        print(f"./dev image: {exc}", file=sys.stderr)
        return 1
    for step, seconds in timings.items():
        print(f"  {step}: {seconds} s")
    for tag in TAGS.values():
        print(f"  {tag}: {image_size(tag) / 1e9:.2f} GB")
    commands = run_commands(TAGS, args.redis_url)
    baked = args.weights is not None or bool(args.weights_url)
    print("\nrun a worker (Redis reachable from this host, ./data and ./models present: mkdir -p data models):")
    print("  " + shlex.join(commands["worker"]))
    if not baked:
        print(
            "  no weights baked in: it downloads deepface's weights when it starts, or add "
            "-e ARCFACE_MODEL_PATH=/models/<file> with the file in ./models"
        )
    print("a producer job from ./data (a.jpg and b.jpg there):")
    print("  " + shlex.join(commands["producer"]))
    print(f"its JSON logs: {shlex.join([*PODMAN, 'logs', '-f', 'arcface-worker'])}")
    stop = shlex.join([*PODMAN, "stop", "-t", "60", "arcface-worker"])
    print(f"stop it (exit 0 after the jobs in hand): {stop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
