"""The micro-batching worker, as real processes on a real Redis: batching, isolation of bad jobs,
exactly-once without crashes, recovery after SIGKILL, warm shutdown on SIGTERM."""

from __future__ import annotations

import collections
import signal
import time

import numpy as np
import pytest
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.worker import Worker

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode
from producer.contract.errors import JobFailed
from producer.contract.keys import EMBED_FUNC
from tests.conftest import face_paths
from tests.patience import patience
from tests.workers import WorkerProcess

FAST_RECOVERY = {
    "ARCFACE_EXECUTION_TTL_S": "4",
    "ARCFACE_HEARTBEAT_INTERVAL_S": "1",
    "ARCFACE_MAINTENANCE_INTERVAL_S": "2",
    "ARCFACE_WORKER_TTL_S": "10",
}


@pytest.fixture()
def workers(tmp_path):
    started: list[WorkerProcess] = []

    def start(env: dict, name: str, *args: str, **overrides: str) -> WorkerProcess:
        w = WorkerProcess(env, tmp_path / f"{name}.log", *args, **{"ARCFACE_MAX_BATCH_SIZE": "16", **overrides})
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def mixed_requests(n: int) -> list[tuple]:
    paths = face_paths()
    return [
        ("verify", paths[i % 40], paths[(i * 7 + 3) % 40]) if i % 4 == 3 else ("embed", paths[i % 40]) for i in range(n)
    ]


def enqueue(client: FaceClient, requests: list[tuple]) -> list[str]:
    ids = []
    for kind, *images in requests:
        ids.append(client.embed(images[0]) if kind == "embed" else client.verify(images[0], images[1]))
    return ids


def check_results(
    client: FaceClient, requests: list[tuple], ids: list[str], direct: dict, timeout: float = patience(240)
) -> list:
    results = []
    deadline = time.monotonic() + timeout
    for (kind, *images), job_id in zip(requests, ids, strict=True):
        r = client.result(job_id, timeout=max(1.0, deadline - time.monotonic()))
        if kind == "embed":
            np.testing.assert_allclose(r.embedding, direct[images[0]], atol=1e-5)
        else:
            assert r.distance == pytest.approx(1.0 - float(direct[images[0]] @ direct[images[1]]), abs=1e-5)
        results.append(r)
    return results


def executions_per_job(logs: list[WorkerProcess]) -> collections.Counter:
    return collections.Counter(
        jid for w in logs for e in w.events() if e.get("event") == "batch_jobs" for jid in e["job_ids"]
    )


def test_two_hundred_mixed_jobs_through_one_worker_equal_the_engine(client, worker_env, workers, direct):
    requests = mixed_requests(200)
    ids = enqueue(client, requests)
    w = workers(worker_env, "w1")
    results = check_results(client, requests, ids, direct)
    sizes = [r.timing.batch_size for r in results]
    print(f"\nbatch sizes seen: max {max(sizes)}, mean {np.mean(sizes):.1f}; batches {len(w.batches())}")
    assert max(sizes) > 1
    assert all(b["images"] <= 16 for b in w.batches())
    assert executions_per_job([w]) == collections.Counter(ids)  # each job ran exactly once
    q = client.queue
    assert FinishedJobRegistry(queue=q).count == 200 and FailedJobRegistry(queue=q).count == 0
    assert StartedJobRegistry(queue=q).count == 0
    line = w.batches()[0]
    assert {"jobs", "images", "queue_wait_ms", "preprocess_ms", "inference_ms", "write_ms"} <= set(line)


