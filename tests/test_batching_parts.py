"""The batching worker's parts as units, on a real Redis: taking (what is dropped, what fails at once), completion
(an outcome written once, the job out of the worker's hand) and maintenance (a dead worker's job recovered only
after two sightings; orphans of the intermediate list re-queued). No model: these paths never reach it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from rq import Queue
from rq.job import JobStatus
from rq.worker import SimpleWorker

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.keys import EMBED_FUNC
from producer.contract.rqjob import JSONSerializer, SafeJob
from worker.batching.completion import Completer, WorkerIdentity
from worker.batching.executing import Item
from worker.batching.inhand import InHand
from worker.batching.maintenance import Heartbeat, Maintainer
from worker.batching.reading import Taken, classify, utcnow
from worker.batching.retry import RedisRetry
from worker.batching.rqfence import Fence
from worker.batching.scheduler import BatchPolicy, Scheduler
from worker.batching.taking import Taker
from worker.settings import WorkerSettings


class Parts:
    """The parts of one worker on a queue of the test's own, wired as the worker wires them."""

    def __init__(self, conn: Any, **settings: Any) -> None:
        self.conn = conn
        self.queue = Queue(
            f"parts-{uuid.uuid4().hex[:8]}", connection=conn, serializer=JSONSerializer, job_class=SafeJob
        )
        self.settings = WorkerSettings(**settings)
        self.fence = Fence(conn, self.queue.name)
        self.rq_worker = SimpleWorker([self.queue], connection=conn, serializer=JSONSerializer, job_class=SafeJob)
        self.identity = WorkerIdentity(self.rq_worker.name, self.rq_worker.key)
        self.in_hand = InHand()
        self.scheduler: Scheduler[Item] = Scheduler(BatchPolicy(4, 0.005))
        # runtime and executor are never reached by the paths tested here (jobs that fail or are dropped)
        self.completer = Completer(
            self.fence,
            self.queue,
            None,
            self.settings,
            None,
            self.identity,
            self.in_hand,
            RedisRetry(),  # type: ignore[arg-type]
        )
        self.taker = Taker(
            self.fence,
            self.queue,
            None,  # type: ignore[arg-type]
            self.settings,
            self.scheduler,
            self.in_hand,
            self.completer,
            None,  # type: ignore[arg-type]
            RedisRetry(),
            self.identity,
            lambda pipe: None,
            threading.Event(),
        )
        self.heartbeat = Heartbeat(self.fence, self.settings, self.in_hand, self.rq_worker, lambda: None)
        self.maintainer = Maintainer(
            self.fence, self.queue, self.settings, self.identity, self.in_hand, self.completer, self.heartbeat
        )

    def enqueue(self, func: str = EMBED_FUNC, **kwargs: Any) -> str:
        job = self.queue.enqueue(func, {"kind": "embed", "image": {"data_b64": "AAAA"}}, **kwargs)
        return job.id

    def error_code(self, job_id: str) -> str:
        meta = json.loads(self.conn.hget(f"rq:job:{job_id}", "meta"))
        return meta["error"]["code"]

    def results(self, job_id: str) -> list[dict]:
        return [fields for _, fields in self.conn.xrange(f"rq:results:{job_id}")]


@pytest.fixture()
def parts(redis_server) -> Parts:
    return Parts(redis_server.client())


def test_taking_fails_a_job_of_another_function_at_once_with_its_code(parts: Parts) -> None:
    job_id = parts.enqueue("os.system")
    assert parts.taker.take(0.0) == 0  # nothing registered
    assert parts.conn.hget(f"rq:job:{job_id}", "status") == b"failed"
    assert parts.error_code(job_id) == ErrorCode.UNSUPPORTED_JOB.value
    assert len(parts.results(job_id)) == 1
    assert parts.conn.llen(parts.fence.keys.intermediate) == 0 and len(parts.in_hand) == 0


