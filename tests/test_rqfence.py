"""The rq internals ``worker/batching/rqfence.py`` relies on, pinned against the installed rq: key layouts, formats, and
what rq's own readers see after the fence writes a job's outcome. If rq changes any of these, this fails first."""

from __future__ import annotations

import inspect
import json
import math
import time
from datetime import datetime, timezone

import pytest
import redis
from rq import Queue, Retry
from rq.intermediate_queue import IntermediateQueue
from rq.job import JOB_ID_PATTERN, Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import parse_composite_key, utcformat, utcparse

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.errors import JobFailed
from producer.contract.keys import EMBED_FUNC, ERROR_ENTRY_FIELD
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.settings import ProducerSettings
from tests.patience import patience
from worker.batching.rqfence import (
    EXECUTION_FIELD,
    REDIS_WORKER_KEYS,
    Fence,
    Outcome,
    QueueKeys,
    clean_worker_registry,
    failure_entry,
    failure_meta,
    inflate,
    mark_worker_dead,
    parse_timestamp,
    restore,
    success_entry,
    timestamp,
    valid_job_id,
)


def test_rq_key_layouts_and_formats_are_the_ones_the_fence_writes():
    k = QueueKeys("q")
    assert Job.redis_job_namespace_prefix == "rq:job:"
    assert StartedJobRegistry.key_template.format("q") == k.started == "rq:wip:q"
    assert FinishedJobRegistry.key_template.format("q") == k.finished
    assert FailedJobRegistry.key_template.format("q") == k.failed
    assert ScheduledJobRegistry.key_template.format("q") == k.scheduled
    assert IntermediateQueue.get_intermediate_queue_key("rq:queue:q") == k.intermediate
    assert Queue.redis_queue_namespace_prefix + "q" == k.queue
    assert [t.value for t in Result.Type] == [1, 2, 3, 4, 5]
    assert parse_composite_key("abc-1:0123abcd") == ("abc-1", "0123abcd")
    now = datetime(2026, 11, 29, 16, 0, 0, 123456, tzinfo=timezone.utc)
    assert timestamp(now) == utcformat(now) == "2026-11-29T16:00:00.123456Z" and utcparse(timestamp(now)) == now
    assert parse_timestamp(b"2026-11-29T16:00:00+00:00") == now.replace(microsecond=0)
    assert valid_job_id("a-b_C9") and not valid_job_id("order.42") and not valid_job_id("a:b")
    assert JOB_ID_PATTERN.fullmatch("order.42") is None
    assert list(inspect.signature(Job.restore).parameters) == ["self", "raw_data"]
    assert "dependents_key" in dir(Job) and "enqueue_dependents" in dir(Queue)
    assert REDIS_WORKER_KEYS == "rq:workers" and list(inspect.signature(clean_worker_registry).parameters) == ["queue"]


def test_inflate_bounds_a_zlib_bomb_and_passes_plain_json():
    import zlib

    assert inflate(b'["x",null,[],{}]', 100) == b'["x",null,[],{}]'
    bomb = zlib.compress(b"[" + b" " * 5_000_000 + b"]", 9)
    try:
        inflate(bomb, 1_000_000)
    except ValueError as exc:
        assert "ARCFACE_MAX_JOB_BYTES" in str(exc)
    else:
        raise AssertionError("a 5 MB inflation passed a 1 MB bound")


def _pop(conn, queue: str, n: int) -> None:
    """What rq's crash-safe pop does (and the worker's taking): ids from the queue into its intermediate list."""
    keys = QueueKeys(queue)
    for _ in range(n):
        assert conn.lmove(keys.queue, keys.intermediate, "LEFT", "RIGHT") is not None


def _register(conn, fence: Fence, ids, execution: str = "e1") -> list[int]:
    """The worker's registration of popped ids under ``execution`` (its hash fields as the worker writes them)."""
    stamp = timestamp(datetime.now(timezone.utc))
    rows = [
        (
            jid,
            f"{jid}:{execution}",
            {"status": "started", "started_at": stamp, "worker_name": "w1", EXECUTION_FIELD: f"{jid}:{execution}"},
        )
        for jid in ids
    ]
    with conn.pipeline() as pipe:
        fence.register(pipe, rows, time.time() + 30)
        return pipe.execute()[0]