def test_bad_jobs_in_a_batch_fail_alone_with_their_codes(client, worker_env, workers, direct, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    paths = face_paths()
    good = [client.embed(p) for p in paths[:6]]
    text = tmp_path / "x.jpg"
    text.write_text("plain text")
    bad_decode = client.embed(text.read_bytes())
    bad_function = client.queue.enqueue_call("os.system", args=(f"touch {marker}",), description="hostile").id
    bad_payload = client.queue.enqueue_call(
        EMBED_FUNC, args=({"kind": "embed", "image": {"path": "../../etc/passwd"}},)
    ).id
    pickled = Job.create(
        EMBED_FUNC, args=(Evil(),), connection=client.connection, id="pickled-job", origin=client.queue.name
    )  # pickle serializer
    pickled.save()
    client.connection.rpush(client.queue.key, pickled.id)
    good += [client.embed(p) for p in paths[6:10]]

    w = workers(worker_env, "w1", "--burst")
    assert w.wait(patience(180)) == 0, w.log_path.read_text()[-2000:]
    for jid, p in zip(good, paths[:10], strict=True):
        np.testing.assert_allclose(client.result(jid, timeout=patience(5)).embedding, direct[p], atol=1e-5)
    expected = {
        bad_decode: ErrorCode.IMAGE_DECODE_ERROR,
        bad_function: ErrorCode.UNSUPPORTED_JOB,
        bad_payload: ErrorCode.PATH_NOT_ALLOWED,
        "pickled-job": ErrorCode.INVALID_PAYLOAD,
    }
    for jid, code in expected.items():
        with pytest.raises(JobFailed) as info:
            client.result(jid, timeout=patience(5))
        assert info.value.error.code is code, (jid, info.value)
    assert not marker.exists()  # nothing was ever unpickled or run
    assert max(b["jobs"] for b in w.batches()) >= 5  # the bad ones really shared batches with good ones


def test_three_workers_six_hundred_jobs_each_runs_exactly_once(client, worker_env, workers, tmp_path):
    import keras

    inputs = keras.Input((112, 112, 3))
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(inputs)
    small = keras.Model(inputs, keras.layers.Dense(32)(keras.layers.GlobalAveragePooling2D()(x)))
    small.save(tmp_path / "small.keras")
    env = {**worker_env, "ARCFACE_MODEL_PATH": str(tmp_path / "small.keras"), "ARCFACE_MODEL_NAME": "small"}
    pool = [workers(env, f"w{i}", ARCFACE_BATCH_TIMEOUT_MS="2") for i in range(3)]
    for w in pool:
        w.wait_ready()
    paths = face_paths()
    ids = []
    for start in range(0, 600, 50):  # arrive in waves while the workers run
        ids += client.embed_many(paths[(start + i) % 40] for i in range(50))
    results = [client.result(jid, timeout=patience(240)) for jid in ids]
    assert all(r.dim == 32 and r.model == "small" for r in results)
    counts = executions_per_job(pool)
    assert counts == collections.Counter(ids), "a job ran twice or not at all"
    assert all(client.connection.xlen(f"rq:results:{jid}") == 1 for jid in ids)
    assert sum(1 for w in pool if w.batches()) >= 2  # the work really was shared
    assert len(Worker.all(queue=client.queue)) == 3


def test_sigkill_of_one_worker_mid_run_loses_no_job(client, worker_env, workers, direct):
    requests = mixed_requests(96)
    a = workers(worker_env, "a", **FAST_RECOVERY)
    b = workers(worker_env, "b", **FAST_RECOVERY)
    a.wait_ready()
    b.wait_ready()
    ids = enqueue(client, requests)
    deadline = time.monotonic() + patience(120)
    while not a.batches() and time.monotonic() < deadline:  # let it finish one batch and start another
        time.sleep(0.05)
    a.kill()
    killed_at = time.monotonic()
    started = StartedJobRegistry(queue=client.queue).get_job_ids()
    try:
        check_results(client, requests, ids, direct, timeout=patience(180))
    except Exception:
        stuck = [j for j in ids if client.status(j) != "finished"]
        print("not finished:", {j: client.status(j) for j in stuck}, "in flight at kill:", started)
        print("a:", a.log_path.read_text()[-3000:], "\nb:", b.log_path.read_text()[-6000:])
        raise
    recovery_s = time.monotonic() - killed_at
    print(f"\nkilled with {len(started)} jobs in flight; all 96 finished {recovery_s:.1f}s after the kill")
    assert FailedJobRegistry(queue=client.queue).count == 0
    assert StartedJobRegistry(queue=client.queue).count == 0
    assert recovery_s < patience(120)


def test_sigterm_during_a_batch_writes_it_and_exits_zero(client, worker_env, workers):
    ids = client.embed_many(face_paths() * 2)  # 80 jobs: several batches of 16
    w = workers(worker_env, "w", ARCFACE_BATCH_TIMEOUT_MS="50")
    w.wait_ready()
    deadline = time.monotonic() + patience(60)
    while time.monotonic() < deadline:
        workers_now = Worker.all(queue=client.queue)
        if workers_now and workers_now[0].get_state() == "busy" and StartedJobRegistry(queue=client.queue).count:
            break
        time.sleep(0.01)
    in_hand = set(StartedJobRegistry(queue=client.queue).get_job_ids())
    w.signal(signal.SIGTERM)
    assert w.wait(patience(60)) == 0, w.log_path.read_text()[-2000:]
    assert in_hand, "the worker never got busy"
    statuses = collections.Counter(client.status(j) for j in ids)
    assert all(client.status(j) == "finished" for j in in_hand), statuses
    assert statuses["started"] == 0 and statuses["failed"] == 0
    assert statuses["finished"] + statuses["queued"] == 80 and statuses["queued"] > 0
    assert StartedJobRegistry(queue=client.queue).count == 0
    assert Worker.all(queue=client.queue) == []  # deregistered
    assert len(Queue(client.queue.name, connection=client.connection)) == statuses["queued"]