def test_taking_drops_an_id_whose_job_already_finished_without_touching_it(parts: Parts) -> None:
    job_id = parts.enqueue()
    parts.conn.hset(f"rq:job:{job_id}", "status", JobStatus.FINISHED.value)
    assert parts.taker.take(0.0) == 0
    assert parts.conn.hget(f"rq:job:{job_id}", "status") == b"finished"
    assert parts.results(job_id) == []
    assert parts.conn.llen(parts.fence.keys.intermediate) == 0


def _started(parts: Parts, job_id: str, execution: str) -> Taken:
    """``job_id`` popped and registered as started under ``execution``, as taking leaves it."""
    parts.conn.lmove(parts.fence.keys.queue, parts.fence.keys.intermediate, "LEFT", "RIGHT")
    fields = parts.conn.hgetall(f"rq:job:{job_id}")
    t = classify(job_id, fields, parts.conn, parts.settings.max_job_bytes, utcnow())
    assert t is not None
    t.execution_id, t.member = execution, f"{job_id}:{execution}"
    row = (job_id, t.member, {"status": "started", "arcface_execution": t.member})
    with parts.conn.pipeline() as pipe:
        parts.fence.register(pipe, [row], time.time() + 30)
        assert pipe.execute()[0] == [1]
    return t


def test_completion_writes_an_outcome_once_and_releases_the_job(parts: Parts) -> None:
    job_id = parts.enqueue()
    t = _started(parts, job_id, "e1")
    parts.in_hand.add([t])
    failure = JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "cannot decode")
    parts.completer.complete([parts.completer.failure_outcome(t, failure)], [t])
    parts.completer.complete([parts.completer.failure_outcome(t, failure)], [t])  # a second write is refused
    assert len(parts.results(job_id)) == 1
    assert parts.error_code(job_id) == ErrorCode.IMAGE_DECODE_ERROR.value
    assert len(parts.in_hand) == 0 and parts.in_hand.nbytes == 0
    assert parts.conn.zcard(parts.fence.keys.started) == 0


def test_a_dead_workers_job_is_requeued_only_on_the_second_sighting_two_heartbeats_apart(redis_server) -> None:
    parts = Parts(redis_server.client(), heartbeat_interval_s=0.2, execution_ttl_s=1)
    job_id = parts.enqueue(retry=None)
    parts.conn.hset(f"rq:job:{job_id}", "retries_left", "1")
    _started(parts, job_id, "dead")
    parts.conn.zadd(parts.fence.keys.alive, {f"{job_id}:dead": time.time() - 5})  # its heartbeat ran out
    parts.maintainer.recover_started()
    assert parts.conn.hget(f"rq:job:{job_id}", "status") == b"started"  # one sighting proves nothing
    time.sleep(2 * 0.2 + 0.05)
    parts.maintainer.recover_started()
    assert parts.conn.hget(f"rq:job:{job_id}", "status") == b"queued"
    assert parts.conn.lrange(parts.fence.keys.queue, 0, -1) == [job_id.encode()]
    assert parts.conn.hget(f"rq:job:{job_id}", "retries_left") == b"0"


def test_a_dead_workers_jobs_requeued_in_one_pass_are_logged_in_one_line(redis_server) -> None:
    from structlog.testing import capture_logs

    parts = Parts(redis_server.client(), heartbeat_interval_s=0.2, execution_ttl_s=1)
    ids = [parts.enqueue() for _ in range(3)]
    for job_id in ids:
        parts.conn.hset(f"rq:job:{job_id}", "retries_left", "1")
        _started(parts, job_id, "dead")
        parts.conn.zadd(parts.fence.keys.alive, {f"{job_id}:dead": time.time() - 5})
    with capture_logs() as logs:
        parts.maintainer.recover_started()
        time.sleep(2 * 0.2 + 0.05)
        parts.maintainer.recover_started()
    lines = [e for e in logs if e["event"] == "jobs_requeued"]
    assert [(e["count"], sorted(e["job_ids"])) for e in lines] == [(3, sorted(ids))]


