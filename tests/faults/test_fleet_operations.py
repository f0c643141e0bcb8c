"""Issue 11, as an operator breaks Redis under a running fleet: two workers on their own redis-server.

Classes (issue 11 numbering): 11 ``FLUSHALL`` while idle (workers re-register, the health check recovers, new
jobs are served), 7 a ``DEBUG SLEEP`` stall longer than the execution TTL (no job runs twice or ends in two
registries, with retries and without, no ``worker_died``), 6 Redis full (``maxmemory`` with ``noeviction``
while jobs run, then raised: everything finishes, workers alive, no stale worker entry), 10 rq's scheduler
(``enqueue_in`` through FaceClient's queue, ``Retry(max=2, interval=1)`` after a killed worker).

After each: every job finished exactly once (one result entry, one ``batch_jobs`` appearance over all worker
logs) with the right embedding, started/failed/scheduled registries, queue and intermediate list empty,
the worker registry holds exactly the live workers, no worker logged a loop error, an unwritten outcome or a
live job taken for dead.
The tests run in file order against the same two workers; the scheduler test kills one of them, last.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from rq import Retry
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.errors import ArcFaceError
from producer.contract.keys import EMBED_FUNC
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.settings import ProducerSettings
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.redis_server import RedisServer
from tests.workers import WorkerProcess

TTL_S = 4  # ARCFACE_EXECUTION_TTL_S: much shorter than the 20 s stall and the OOM window
FAST = {
    "ARCFACE_EXECUTION_TTL_S": str(TTL_S),
    "ARCFACE_HEARTBEAT_INTERVAL_S": "1",
    "ARCFACE_MAINTENANCE_INTERVAL_S": "2",
    "ARCFACE_WORKER_TTL_S": "10",
    "ARCFACE_MAX_BATCH_SIZE": "16",
    "ARCFACE_ALLOWED_BATCH_SIZES": "1,4,16",
    "ARCFACE_BATCH_TIMEOUT_MS": "20",
}
# Never acceptable in a worker's log, whatever Redis did: a crashed loop iteration, an outcome not written, a
# live job taken for dead, an uncaught exception. (``outcome_skipped`` may be logged after a stall: a script sent
# before it timed out on the client but ran once Redis woke, and its retry found the job already done; that each
# job ran and ended once is checked on the data.)
FORBIDDEN = {"loop_error", "complete_failed", "outcome_not_written", "uncaught_exception", "jobs_requeued"}
FACES = [face_paths()[(i * 5) % 40] for i in range(8)]


@dataclass
class Ops:
    server: RedisServer
    env: dict[str, str]
    queue: str
    conn: redis.Redis
    workers: dict[str, WorkerProcess]  # rq worker name -> process
    direct: dict[Path, np.ndarray]
    seen: set[str]  # jobs checked by an earlier test

    def client(self, **settings) -> FaceClient:
        return FaceClient(ProducerSettings(redis_url=self.server.url, queue=self.queue, **settings))

    def alive(self) -> dict[str, WorkerProcess]:
        return {n: w for n, w in self.workers.items() if w.proc.poll() is None}

    def runs(self) -> list[str]:
        return [
            j for w in self.workers.values() for e in w.events() if e.get("event") == "batch_jobs" for j in e["job_ids"]
        ]

    def events(self, name: str) -> list[dict]:
        return [e for w in self.workers.values() for e in w.events() if e.get("event") == name]

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{w.log_path.read_text()[-2500:]}" for n, w in self.workers.items())

    def results(self, client: FaceClient, jobs: dict[str, Path], timeout: float = patience(240)) -> None:
        for jid, path in jobs.items():
            try:
                result = client.result(jid, timeout=timeout)
            except ArcFaceError as exc:
                raise AssertionError(f"{jid}: {exc}\n{self.logs()}") from exc
            np.testing.assert_allclose(result.embedding, self.direct[path], atol=1e-5)

    def check(self, jobs: dict[str, Path], dead: tuple[str, ...] = (), allowed: tuple[str, ...] = ()) -> None:
        """The fleet invariants after a fault, for the jobs this test enqueued (all expected to finish)."""
        conn, q = self.conn, self.queue
        for name, w in self.workers.items():
            if name not in dead:
                assert w.proc.poll() is None, f"worker {name} died:\n{w.log_path.read_text()[-3000:]}"
        bad = [
            e for e in self.events_all() if e.get("event") in FORBIDDEN - set(allowed) or e.get("level") == "critical"
        ]
        assert bad == [], bad[:3]
        assert self.events("job_failed") == []
        runs = self.runs()
        for jid in jobs:
            assert runs.count(jid) == 1, (jid, runs.count(jid))
            assert conn.hget(f"rq:job:{jid}", "status") == b"finished"
            assert conn.xlen(f"rq:results:{jid}") == 1, (jid, conn.xrange(f"rq:results:{jid}"))
        kw = dict(connection=conn, serializer=JSONSerializer, job_class=SafeJob)
        assert set(jobs) <= set(FinishedJobRegistry(q, **kw).get_job_ids())
        assert FailedJobRegistry(q, **kw).get_job_ids() == []
        assert StartedJobRegistry(q, **kw).get_job_ids() == []
        assert ScheduledJobRegistry(q, **kw).get_job_ids() == []
        assert conn.llen(f"rq:queue:{q}") == 0 and conn.llen(f"rq:queue:{q}:intermediate") == 0
        live = {f"rq:worker:{n}".encode() for n in self.alive()}
        # a killed worker's entry goes when its key expires (rq: worker TTL + 60 s) and a maintenance pass runs
        start = time.monotonic()
        while conn.smembers("rq:workers") != live and time.monotonic() - start < 10 + 60 + patience(15):
            time.sleep(0.5)
        assert conn.smembers("rq:workers") == live
        if dead:
            print(f"killed worker's registration gone after a further {time.monotonic() - start:.0f}s")
        assert conn.smembers(f"rq:workers:{q}") == live
        info = subprocess.run(
            [sys.executable, "-m", "rq.cli", "info", "--url", self.server.url],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=patience(60),
        )
        assert info.returncode == 0, info.stderr[-2000:]
        self.seen |= set(jobs)

    def events_all(self) -> list[dict]:
        return [e for w in self.workers.values() for e in w.events()]

    def health(self) -> int:
        env = {**os.environ, **self.env}
        return subprocess.run(
            [sys.executable, "-c", "from worker.cli import health; health(['--max-age', '5'])"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=patience(60),
        ).returncode


@pytest.fixture(scope="module")
def ops(tmp_path_factory, arcface_h5, engine):
    tmp = tmp_path_factory.mktemp("ops")
    server = RedisServer(tmp / "redis", "--enable-debug-command", "yes").start()
    queue = f"ops-{uuid.uuid4().hex[:8]}"
    env = {
        "ARCFACE_REDIS_URL": server.url,
        "ARCFACE_QUEUE": queue,
        "ARCFACE_MODEL_PATH": str(arcface_h5),
        "ARCFACE_DATA_DIR": str(tmp / "data"),
        **FAST,
    }
    procs = [WorkerProcess(env, tmp / f"w{i}.log") for i in range(2)]
    direct = dict(zip(FACES, engine.embed_images([p.read_bytes() for p in FACES]), strict=True))
    try:
        for w in procs:
            w.wait_ready(300)
        workers = {next(e["worker"] for e in w.events() if e.get("event") == "worker_started"): w for w in procs}
        yield Ops(server, env, queue, server.client(), workers, direct, set())
    finally:
        for w in procs:
            w.stop()
        server.stop()


def enqueue(client: FaceClient, n: int) -> dict[str, Path]:
    paths = [FACES[i % len(FACES)] for i in range(n)]
    return dict(zip(client.embed_many(paths), paths, strict=True))


def wait_started(ops: Ops, timeout: float = patience(120)) -> None:
    deadline = time.monotonic() + timeout
    while ops.conn.zcard(f"rq:wip:{ops.queue}") == 0:
        assert time.monotonic() < deadline, f"no job started\n{ops.logs()}"
        time.sleep(0.05)


def test_class11_flushall_while_idle_workers_reregister_and_serve(ops):
    client = ops.client()
    warm = enqueue(client, 8)
    ops.results(client, warm)
    assert ops.health() == 0
    expected = {f"rq:worker:{n}".encode() for n in ops.workers}
    took = []
    for pause in (0.0, 0.3, 0.5, 0.7, 1.1, 1.6):  # at several phases of the workers' idle loop and heartbeat
        time.sleep(pause)
        ops.conn.flushall()
        flushed = time.monotonic()
        while ops.conn.smembers("rq:workers") != expected:
            assert time.monotonic() - flushed < patience(15), (
                f"not re-registered {patience(15):g} s after FLUSHALL: {ops.conn.smembers('rq:workers')}"
            )
            time.sleep(0.05)
        took.append(time.monotonic() - flushed)
        assert ops.health() == 0
        for name in ops.workers:  # a full registration rq's tools read, not a key holding only last_heartbeat
            assert ops.conn.hget(f"rq:worker:{name}", "birth")
            assert ops.conn.hget(f"rq:worker:{name}", "queues") == ops.queue.encode()
    print(f"\nFLUSHALL x{len(took)}: both workers registered again after {max(took):.1f}s at most")
    jobs = enqueue(client, 24)
    ops.results(client, jobs)
    ops.check(jobs)


def test_class7_a_stall_longer_than_the_execution_ttl_runs_no_job_twice(ops):
    retrying, once = ops.client(retries=2), ops.client(retries=0)
    jobs: dict[str, Path] = {}
    for _ in range(3):
        jobs |= enqueue(retrying, 16)
        jobs |= enqueue(once, 16)
    wait_started(ops)
    stalled = time.monotonic()
    ops.server.client(socket_timeout=patience(60)).execute_command(
        "DEBUG", "SLEEP", "20"
    )  # Redis answers nobody for 20 s (TTL is 4 s)
    stall_s = time.monotonic() - stalled
    assert stall_s >= 19
    ops.results(once, jobs)
    print(
        f"\nstall of {stall_s:.0f}s with {len(jobs)} jobs in flight: all finished once, "
        f"{len(ops.events('redis_unreachable'))} redis_unreachable lines logged"
    )
    for jid in jobs:
        status = ops.conn.hget(f"rq:job:{jid}", "retries_left")
        assert status in (None, b"2"), (jid, status)  # never requeued: no retry was spent
    ops.check(jobs)


def test_class6_redis_full_while_jobs_run_then_raised_everything_finishes(ops):
    client = ops.client()
    jobs = enqueue(client, 64)
    wait_started(ops)
    admin = ops.server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", str(used // 2))  # far under what is in use: every write is refused with OOM
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            ops.server.client().rpush("probe", "x")
        with pytest.raises(ArcFaceError):  # the producer's error is its own, not a raw redis one
            client.embed(FACES[0])
        time.sleep(TTL_S * 2)  # longer than the execution TTL: heartbeats were refused too
    finally:
        admin.config_set("maxmemory", "0")
    raised = time.monotonic()
    ops.results(client, jobs)
    print(
        f"\nRedis full for {TTL_S * 2}s: {len(jobs)} jobs finished "
        f"{time.monotonic() - raised:.1f}s after the limit was raised"
    )
    assert any(
        "maxmemory" in e.get("error", "") for e in ops.events("redis_unreachable") + ops.events("heartbeat_failed")
    )
    ops.check(jobs)


def kill_a_worker_holding_retried_jobs(ops, client) -> tuple[dict[str, Path], list[str], float]:
    """32 jobs with Retry(max=2, interval=1): one worker is stopped, the other takes jobs and is killed holding
    them; the stopped one resumes. Returns the jobs, those the killed worker held, and when it was killed."""
    (victim, victim_w), (survivor, survivor_w) = list(ops.workers.items())
    survivor_w.signal(signal.SIGSTOP)
    try:
        retried: dict[str, Path] = {}
        for i in range(32):
            path = FACES[i % len(FACES)]
            payload = {"kind": "embed", "image": {"data_b64": base64.b64encode(path.read_bytes()).decode()}}
            retried[client.queue.enqueue(EMBED_FUNC, payload, retry=Retry(max=2, interval=1), result_ttl=3600).id] = (
                path
            )
        deadline = time.monotonic() + patience(120)

        def holding() -> list[str]:
            return [
                j
                for j in retried
                if ops.conn.hget(f"rq:job:{j}", "worker_name") == victim.encode()
                and ops.conn.hget(f"rq:job:{j}", "status") == b"started"
            ]

        while not holding():
            assert time.monotonic() < deadline, ops.logs()
            time.sleep(0.02)
        victim_w.signal(signal.SIGSTOP)  # frozen, then read: no completion can land between the read and the kill
        time.sleep(0.3)
        held = holding()
        victim_w.kill()
        killed = time.monotonic()
    finally:
        survivor_w.signal(signal.SIGCONT)
    return retried, held, killed


def test_class10_scheduler_enqueue_in_and_retry_interval_after_a_killed_worker(ops):
    client = ops.client(retries=0)
    payload = {"kind": "embed", "image": {"data_b64": base64.b64encode(FACES[3].read_bytes()).decode()}}
    enqueued = time.monotonic()
    later = client.queue.enqueue_in(timedelta(seconds=2), EMBED_FUNC, payload, result_ttl=3600)
    assert client.status(later.id) == "scheduled"
    ops.results(client, {later.id: FACES[3]}, timeout=patience(60))
    delay = time.monotonic() - enqueued
    assert 1 <= delay < 10, delay  # rq keeps scheduled times in whole seconds: +2 s is due 1 to 3 s later
    assert client.queue.fetch_job(later.id).worker_name in ops.workers

    # the resumed worker recovers the killed one's jobs (execution TTL + two sightings), schedules them 1 s out
    victim = list(ops.workers)[0]
    retried, held, killed = kill_a_worker_holding_retried_jobs(ops, client)
    ops.results(client, retried, timeout=patience(120))
    recovery = time.monotonic() - killed
    print(
        f"\nRetry(max=2, interval=1): {len(held)} jobs held by the killed worker, "
        f"all finished {recovery:.1f}s after the kill"
    )
    for jid in retried:
        left = ops.conn.hget(f"rq:job:{jid}", "retries_left")
        assert left == (b"1" if jid in held else b"2"), (jid, left, jid in held)
    assert ops.conn.hget(f"rq:job:{later.id}", "status") == b"finished"
    requeued = ops.events("jobs_requeued")  # one line a recovery pass, not one a job
    assert {j for e in requeued for j in e["job_ids"]} >= set(held) and len(requeued) <= len(held)
    assert all(e["count"] == len(e["job_ids"]) for e in requeued)
    assert ops.events("scheduled_enqueued")
    assert held
    # the held jobs never completed on the victim: each ran (completed) once, on the survivor
    ops.check({later.id: FACES[3], **retried}, dead=(victim,), allowed=("jobs_requeued",))
