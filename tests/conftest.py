"""Shared fixtures: real faces shipped in tests/data, the optional shared models, ArcFace weights written in
deepface's format, real Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.patience import patience

# Fixture modules that test modules import names from and also load with ``pytest_plugins``: rewritten from their
# first import, as plugins are (otherwise pytest warns that it came too late to rewrite their asserts).
pytest.register_assert_rewrite("tests.bulk_fixtures", "tests.container_images", "tests.container_support")
REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "data" / "faces"  # shipped with the repository (tests/data/README.md)
# Optional, not shipped: the larger pretrained models and the seed's TF.js manifest, from ../shared when present.
SHARED = Path(os.environ.get("ARCFACE_SHARED_DIR", REPO.parent / "shared"))
SEED_MODEL_JSON = SHARED / "fixtures" / "seed-arcface" / "model.json"
FACERES_SAVEDMODEL = SHARED / "models" / "faceres-embedding"
TFJS_MODELS = SHARED / "models" / "tfjs"
PEOPLE = ["amy", "bernadette", "howard", "leonard", "penny", "raj", "sheldon", "stuart"]


def face_paths() -> list[Path]:
    """The 40 real crops, 8 people x 5, in a fixed order."""
    return [FACES / p / f"{p}{i}.png" for p in PEOPLE for i in range(1, 6)]


def _absent(path: Path, what: str) -> str:
    shown = f"../shared/{path.relative_to(SHARED)}" if "ARCFACE_SHARED_DIR" not in os.environ else str(path)
    return f"needs {shown} ({what}); absent in this checkout (put ../shared beside it or set ARCFACE_SHARED_DIR)"


def needs_shared(path: Path, what: str = "the shared pretrained models") -> pytest.MarkDecorator:
    """Mark a test (or a module, as ``pytestmark``) that needs an optional file under ../shared: skipped, with
    the reason, when it is absent."""
    return pytest.mark.skipif(not path.exists(), reason=_absent(path, what))


def shared_file(path: Path, what: str = "the shared pretrained models") -> Path:
    """``path`` when the optional shared file exists; otherwise skip the calling test or fixture, with the reason."""
    if not path.exists():
        pytest.skip(_absent(path, what))
    return path


def randomise_statistics(model, seed: int = 0) -> None:
    """Give BatchNorm/PReLU non-trivial values so a wrongly assigned tensor changes the output."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.path
        if "moving_variance" in name:
            var.assign(rng.uniform(0.5, 1.5, var.shape).astype("f4"))
        elif "moving_mean" in name or "beta" in name or "alpha" in name:
            var.assign(rng.normal(0.0, 0.1, var.shape).astype("f4"))
        elif "gamma" in name:
            var.assign(rng.uniform(0.8, 1.2, var.shape).astype("f4"))


def write_deepface_h5(model, path: Path, keras2_names: bool = True) -> Path:
    """Save ``model``'s weights the way deepface's ``arcface_weights.h5`` is laid out."""
    from worker.inference.weights import save_deepface_h5

    return save_deepface_h5(model, path, keras2_names)


@pytest.fixture(scope="session")
def arcface_h5(tmp_path_factory) -> Path:
    """A freshly initialised ArcFace (non-trivial BN statistics) saved in deepface's .h5 format."""
    from worker.inference.model import build_arcface

    model = build_arcface()
    randomise_statistics(model)
    return write_deepface_h5(model, tmp_path_factory.mktemp("weights") / "arcface_weights.h5")


@pytest.fixture(scope="session")
def arcface_model(arcface_h5):
    from worker.inference.model import load_face_model

    return load_face_model(arcface_h5)


