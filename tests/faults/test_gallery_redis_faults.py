"""Issue 27: enrolled identities under Redis faults, with two real workers (each on a queue of its own) sharing
this module's redis-server and so the galleries.

* Redis full (``maxmemory`` with ``noeviction``) while enroll jobs are in hand: every enroll waits for Redis and
  succeeds, and every enrollment is stored (none fails ``internal_error``).
* Redis loses its data (``FLUSHALL``): each worker drops what it held within a heartbeat with no job sent;
  identify and forget on a lost gallery both answer ``unknown_gallery``; a gallery enrolled afresh holds only
  the new subjects.
* A change's result read, then a search on the other worker: once an enroll's or a forget's result is
  readable, an identify job taken afterwards by any worker sees the change, even while that worker's events
  follower is cut off again and again.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from rq.registry import StartedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.errors import JobFailed
from producer.contract.gallery_results import EnrollResult
from producer.contract.keys import enrollments_key, subject_key
from producer.settings import ProducerSettings
from tests.conftest import face_paths
from tests.patience import patience
from tests.redis_server import RedisServer
from tests.workers import WorkerProcess

HEARTBEAT_S = 3.0  # ARCFACE_HEARTBEAT_INTERVAL_S's default
FAST = {
    "ARCFACE_EXECUTION_TTL_S": "4",
    "ARCFACE_MAINTENANCE_INTERVAL_S": "2",
    "ARCFACE_WORKER_TTL_S": "10",
    "ARCFACE_MAX_BATCH_SIZE": "16",
    "ARCFACE_ALLOWED_BATCH_SIZES": "1,4,16",
    "ARCFACE_BATCH_TIMEOUT_MS": "20",
}
# Never acceptable in a worker's log, whatever Redis did.
FORBIDDEN = {"loop_error", "complete_failed", "outcome_not_written", "uncaught_exception", "finish_crashed"}


@dataclass
class Fleet:
    server: RedisServer
    conn: redis.Redis
    workers: dict[str, WorkerProcess]
    clients: dict[str, FaceClient]

    def events(self, worker: str, name: str) -> list[dict]:
        return [e for e in self.workers[worker].events() if e.get("event") == name]

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{w.log_path.read_text()[-3000:]}" for n, w in self.workers.items())

    def check_logs(self) -> None:
        bad = [e for w in self.workers.values() for e in w.events() if e.get("event") in FORBIDDEN]
        assert bad == [], bad[:3]
        for name, w in self.workers.items():
            assert w.proc.poll() is None, f"worker {name} died:\n{self.logs()}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """Two workers of a small real Keras model (32-d embeddings), queues ``a`` and ``b``, on their own Redis."""
    import keras

    tmp = tmp_path_factory.mktemp("gallery-faults")
    inputs = keras.Input((112, 112, 3))
    x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(inputs)
    model = tmp / "small.keras"
    keras.Model(inputs, keras.layers.Dense(32)(keras.layers.GlobalAveragePooling2D()(x))).save(model)
    server = RedisServer(tmp / "redis").start()
    workers: dict[str, WorkerProcess] = {}
    clients: dict[str, FaceClient] = {}
    try:
        for name in ("a", "b"):
            queue = f"g27-{name}-{uuid.uuid4().hex[:6]}"
            env = {
                "ARCFACE_REDIS_URL": server.url,
                "ARCFACE_QUEUE": queue,
                "ARCFACE_MODEL_PATH": str(model),
                "ARCFACE_MODEL_NAME": "small",
                **FAST,
            }
            workers[name] = WorkerProcess(env, tmp / f"{name}.log")
            clients[name] = FaceClient(ProducerSettings(redis_url=server.url, queue=queue))
        for w in workers.values():
            w.wait_ready()
        yield Fleet(server, server.client(), workers, clients)
    finally:
        for w in workers.values():
            w.stop()
        server.stop()


def poll(predicate, timeout: float, what: str, fleet: Fleet, step: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; fails the test (with the workers' logs) past ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s\n{fleet.logs()}")
        time.sleep(step)
    return time.monotonic() - start


def failure_code(call) -> str:
    with pytest.raises(JobFailed) as info:
        call()
    return info.value.error.code.value


def test_enrolls_while_redis_is_full_all_succeed_and_are_stored(fleet):
    a, wa = fleet.clients["a"], fleet.workers["a"]
    paths = face_paths()
    gallery = f"full-{uuid.uuid4().hex[:6]}"
    assert a.result(a.enroll("warm", paths[0], gallery), timeout=patience(120)).created
    ids = [a.enroll(f"s{i}", paths[1 + i], gallery) for i in range(16)]
    started = StartedJobRegistry(queue=a.queue)
    poll(lambda: started.count == 16, 60, "worker a registered the enrolls", fleet, step=0.002)
    # Stopped while it holds them (registered, not yet written to the gallery): Redis fills up meanwhile, so
    # the gallery writes are the first that Redis refuses.
    wa.signal(signal.SIGSTOP)
    admin = fleet.server.client()
    before = len(fleet.events("a", "redis_unreachable"))
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", str(int(admin.info("memory")["used_memory"]) // 2))
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            admin.rpush("probe", "x")
        wa.signal(signal.SIGCONT)
        poll(lambda: len(fleet.events("a", "redis_unreachable")) >= before + 3, 60, "a refused write", fleet)
    finally:
        wa.signal(signal.SIGCONT)
        admin.config_set("maxmemory", "0")
    results = [a.result(j, timeout=patience(120)) for j in ids]
    assert [(type(r), r.subject, r.created, r.subject_enrollments) for r in results] == [
        (EnrollResult, f"s{i}", True, 1) for i in range(16)
    ]
    assert fleet.conn.hlen(enrollments_key(gallery)) == 17
    assert all(fleet.conn.scard(subject_key(gallery, f"s{i}")) == 1 for i in range(16))
    refused = [e for e in fleet.events("a", "redis_unreachable") if e["during"] == "gallery_enroll"]
    assert refused and all("maxmemory" in e["error"] for e in refused)
    found = fleet.clients["b"].result(fleet.clients["b"].identify(paths[5], gallery, top_k=1, threshold=2.0))
    assert found.matches[0].subject == "s4" and found.searched == 17
    fleet.check_logs()


def test_flushall_each_worker_drops_the_lost_galleries_within_a_heartbeat(fleet):
    a, b = fleet.clients["a"], fleet.clients["b"]
    paths = face_paths()
    gallery = f"lost-{uuid.uuid4().hex[:6]}"
    for i in range(3):
        assert a.result(a.enroll(f"p{i}", paths[5 * i], gallery), timeout=patience(60)).created
    held = b.result(b.identify(paths[0], gallery, top_k=5, threshold=2.0), timeout=patience(60))
    assert sorted(m.subject for m in held.matches) == ["p0", "p1", "p2"]
    lost_before = {w: len(fleet.events(w, "gallery_data_lost")) for w in fleet.workers}

    fleet.conn.flushall()
    took = poll(
        lambda: all(len(fleet.events(w, "gallery_data_lost")) > lost_before[w] for w in fleet.workers),
        HEARTBEAT_S,
        "both workers noticed the lost gallery data with no job sent",
        fleet,
    )
    for w in fleet.workers:
        loaded = fleet.events(w, "galleries_loaded")[-1]
        assert (loaded["galleries"], loaded["enrollments"], loaded["seq"]) == (0, 0, 0)

    for client in (a, b):  # what a worker answers agrees with Redis: there is no such gallery any more
        found = failure_code(
            lambda c=client: c.result(c.identify(paths[0], gallery, threshold=2.0), timeout=patience(60))
        )
        assert found == "unknown_gallery"
        forgot = failure_code(lambda c=client: c.result(c.forget("p0", gallery), timeout=patience(60)))
        assert forgot == "unknown_gallery"

    assert a.result(a.enroll("fresh", paths[20], gallery), timeout=patience(60)).created
    after = b.result(b.identify(paths[0], gallery, top_k=5, threshold=2.0), timeout=patience(60))
    assert [m.subject for m in after.matches] == ["fresh"] and after.searched == 1
    print(f"\nFLUSHALL: both workers dropped the lost galleries after {took:.2f}s")
    fleet.check_logs()


class FollowerCutter:
    """Cuts every connection blocked in XREAD (the workers' events followers) as soon as it blocks, so the
    followers see events late, in bursts, after their backoff."""

    def __init__(self, server: RedisServer) -> None:
        self.conn = server.client()
        self.cuts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for client in self.conn.client_list():
                if client.get("cmd") == "xread" and "b" in client.get("flags", ""):
                    self.cuts += int(self.conn.client_kill_filter(_id=client["id"]) or 0)
            self._stop.wait(0.005)

    def __enter__(self) -> FollowerCutter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(patience(5))


def test_a_readable_forget_or_enroll_holds_for_identify_jobs_taken_later_on_the_other_worker(fleet):
    a, b = fleet.clients["a"], fleet.clients["b"]
    paths = face_paths()
    gallery = f"rule-{uuid.uuid4().hex[:6]}"
    assert a.result(a.enroll("anchor", paths[39], gallery), timeout=patience(60)).created
    assert (
        b.result(b.identify(paths[39], gallery, top_k=1, threshold=2.0), timeout=patience(60)).matches[0].subject
        == "anchor"
    )
    cut_before = len([e for e in fleet.events("b", "redis_unreachable") if e["during"] == "gallery_events"])
    seen: list[tuple[str, list[str]]] = []
    with FollowerCutter(fleet.server) as cutter:
        poll(lambda: cutter.cuts >= 4, 30, "the followers were cut", fleet)
        for r in range(6):
            subject, image = f"r{r}", paths[5 * r]
            assert a.result(a.enroll(subject, image, gallery), timeout=patience(60)).created
            enrolled = b.result(b.identify(image, gallery, top_k=1, threshold=2.0), timeout=patience(60))
            assert a.result(a.forget(subject, gallery), timeout=patience(60)).removed == 1
            forgotten = b.result(b.identify(image, gallery, top_k=8, threshold=2.0), timeout=patience(60))
            seen.append((enrolled.matches[0].subject, [m.subject for m in forgotten.matches]))
    assert seen == [(f"r{r}", ["anchor"]) for r in range(6)]
    cut = [e for e in fleet.events("b", "redis_unreachable") if e["during"] == "gallery_events"]
    assert len(cut) > cut_before  # b's follower was indeed cut off while the jobs ran
    fleet.check_logs()