def _register_started(conn, fence: Fence, jobs) -> None:
    """Each job popped and registered as started under execution e1, as the worker's taking does."""
    _pop(conn, fence.keys.name, len(jobs))
    assert _register(conn, fence, [job.id for job in jobs]) == [1] * len(jobs)


def _finished_and_failed(ok, bad) -> list[Outcome]:
    """Worker w1's outcomes: ``ok`` finished with a result (TTL 600), ``bad`` failed with image_decode_error (700)."""
    now = datetime.now(timezone.utc)
    failure = JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "cannot decode")
    return [
        Outcome(
            "own",
            "finished",
            ok.id,
            f"{ok.id}:e1",
            600,
            {"status": "finished", "ended_at": timestamp(now)},
            success_entry({"kind": "embed", "x": 1}, "w1", "e1", now, now),
        ),
        Outcome(
            "own",
            "failed",
            bad.id,
            f"{bad.id}:e1",
            700,
            {"status": "failed", "ended_at": timestamp(now), "meta": failure_meta({}, failure).decode()},
            failure_entry(failure, "w1", "e1", now, now),
        ),
    ]


def test_outcomes_written_by_the_fence_read_back_through_rq(redis_server):
    conn = redis_server.client()
    q = Queue(f"fence-{time.time_ns()}", connection=conn, serializer=JSONSerializer, job_class=SafeJob)
    ok = q.enqueue_call(
        EMBED_FUNC, args=({"kind": "embed", "image": {"path": "x.png"}},), result_ttl=600, failure_ttl=700
    )
    bad = q.enqueue_call(
        EMBED_FUNC, args=({"kind": "embed", "image": {"path": "y.png"}},), result_ttl=600, failure_ttl=700
    )
    fence = Fence(conn, q.name)
    _register_started(conn, fence, (ok, bad))
    assert set(StartedJobRegistry(queue=q).get_job_ids(cleanup=False)) == {ok.id, bad.id}
    restored = restore(ok.id, conn.hgetall(f"rq:job:{ok.id}"), conn, 1 << 20)
    assert restored.func_name == EMBED_FUNC and restored.result_ttl == 600
    outcomes = _finished_and_failed(ok, bad)
    assert fence.apply(outcomes, time.time(), "rq:worker:w1", "w1") == [1, 1]
    assert fence.apply(outcomes, time.time(), "rq:worker:w1", "w1") == [
        0,
        0,
    ]  # not ours any more: nothing written twice

    job = SafeJob.fetch(ok.id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED and job.latest_result().return_value == {"kind": "embed", "x": 1}
    assert 590 <= conn.ttl(f"rq:job:{ok.id}") <= 600 and 590 <= conn.ttl(f"rq:results:{ok.id}") <= 600
    failed = SafeJob.fetch(bad.id, connection=conn, serializer=JSONSerializer)
    result = failed.latest_result()
    assert failed.get_status() == JobStatus.FAILED and result.type == Result.Type.FAILED
    assert (
        "[image_decode_error] cannot decode" in result.exc_string
        and failed.meta["error"]["code"] == "image_decode_error"
    )
    assert FinishedJobRegistry(queue=q).get_job_ids() == [ok.id] and FailedJobRegistry(queue=q).get_job_ids() == [
        bad.id
    ]
    assert StartedJobRegistry(queue=q).get_job_ids() == []


def test_a_failure_carries_its_code_as_data_in_the_result_entry_too(redis_server):
    conn = redis_server.client()
    q = Queue(f"fence-{time.time_ns()}", connection=conn, serializer=JSONSerializer, job_class=SafeJob)
    ok, bad = (
        q.enqueue_call(EMBED_FUNC, args=({"kind": "embed", "image": {"path": f"{n}.png"}},), failure_ttl=700)
        for n in "xy"
    )
    fence = Fence(conn, q.name)
    _register_started(conn, fence, (ok, bad))
    assert fence.apply(_finished_and_failed(ok, bad), time.time(), "rq:worker:w1", "w1") == [1, 1]
    ((_, entry),) = conn.xrange(f"rq:results:{bad.id}")
    assert json.loads(entry[ERROR_ENTRY_FIELD.encode()]) == {"code": "image_decode_error", "message": "cannot decode"}
    conn.hdel(f"rq:job:{bad.id}", "meta")  # no meta to read it from: the entry alone says it, as data
    client = FaceClient(ProducerSettings(redis_url=redis_server.url, queue=q.name))
    with pytest.raises(JobFailed) as failed:
        client.result(bad.id, timeout=patience(5))
    assert failed.value.code == ErrorCode.IMAGE_DECODE_ERROR and failed.value.error.message == "cannot decode"


def test_registration_takes_only_ids_still_popped_and_a_retried_one_again(redis_server):
    conn = redis_server.client()
    q = Queue(f"fence-{time.time_ns()}", connection=conn, serializer=JSONSerializer, job_class=SafeJob)
    a, b = (q.enqueue_call(EMBED_FUNC, args=({"kind": "embed", "image": {"path": "x.png"}},)) for _ in range(2))
    fence = Fence(conn, q.name)
    _pop(conn, q.name, 2)
    # b's registration waited (Redis full) past the orphan age: another worker put b back on the queue
    assert conn.lrem(fence.keys.intermediate, 1, b.id) == 1 and conn.rpush(fence.keys.queue, b.id)
    assert _register(conn, fence, [a.id, b.id]) == [1, 0]
    assert _register(conn, fence, [a.id, b.id]) == [1, 0]  # a retry after a lost reply: a is still ours
    assert StartedJobRegistry(queue=q).get_job_ids(cleanup=False) == [a.id]
    assert q.get_job_ids() == [b.id] and conn.llen(fence.keys.intermediate) == 0
    assert SafeJob.fetch(a.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    assert SafeJob.fetch(b.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.QUEUED
    assert _register(conn, fence, [a.id], execution="e2") == [0]  # another execution of a: not while a runs


def test_registration_under_maxmemory_is_refused_whole_or_applied_whole(tmp_path):
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        conn = server.client()
        q = Queue("full", connection=conn, serializer=JSONSerializer, job_class=SafeJob)
        jobs = [q.enqueue_call(EMBED_FUNC, args=({"kind": "embed", "image": {"path": "x.png"}},)) for _ in range(3)]
        fence = Fence(conn, q.name)
        _pop(conn, q.name, 3)
        conn.config_set("maxmemory-policy", "noeviction")
        conn.config_set("maxmemory", str(int(conn.info("memory")["used_memory"]) // 2))
        try:
            flags = _register(conn, fence, [j.id for j in jobs])
        except redis.ResponseError as exc:
            assert "maxmemory" in str(exc) or "OOM" in str(exc)
            assert conn.llen(fence.keys.intermediate) == 3 and conn.zcard(fence.keys.started) == 0
        else:
            assert flags == [1, 1, 1] and conn.llen(fence.keys.intermediate) == 0
            assert set(StartedJobRegistry(queue=q).get_job_ids(cleanup=False)) == {j.id for j in jobs}
        conn.config_set("maxmemory", "0")
        assert _register(conn, fence, [j.id for j in jobs]) == [1, 1, 1]  # after either: registered, once
        assert len(StartedJobRegistry(queue=q).get_job_ids(cleanup=False)) == 3
    finally:
        server.stop()


def _queue(conn) -> Queue:
    return Queue(f"fence-{time.time_ns()}", connection=conn, serializer=JSONSerializer, job_class=SafeJob)


def _embed_job(q: Queue, **kwargs):
    return q.enqueue_call(EMBED_FUNC, args=({"kind": "embed", "image": {"path": "x.png"}},), **kwargs)


def test_an_id_queued_twice_and_popped_by_two_workers_is_registered_or_failed_once(redis_server):
    conn = redis_server.client()
    q = _queue(conn)
    job = _embed_job(q)
    conn.rpush(QueueKeys(q.name).queue, job.id)  # the same id queued twice (a producer's retry with its job_id)
    fence = Fence(conn, q.name)
    _pop(conn, q.name, 2)  # two workers each popped one copy and read the hash (queued) before either registered
    assert _register(conn, fence, [job.id], execution="w1") == [1]
    assert _register(conn, fence, [job.id], execution="w2") == [0]  # started by w1: w2 drops its copy
    assert StartedJobRegistry(queue=q).get_job_ids(cleanup=False) == [job.id]
    assert conn.llen(fence.keys.intermediate) == 0
    # a copy failed before registration (say its worker found the payload bad) is not failed on top of w1's run
    conn.rpush(fence.keys.intermediate, job.id)
    failure = JobFailure(ErrorCode.INVALID_PAYLOAD, "bad")
    now = datetime.now(timezone.utc)
    entry = failure_entry(failure, "w2", None, None, now)
    popped = Outcome("popped", "failed", job.id, "", 60, {"status": "failed"}, entry, "", fence.keys.intermediate)
    assert fence.apply([popped], time.time(), "rq:worker:w2", "w2") == [0]
    assert conn.hget(f"rq:job:{job.id}", "status") == b"started" and conn.xlen(f"rq:results:{job.id}") == 0


def test_recovery_leaves_a_job_alone_that_runs_under_another_entry(redis_server):
    conn = redis_server.client()
    q = _queue(conn)
    job = _embed_job(q, retry=None)
    fence = Fence(conn, q.name)
    stale = f"{job.id}:dead"  # left by a worker killed while it held the job, before the id was queued again
    conn.zadd(fence.keys.started, {stale: time.time() - 60})
    _pop(conn, q.name, 1)
    live = f"{job.id}:e2"
    stamp = timestamp(datetime.now(timezone.utc))
    fields = {"status": "started", "started_at": stamp, EXECUTION_FIELD: live}
    with conn.pipeline() as pipe:
        fence.register(pipe, [(job.id, live, fields)], time.time() + 30)
        assert pipe.execute()[0] == [1]
    requeue = Outcome("expired", "requeue", job.id, stale, 0, {"status": "queued"}, None, fence.keys.queue)
    assert fence.apply([requeue], time.time(), "rq:worker:w3", "w3") == [0]
    assert conn.zscore(fence.keys.started, stale) is None  # the stale entry is gone ...
    assert conn.zscore(fence.keys.started, live) is not None and conn.llen(fence.keys.queue) == 0  # ... the run not
    assert conn.hget(f"rq:job:{job.id}", "status") == b"started"


def test_a_ttl_over_what_expire_takes_is_kept_as_long_as_redis_can(redis_server):
    conn = redis_server.client()
    q = _queue(conn)
    ok, bad = _embed_job(q, result_ttl=600), _embed_job(q, failure_ttl=600)
    fence = Fence(conn, q.name)
    _register_started(conn, fence, (ok, bad))
    outcomes = _finished_and_failed(ok, bad)
    for o in outcomes:
        o.ttl = 10**20  # a hostile or mistaken result_ttl / failure_ttl
    assert fence.apply(outcomes, time.time(), "rq:worker:w1", "w1") == [1, 1]
    assert conn.ttl(f"rq:job:{ok.id}") > 10**9 and conn.ttl(f"rq:job:{bad.id}") > 10**9
    assert FinishedJobRegistry(queue=q).get_job_ids() == [ok.id] and FailedJobRegistry(queue=q).get_job_ids() == [
        bad.id
    ]


def test_a_worker_key_marked_dead_lets_rq_register_the_worker_again(redis_server):
    from rq.worker import SimpleWorker

    conn = redis_server.client()
    worker = SimpleWorker([_queue(conn)], connection=conn)
    conn.hset(worker.key, "last_heartbeat", "x")  # the worker's own heartbeat re-created a bare key after FLUSHALL
    with pytest.raises(ValueError, match="active worker"):
        worker.register_birth()
    mark_worker_dead(conn, worker.key)
    worker.register_birth()
    assert conn.sismember(REDIS_WORKER_KEYS, worker.key) and not conn.hexists(worker.key, "death")


def _success(job_id: str, execution: str, worker: str) -> Outcome:
    """Worker ``worker``'s finished outcome of ``job_id``, run under ``execution``."""
    now = datetime.now(timezone.utc)
    entry = success_entry({"kind": "embed", "by": worker}, worker, execution, now, now)
    fields = {"status": "finished", "ended_at": timestamp(now)}
    return Outcome("own", "finished", job_id, f"{job_id}:{execution}", 600, fields, entry)


def test_rq_cleanup_run_by_rq_info_never_requeues_a_started_job_however_late_it_runs(redis_server):
    conn = redis_server.client()
    q = _queue(conn)
    retrying, once = _embed_job(q, retry=Retry(max=3)), _embed_job(q)
    fence = Fence(conn, q.name)
    _register_started(conn, fence, (retrying, once))
    registry = StartedJobRegistry(queue=q)
    registry.cleanup(timestamp=time.time() + 10**6)  # what `rq info` runs, after a stall of any length
    assert registry.count == 2 and set(registry.get_job_ids()) == {retrying.id, once.id}
    assert q.get_job_ids() == [] and FailedJobRegistry(queue=q).get_job_ids(cleanup=False) == []
    for job in (retrying, once):
        assert conn.hget(f"rq:job:{job.id}", "status") == b"started"
    # the worker's own recovery still sees the entries once their heartbeat runs out
    expired = fence.expired_started(time.time() + 31)
    assert sorted(m for m, _ in expired) == sorted(f"{j.id}:e1" for j in (retrying, once))
    assert fence.expired_started(time.time()) == []
    with conn.pipeline() as pipe:  # a heartbeat moves the liveness expiry, never rq's score
        fence.refresh_started(pipe, {f"{once.id}:e1": time.time() + 100})
        pipe.execute()
    assert [m for m, _ in fence.expired_started(time.time() + 31)] == [f"{retrying.id}:e1"]
    assert conn.zscore(fence.keys.started, f"{once.id}:e1") == math.inf


def test_an_entry_scored_by_expiry_in_rqs_registry_by_an_earlier_worker_is_still_recovered(redis_server):
    conn = redis_server.client()
    q = _queue(conn)
    job = _embed_job(q, retry=None)
    fence = Fence(conn, q.name)
    _pop(conn, q.name, 1)
    assert _register(conn, fence, [job.id], execution="old") == [1]
    member = f"{job.id}:old"
    conn.zrem(fence.keys.alive, member)  # as an earlier version registered it: no liveness entry ...
    conn.zadd(fence.keys.started, {member: time.time() - 5})  # ... its expiry as rq's score
    assert fence.expired_started(time.time()) == [(member, conn.zscore(fence.keys.started, member))]
    requeue = Outcome("expired", "requeue", job.id, member, 0, {"status": "queued"}, None, fence.keys.queue)
    assert fence.apply([requeue], time.time(), "rq:worker:w3", "w3") == [1]
    assert q.get_job_ids() == [job.id] and conn.zcard(fence.keys.started) == 0


@pytest.mark.parametrize("order", ["first finishes before the copy is taken", "first finishes first", "copy first"])
def test_a_job_requeued_behind_its_worker_gets_exactly_one_success(redis_server, order):
    """rq's cleanup re-queued a job while worker A still computes it, and A's heartbeat landed between the
    cleanup's read and its ZREMRANGEBYSCORE (so A's started entry stayed); worker B takes the re-queued copy.
    Only the execution that registered last writes an outcome; the other is refused, whatever the order."""
    conn = redis_server.client()
    q = _queue(conn)
    job = _embed_job(q, retry=Retry(max=3))
    fence = Fence(conn, q.name)
    _pop(conn, q.name, 1)
    assert _register(conn, fence, [job.id], execution="a") == [1]
    rq_job = SafeJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
    with conn.pipeline() as pipe:
        rq_job.retry(q, pipe)  # what StartedJobRegistry.cleanup does to an expired entry's job
        pipe.execute()
    assert q.get_job_ids() == [job.id] and conn.zscore(fence.keys.started, f"{job.id}:a") is not None
    a, b = _success(job.id, "a", "wa"), _success(job.id, "b", "wb")
    if order == "first finishes before the copy is taken":
        assert fence.apply([a], time.time(), "rq:worker:wa", "wa") == [0]
        _pop(conn, q.name, 1)
        assert _register(conn, fence, [job.id], execution="b") == [1]
        assert fence.apply([b], time.time(), "rq:worker:wb", "wb") == [1]
    else:
        _pop(conn, q.name, 1)
        assert _register(conn, fence, [job.id], execution="b") == [1]
        first, second = (a, b) if order == "first finishes first" else (b, a)
        replies = [fence.apply([o], time.time(), f"rq:worker:{o.member}", "w")[0] for o in (first, second)]
        assert replies == ([0, 1] if order == "first finishes first" else [1, 0])
    entries = conn.xrange(f"rq:results:{job.id}")
    assert [(e[b"type"], e[b"execution_id"]) for _, e in entries] == [(b"1", b"b")]
    assert conn.hget(f"rq:job:{job.id}", "status") == b"finished"
    assert FinishedJobRegistry(queue=q).get_job_ids() == [job.id]
    assert conn.zcard(fence.keys.started) == 0 and conn.zcard(fence.keys.alive) == 0
    assert q.get_job_ids() == [] and conn.llen(fence.keys.intermediate) == 0