@pytest.fixture(scope="session")
def engine(arcface_model):
    from worker.inference.engine import Engine

    eng = Engine(arcface_model, allowed_batch_sizes=(1, 2, 4, 8, 16))
    eng.warm_up()
    return eng


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the whole session, on its own port and data directory."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def queue_name(request) -> str:
    """A queue of this test's own, so tests sharing the session's server never see each other's jobs."""
    import uuid

    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def worker_env(monkeypatch, arcface_h5, redis_server, queue_name, tmp_path):
    """Environment for worker/producer settings in this process: the test Redis, queue and weights. A client's
    default wait (``ARCFACE_WAIT_TIMEOUT``) is scaled like every wait of the tests."""
    env = {
        "ARCFACE_REDIS_URL": redis_server.url,
        "ARCFACE_QUEUE": queue_name,
        "ARCFACE_MODEL_PATH": str(arcface_h5),
        "ARCFACE_ALLOWED_BATCH_SIZES": "1,4,16",
        "ARCFACE_MAX_BATCH_SIZE": "16",  # a fixed cap: workers start without timing the sizes (auto)
        "ARCFACE_PRECISION": "float32",  # a fixed precision: no bf16 measuring at each start
        "ARCFACE_DATA_DIR": str(tmp_path / "data"),
        "ARCFACE_WAIT_TIMEOUT": f"{patience(60):g}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# The README's faceres settings: the shared face model (224x224, BGR, Caffe means) behind BlazeFace, square crops.
FACERES_ENV = {
    "ARCFACE_MODEL_PATH": str(FACERES_SAVEDMODEL),
    "ARCFACE_MODEL_NAME": "faceres",
    "ARCFACE_INPUT_SCALE": "1",
    "ARCFACE_INPUT_MEAN": "103.939,116.779,123.68",
    "ARCFACE_CHANNEL_ORDER": "BGR",
    "ARCFACE_THRESHOLD": "0.45",
    "ARCFACE_DETECT": "blazeface",
    "ARCFACE_DETECTOR_PATH": str(TFJS_MODELS / "blazeface-front.json"),
    "ARCFACE_CROP": "square",
    "ARCFACE_ALLOWED_BATCH_SIZES": "1,8,32",
}


@pytest.fixture()
def client(worker_env):
    """A producer client on this test's Redis and queue."""
    from producer.client.face_client import FaceClient
    from producer.settings import ProducerSettings

    return FaceClient(ProducerSettings())


@pytest.fixture()
def direct(engine) -> dict[Path, np.ndarray]:
    """The engine's own embedding of every real face, computed in this process."""
    paths = face_paths()
    return dict(zip(paths, engine.embed_images([p.read_bytes() for p in paths]), strict=True))


@pytest.fixture
def pool_of(tmp_path: Path) -> Iterator:
    """Preprocessing-process pools (``worker.inference.prepool``) for model-input size 112 with 64 ring slots, path
    images under the test's tmp_path; closed at the end of the test."""
    from worker.inference.decode_checks import DecodeLimits
    from worker.inference.prepool import ProcessPreprocessor

    pools: list[ProcessPreprocessor] = []

    def make(processes: int = 1, timeout_s: float = patience(30.0), **kw: float) -> ProcessPreprocessor:
        pool = ProcessPreprocessor(processes, 112, DecodeLimits(), str(tmp_path), 10 << 20, timeout_s, slots=64, **kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def embedding_tolerance(precision: str | None) -> float:
    """How far a worker's embedding may lie from the float32 reference engine's, by the precision that served it
    (the result says): float32 runs the same kernels; a reduced path is kept only at cosine >= 0.9995 to float32."""
    return 1e-4 if precision in (None, "float32") else 0.05


def assert_close_to_float32(got: np.ndarray, expected: np.ndarray, precision: str | None) -> None:
    """``got`` (a worker's embedding) agrees with the float32 reference ``expected`` as its precision promises."""
    if precision in (None, "float32"):
        assert float(np.max(np.abs(got - expected))) < 1e-4, precision
    else:
        cosine = float(np.dot(got, expected) / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert cosine >= 0.9995, (precision, cosine)