def test_a_job_in_this_workers_hand_is_never_recovered_by_it(redis_server) -> None:
    parts = Parts(redis_server.client(), heartbeat_interval_s=0.2, execution_ttl_s=1)
    job_id = parts.enqueue()
    t = _started(parts, job_id, "mine")
    parts.in_hand.add([t])
    parts.conn.zadd(parts.fence.keys.alive, {t.member: time.time() - 5})
    for _ in range(3):
        parts.maintainer.recover_started()
        time.sleep(0.45)
    assert parts.conn.hget(f"rq:job:{job_id}", "status") == b"started"


def test_the_heartbeat_refreshes_the_liveness_of_jobs_in_hand_and_never_recreates_a_completed_one(parts: Parts) -> None:
    parts.rq_worker.register_birth()
    job_id = parts.enqueue()
    t = _started(parts, job_id, "e1")
    parts.in_hand.add([t])
    before = time.time()
    parts.conn.zadd(parts.fence.keys.alive, {t.member: before}, xx=True)  # about to run out
    parts.heartbeat.beat()
    assert parts.conn.zscore(parts.fence.keys.alive, t.member) >= before + parts.settings.execution_ttl_s
    parts.completer.complete([parts.completer.failure_outcome(t, JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "x"))], [t])
    parts.in_hand.add([t])  # a stale copy in hand: the heartbeat still must not bring the entry back
    parts.heartbeat.beat()
    assert parts.conn.zscore(parts.fence.keys.alive, t.member) is None


def test_an_id_orphaned_in_the_intermediate_list_goes_back_to_the_queue(redis_server) -> None:
    parts = Parts(redis_server.client(), heartbeat_interval_s=0.1, execution_ttl_s=1)
    job_id = parts.enqueue()
    parts.conn.lmove(parts.fence.keys.queue, parts.fence.keys.intermediate, "LEFT", "RIGHT")  # a worker died here
    parts.maintainer.recover_intermediate()
    assert parts.conn.llen(parts.fence.keys.intermediate) == 1  # first seen now
    time.sleep(1.05)
    parts.maintainer.recover_intermediate()
    assert parts.conn.lrange(parts.fence.keys.queue, 0, -1) == [job_id.encode()]
    assert parts.conn.llen(parts.fence.keys.intermediate) == 0


def test_the_entry_of_a_job_gone_from_redis_is_dropped_with_its_liveness(redis_server) -> None:
    parts = Parts(redis_server.client(), heartbeat_interval_s=0.2, execution_ttl_s=1)
    job_id = parts.enqueue()
    _started(parts, job_id, "dead")
    member = f"{job_id}:dead"
    parts.conn.zadd(parts.fence.keys.alive, {member: time.time() - 5})
    parts.conn.delete(f"rq:job:{job_id}")  # expired or deleted while its worker was dead
    parts.maintainer.recover_started()
    time.sleep(2 * 0.2 + 0.05)
    parts.maintainer.recover_started()
    assert parts.conn.zscore(parts.fence.keys.started, member) is None
    assert parts.conn.zscore(parts.fence.keys.alive, member) is None  # not seen again on every pass
    assert parts.fence.expired_started(time.time()) == []


def test_the_worker_leaves_rqs_command_channel_at_once_even_when_the_reader_takes_the_reply_first(redis_server) -> None:
    # rq's order (UNSUBSCRIBE, then stop the reader) let a reader that took the reply first block in
    # get_message(timeout=60), and redis-py's stop() joined it: a SIGTERM'd worker took a minute to exit
    from worker.batching.worker import BatchWorker

    conn = redis_server.client()
    queue = Queue(f"unsub-{uuid.uuid4().hex[:8]}", connection=conn, serializer=JSONSerializer, job_class=SafeJob)
    worker = BatchWorker(queue, None, WorkerSettings())  # type: ignore[arg-type]  # no model: nothing runs
    worker.subscribe()
    time.sleep(0.3)
    send = worker.pubsub.unsubscribe

    def reader_first(*args: Any) -> Any:
        out = send(*args)
        time.sleep(0.3)  # the reader thread takes the reply before this thread goes on, as on a loaded machine
        return out

    worker.pubsub.unsubscribe = reader_first
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < 5 and not worker.pubsub_thread.is_alive()
