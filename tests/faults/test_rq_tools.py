"""Issue 27 item 1: rq's own tools read the registries while two workers run jobs through a Redis stall longer than
the execution TTL. ``rq info`` and rq-dashboard call ``StartedJobRegistry.count`` / ``get_job_ids``, which run rq's
cleanup: it re-queues or fails every started entry it sees expired, at once. No job may run twice, end with two
outcomes, or be failed by it while its worker is alive."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.settings import ProducerSettings
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.redis_server import RedisServer
from tests.workers import WorkerProcess

TTL_S = 2
STALL_S = 5  # longer than the TTL: every started entry's heartbeat ran out when Redis answers again
FAST = {
    "ARCFACE_EXECUTION_TTL_S": str(TTL_S),
    "ARCFACE_HEARTBEAT_INTERVAL_S": "0.5",
    "ARCFACE_MAINTENANCE_INTERVAL_S": "1",
    "ARCFACE_WORKER_TTL_S": "10",
    "ARCFACE_MAX_BATCH_SIZE": "16",
    "ARCFACE_ALLOWED_BATCH_SIZES": "1,4,16",
    "ARCFACE_BATCH_TIMEOUT_MS": "20",
}


@dataclass
class Poller:
    """What ``rq info`` and a dashboard do: count and list the started registry (each runs rq's cleanup), in a
    loop on its own connection; records ``(sent, answered, count)`` per poll."""

    url: str
    queue: str
    stop: threading.Event = field(default_factory=threading.Event)
    polls: list[tuple[float, float, int]] = field(default_factory=list)
    error: BaseException | None = None

    def run(self) -> None:
        conn = redis.Redis.from_url(self.url, socket_timeout=patience(60))
        registry = StartedJobRegistry(self.queue, connection=conn, serializer=JSONSerializer, job_class=SafeJob)
        try:
            while not self.stop.is_set():
                sent = time.monotonic()
                count = registry.count
                registry.get_job_ids()
                self.polls.append((sent, time.monotonic(), count))
                time.sleep(0.01)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, arcface_h5):
    tmp = tmp_path_factory.mktemp("rqtools")
    server = RedisServer(tmp / "redis", "--enable-debug-command", "yes").start()
    env = {
        "ARCFACE_REDIS_URL": server.url,
        "ARCFACE_QUEUE": f"rqtools-{uuid.uuid4().hex[:8]}",
        "ARCFACE_MODEL_PATH": str(arcface_h5),
        "ARCFACE_DATA_DIR": str(tmp / "data"),
        **FAST,
    }
    workers = [WorkerProcess(env, tmp / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready(300)
        yield server, env["ARCFACE_QUEUE"], workers
    finally:
        for w in workers:
            w.stop()
        server.stop()


def test_rq_info_polling_through_a_stall_longer_than_the_ttl_runs_every_job_exactly_once(fleet):
    server, queue, workers = fleet
    conn = server.client()
    faces = [face_paths()[(i * 5) % 40] for i in range(8)]
    jobs: list[str] = []
    for retries in (3, 0):  # re-queued by rq's cleanup, or failed by it: neither may happen
        client = FaceClient(ProducerSettings(redis_url=server.url, queue=queue, retries=retries))
        jobs += client.embed_many([faces[i % len(faces)] for i in range(32)])
    deadline = time.monotonic() + patience(120)
    while conn.zcard(f"rq:wip:{queue}") == 0:
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.02)
    pollers = [Poller(server.url, queue) for _ in range(2)]
    threads = [threading.Thread(target=p.run, daemon=True) for p in pollers]
    for t in threads:
        t.start()
    stalled = time.monotonic()
    server.client(socket_timeout=patience(60)).execute_command("DEBUG", "SLEEP", str(STALL_S))
    woke = time.monotonic()
    assert woke - stalled >= STALL_S - 0.5

    deadline = time.monotonic() + patience(180)
    pending = list(jobs)
    while pending:
        assert time.monotonic() < deadline, f"not finished: {len(pending)}\n{workers[0].log_path.read_text()[-3000:]}"
        statuses = [conn.hget(f"rq:job:{j}", "status") for j in pending]
        pending = [j for j, s in zip(pending, statuses, strict=True) if s != b"finished"]
        time.sleep(0.1)
    time.sleep(0.5)  # the pollers keep running cleanup on the finished registries
    for p in pollers:
        p.stop.set()
    for t in threads:
        t.join(patience(30))
    assert [p.error for p in pollers] == [None, None]
    # rq's cleanup ran the moment Redis answered, while the stalled jobs were still in hand, and still listed them
    straddling = [count for p in pollers for sent, answered, count in p.polls if sent < woke <= answered]
    assert straddling and max(straddling) > 0, straddling

    runs = [j for w in workers for e in w.events() if e.get("event") == "batch_jobs" for j in e["job_ids"]]
    for jid in jobs:
        assert runs.count(jid) == 1, (jid, runs.count(jid))
        entries = [e[b"type"] for _, e in conn.xrange(f"rq:results:{jid}")]
        assert entries == [b"1"], (jid, entries)  # one entry: a success (Result.Type.SUCCESSFUL)
        assert conn.hget(f"rq:job:{jid}", "retries_left") in (None, b"3"), jid  # no retry spent
    events = [e.get("event") for w in workers for e in w.events()]
    assert [e for e in events if e in ("job_failed", "jobs_requeued", "outcome_skipped", "loop_error")] == []
    kw = dict(connection=conn, serializer=JSONSerializer, job_class=SafeJob)
    assert set(FinishedJobRegistry(queue, **kw).get_job_ids()) == set(jobs)
    assert FailedJobRegistry(queue, **kw).get_job_ids() == []
    assert StartedJobRegistry(queue, **kw).get_job_ids() == []
    assert ScheduledJobRegistry(queue, **kw).get_job_ids() == []
    assert conn.llen(f"rq:queue:{queue}") == 0 and conn.llen(f"rq:queue:{queue}:intermediate") == 0
    assert conn.zcard(f"arcface:alive:{queue}") == 0
    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", server.url, queue],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=patience(60),
    )
    assert info.returncode == 0, info.stderr[-2000:]
    print(
        f"\nstall {woke - stalled:.1f}s, {len(jobs)} jobs, {sum(len(p.polls) for p in pollers)} rq polls: each ran once"
    )
