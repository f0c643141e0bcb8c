"""The container images of tests/test_container.py (loaded there with ``pytest_plugins``): podman, the
python:3.11-slim stand-in base image, the stand-in weights and the three images built from the repository's
Dockerfile, all with the recipe ``./dev image`` uses (docker/images.py). Also how commands are run."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO
from tests.patience import SCALE, patience


def _docker_images() -> ModuleType:
    """docker/images.py, loaded from its file (``docker`` is not a package: the name belongs to another library)."""
    spec = importlib.util.spec_from_file_location("arcface_docker_images", REPO / "docker" / "images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _docker_images()
BASE_IMAGE = recipe.BASE_IMAGE
IMAGES = {
    "worker": "localhost/arcface-test-worker:latest",
    "producer": "localhost/arcface-test-producer:latest",
    "dashboard": "localhost/arcface-test-dashboard:latest",
}
PODMAN = recipe.PODMAN
ULIMITS = recipe.ULIMITS
free_loopback = recipe.free_loopback
TIMINGS: dict[str, float] = {}


def run(args: list[str], timeout: float = patience(120), check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        return recipe.run(args, timeout=timeout, check=check, **kw)
    except recipe.ImageError as exc:
        raise AssertionError(str(exc)) from None


@pytest.fixture(scope="module")
def podman():
    reason = recipe.why_podman_cannot_run(os.environ.get("CONTAINER_TOOLS_UNAVAILABLE", ""))  # set by .ci/run
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def base_image(podman):
    """The python:3.11-slim stand-in (Debian bookworm, python = python3.11), built once per machine."""
    if not recipe.image_exists(BASE_IMAGE) and shutil.which("debootstrap") is None:
        pytest.skip(
            f"{BASE_IMAGE} is missing and debootstrap is not installed to build it (apt-get install debootstrap)"
        )
    seconds = recipe.build_base_image(scale=SCALE)
    if seconds is not None:
        TIMINGS["base image (debootstrap + import), s"] = seconds
    return BASE_IMAGE


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


@pytest.fixture(scope="module")
def images(base_image, stand_in_weights, request):
    """The three images, built from the repository's Dockerfile (layers cached between runs), the worker with the
    stand-in weights baked in through ``WEIGHTS_URL``."""
    built = recipe.build_images(IMAGES, stand_in_weights, scale=SCALE)
    TIMINGS.update({f"{step}, s": seconds for step, seconds in built.items()})
    sizes = {name: recipe.image_size(tag) for name, tag in IMAGES.items()}
    yield sizes
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if report is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            report.write("\n")
            report.write_line(
                "container images: "
                + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items())
                + f" (base {recipe.image_size(BASE_IMAGE) / 1e9:.2f} GB); "
                + ", ".join(f"{k} {v}" for k, v in TIMINGS.items())
            )
