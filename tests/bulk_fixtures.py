"""The bulk tests' worker: ``bulk_env`` (one real worker per test module, serving a fresh queue with threshold
0.61 and the faces folder as shared root), ``bulk_client`` (a FaceClient configured from it), and
:func:`write_face_pairs`. Test modules load them with ``pytest_plugins = ["tests.bulk_fixtures"]``."""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

import pytest

from tests.conftest import FACES, face_paths
from tests.workers import WorkerProcess


@pytest.fixture(scope="module")
def bulk_env(arcface_h5, redis_server, tmp_path_factory):
    env = {
        "ARCFACE_REDIS_URL": redis_server.url,
        "ARCFACE_QUEUE": f"bulk-{uuid.uuid4().hex[:8]}",
        "ARCFACE_MODEL_PATH": str(arcface_h5),
        "ARCFACE_ALLOWED_BATCH_SIZES": "1,4,16",
        "ARCFACE_SHARED_ROOT": str(FACES),
        "ARCFACE_MAX_BATCH_SIZE": "16",
        "ARCFACE_THRESHOLD": "0.61",
    }
    worker = WorkerProcess(env, tmp_path_factory.mktemp("bulkworker") / "worker.log")
    worker.wait_ready()
    yield env
    worker.stop()


@pytest.fixture()
def bulk_client(bulk_env, monkeypatch):
    from producer.client.face_client import FaceClient
    from producer.settings import ProducerSettings

    for k, v in bulk_env.items():
        monkeypatch.setenv(k, v)
    return FaceClient(ProducerSettings())


def write_face_pairs(path: Path, n: int = 60) -> list[tuple[str, str, bool]]:
    """n labelled pairs over the 40 crops (paths relative to the faces folder; images recur)."""
    rel = [str(p.relative_to(FACES)) for p in face_paths()]
    rows = [
        (rel[i % 40], rel[(i * 13 + 1) % 40], rel[i % 40].split("/")[0] == rel[(i * 13 + 1) % 40].split("/")[0])
        for i in range(n)
    ]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "label"])
        w.writerows([a, b, "same" if same else "different"] for a, b, same in rows)
    return rows
