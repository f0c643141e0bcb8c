"""Faults around the worker: Redis restarting or gone, the model failing to load, a kill storm.

Each test starts its own redis-server on a free port with its own data directory."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from rq.registry import FailedJobRegistry, StartedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.errors import ModelLoadError
from producer.settings import ProducerSettings
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.redis_server import RedisServer, free_port
from tests.workers import WorkerProcess

FAST = {
    "ARCFACE_EXECUTION_TTL_S": "4",
    "ARCFACE_HEARTBEAT_INTERVAL_S": "1",
    "ARCFACE_MAINTENANCE_INTERVAL_S": "2",
    "ARCFACE_WORKER_TTL_S": "10",
    "ARCFACE_MAX_BATCH_SIZE": "16",
}
SCALE = float(os.environ.get("ARCFACE_FAULTS_SCALE", "1"))  # e.g. 5: the kill storm with 2,000 jobs


@pytest.fixture()
def small_model(tmp_path_factory):
    """A small real Keras embedding model (fast enough for thousands of jobs on 2 cores)."""
    import keras

    path = tmp_path_factory.mktemp("small") / "small.keras"
    inputs = keras.Input((112, 112, 3))
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(inputs)
    keras.Model(inputs, keras.layers.Dense(32)(keras.layers.GlobalAveragePooling2D()(x))).save(path)
    return path


def env_for(server: RedisServer, model, **extra: str) -> dict[str, str]:
    return {
        "ARCFACE_REDIS_URL": server.url,
        "ARCFACE_QUEUE": f"f-{uuid.uuid4().hex[:8]}",
        "ARCFACE_MODEL_PATH": str(model),
        "ARCFACE_MODEL_NAME": "small",
        "ARCFACE_ALLOWED_BATCH_SIZES": "1,4,16",
        **FAST,
        **extra,
    }


def test_kill_storm_every_job_finishes_exactly_once_from_the_producers_view(tmp_path, arcface_h5):
    # ArcFace itself (about 0.1 s an image here), so the queue lasts long enough for several kills.
    n = int(400 * SCALE)
    server = RedisServer(tmp_path / "redis").start()
    env = env_for(server, arcface_h5, ARCFACE_MODEL_NAME="arcface", ARCFACE_ALLOWED_BATCH_SIZES="1,16")
    client = FaceClient(ProducerSettings(redis_url=server.url, queue=env["ARCFACE_QUEUE"]))
    steady = WorkerProcess(env, tmp_path / "steady.log")
    victims: list[WorkerProcess] = []
    try:
        steady.wait_ready()
        paths = face_paths()
        ids = []
        for start in range(0, n, 100):
            ids += client.embed_many(paths[(start + i) % 40] for i in range(min(100, n - start)))
        kills = 0
        deadline = time.monotonic() + patience(600)
        while time.monotonic() < deadline and client.queue.count + StartedJobRegistry(queue=client.queue).count > 0:
            victim = WorkerProcess(env, tmp_path / f"victim{kills}.log")
            victims.append(victim)
            victim.wait_ready()
            time.sleep(1.5)
            victim.kill()
            kills += 1
        results = [client.result(j, timeout=patience(300)) for j in ids]
        assert len(results) == n and all(r.dim == 512 for r in results)
        by_image = collections.defaultdict(list)
        for i, r in enumerate(results):
            by_image[paths[i % 40]].append(r.embedding)
        for vectors in by_image.values():  # correct: every job of the same image got the same embedding
            np.testing.assert_allclose(np.stack(vectors), np.repeat(vectors[:1], len(vectors), axis=0), atol=1e-5)
        finished = [client.status(j) for j in ids]
        assert collections.Counter(finished) == {"finished": n}
        assert all(client.connection.xlen(f"rq:results:{j}") == 1 for j in ids)  # one result each, no duplicate
        assert StartedJobRegistry(queue=client.queue).count == 0 and FailedJobRegistry(queue=client.queue).count == 0
        assert client.connection.llen(client.queue.intermediate_queue_key) == 0
        print(f"\nkill storm: {n} jobs, {kills} SIGKILLs, all finished once")
        assert kills >= 2
    finally:
        for w in [steady, *victims]:
            w.stop()
        server.stop()


def test_redis_restart_mid_run_workers_and_waiting_producers_reconnect(tmp_path, small_model):
    port = free_port()
    aof = ("--appendonly", "yes", "--appendfsync", "everysec")
    server = RedisServer(tmp_path / "redis", *aof, port=port).start()
    env = env_for(server, small_model, ARCFACE_BATCH_TIMEOUT_MS="20")
    client = FaceClient(ProducerSettings(redis_url=server.url, queue=env["ARCFACE_QUEUE"]))
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        ids = client.embed_many(face_paths() * 5)
        client.result(ids[0], timeout=patience(60))
        time.sleep(1.2)  # let everysec flush the queue to the AOF
        server.stop()
        time.sleep(3)
        server = RedisServer(tmp_path / "redis", *aof, port=port).start()
        results = [client.result(j, timeout=patience(180)) for j in ids]  # the same client object: it reconnects
        assert len(results) == 200
        assert worker.proc.poll() is None, "the worker must survive a Redis restart"
        outages = [e for e in worker.events() if e.get("event") == "redis_unreachable"]
        assert outages and max(e["retry_in_s"] for e in outages) > 0.5  # it backed off, no tight loop
        assert len(outages) < 30
    finally:
        worker.stop()
        server.stop()


def test_redis_gone_worker_keeps_retrying_and_cli_exits_4(tmp_path, small_model):
    server = RedisServer(tmp_path / "redis").start()
    env = env_for(server, small_model)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        server.stop()
        time.sleep(8)
        assert worker.proc.poll() is None
        outages = [e for e in worker.events() if e.get("event") == "redis_unreachable"]
        assert 2 <= len(outages) <= 12, len(outages)  # backoff 0.5, 1, 2, 4 ... not a tight loop
        cli = subprocess.run(
            [sys.executable, "-m", "producer.cli", "embed", str(face_paths()[0])],
            env={**os.environ, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=patience(60),
        )
        assert cli.returncode == 4
        assert cli.stderr.count("\n") == 1 and "cannot reach Redis" in cli.stderr
    finally:
        worker.stop()
        server.stop()


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_worker_exits_non_zero_before_taking_jobs_when_the_model_cannot_load(tmp_path, redis_server, kind):
    weights = tmp_path / "arcface_weights.h5"
    if kind == "corrupt":
        weights.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    env = {
        "ARCFACE_REDIS_URL": redis_server.url,
        "ARCFACE_QUEUE": f"m-{uuid.uuid4().hex[:6]}",
        "ARCFACE_MODEL_PATH": str(weights),
    }
    client = FaceClient(ProducerSettings(redis_url=redis_server.url, queue=env["ARCFACE_QUEUE"]))
    job_id = client.embed(face_paths()[0])
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        assert worker.wait(patience(120)) == ModelLoadError.exit_code == 5
    finally:
        worker.stop()
    failed = [e for e in worker.events() if e.get("event") == "model_load_failed"]
    assert failed and str(weights) in failed[0]["error"]
    assert client.status(job_id) == "queued"  # never taken
