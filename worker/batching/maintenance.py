"""Maintenance: jobs of dead workers, ids orphaned in the intermediate list, rq's scheduled jobs, registry and
worker-registry cleanup. A mixin of :class:`~worker.batching.batcher.BatchWorker` (uses its ``connection``, ``fence``,
``settings``, ``queue``, ``name``/``key``, ``_jobs`` and ``_failure_outcome``).

A started entry is recovered only when seen expired on two passes two heartbeats apart, both after this worker's
own last failed heartbeat (a live worker would have refreshed it in between, since Redis took writes all that
time), so a Redis stall or a full Redis never makes a live worker's jobs look dead; a worker never recovers its
own jobs.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import structlog

from producer.contract.codes import ErrorCode, JobFailure
from worker.batching.rqfence import (
    REDIS_WORKER_KEYS,
    STALLED_FIELD,
    Outcome,
    clean_worker_registry,
    job_key,
    mark_worker_dead,
    split_member,
    timestamp,
    valid_job_id,
)
from worker.batching.taking import Taken, classify, decode_id, utcnow

log = structlog.get_logger("arcface.batcher")


class MaintenanceMixin:
    """Recovery and scheduling, run from the worker's loop."""

    connection: Any
    fence: Any
    settings: Any
    queue: Any
    name: str
    key: str
    _lock: Any
    _jobs: dict[str, Taken]
    _suspects: dict[str, tuple[float, float]]
    _heartbeat_failed_at: float
    _intermediate_seen: dict[str, float]
    _last_maintenance: float
    _last_schedule: float
    _failure_outcome: Any  # CompletionMixin's
    _heartbeat_stop: Any
    on_reregister: Any
    heartbeat: Any  # rq's worker heartbeat
    _procs: Any  # ProcessPreprocessor | None
    _stalled: str | None
    register_birth: Any

    def maintain(self, force: bool = False) -> None:
        """Recover jobs of dead workers, orphaned intermediate entries, due scheduled jobs; rq's own cleanups."""
        mono = time.monotonic()
        if force or mono - self._last_schedule >= 1.0:
            self._last_schedule = mono
            self.enqueue_scheduled()
        interval = self.settings.heartbeat_interval_s if self._suspects else self.settings.maintenance_interval_s
        if not force and mono - self._last_maintenance < interval:
            return
        self._last_maintenance = mono
        self.recover_started()
        self.recover_intermediate()
        k = self.fence.keys
        now = time.time()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(k.finished, 0, now)
            pipe.zremrangebyscore(k.failed, 0, now)
            pipe.execute()
        try:
            clean_worker_registry(self.queue)
        except redis.RedisError as exc:
            log.warning("worker_registry_cleanup_failed", error=str(exc)[:300])

    def recover_started(self) -> None:
        """Jobs whose started entry expired, seen expired on two passes two heartbeats apart while Redis took this
        worker's heartbeats (a live worker's would have refreshed it in between): re-queued while they have
        retries, else failed ``worker_died``."""
        now, mono = time.time(), time.monotonic()
        with self._lock:
            mine = {t.member for t in self._jobs.values()}
        expired = [(m, s) for m, s in self.fence.expired_started(now) if m not in mine]
        seen = {m for m, _ in expired}
        self._suspects = {m: v for m, v in self._suspects.items() if m in seen}
        ready: list[str] = []
        for member, score in expired:
            prev = self._suspects.get(member)
            if prev is None or prev[0] != score or prev[1] <= self._heartbeat_failed_at:
                # a first sighting, or one from before Redis last refused a write: it proves nothing
                self._suspects[member] = (score, mono)
            elif mono - prev[1] >= self.settings.heartbeat_interval_s * 2:
                ready.append(member)
        for member in ready:
            self._suspects.pop(member, None)
            self._recover(member)

    def _recover(self, member: str) -> None:
        job_id = split_member(member)

        fields = self.connection.hgetall(job_key(job_id)) if valid_job_id(job_id) else {}
        t = (
            classify(job_id, fields, self.connection, self.settings.max_job_bytes, utcnow(), recovering=True)
            if fields
            else None
        )
        if t is None or t.job is None:
            # gone, or unreadable: just drop the entry
            self.connection.zrem(self.fence.keys.started, member)
            return
        job = t.job
        if job.retries_left and job.retries_left > 0:
            interval = job.get_retry_interval()
            fields_out = {"retries_left": str(job.retries_left - 1), "status": "scheduled" if interval else "queued"}
            if interval:
                o = Outcome(
                    "expired", "schedule", job_id, member, 0, fields_out, None, str(int(time.time() + interval))
                )
            else:
                fields_out["enqueued_at"] = timestamp(utcnow())
                o = Outcome("expired", "requeue", job_id, member, 0, fields_out, None, self.fence.keys.queue)
            applied = self.fence.apply([o], time.time(), self.key, self.name)
            if applied and applied[0]:
                log.warning("job_requeued", job_id=job_id, reason="worker died", retries_left=job.retries_left - 1)
            return
        t.member, t.execution_id = member, member.rsplit(":", 1)[-1]
        failure = JobFailure(
            ErrorCode.WORKER_DIED, "the worker running this job died (its heartbeat expired) and no retries are left"
        )
        o = self._failure_outcome(t, failure, guard="expired")
        if self.fence.apply([o], time.time(), self.key, self.name)[0]:
            log.info("job_failed", job_id=job_id, code=failure.code.value, error=failure.message)

    def recover_intermediate(self) -> None:
        """Ids left in the intermediate list by a worker that died between pop and registration go back to the
        queue once seen there for ``execution_ttl_s``."""
        k = self.fence.keys
        entries = self.connection.lrange(k.intermediate, 0, -1)
        with self._lock:
            mine = set(self._jobs)
        mono = time.monotonic()
        # A live worker registers what it popped within milliseconds; a stale entry re-queued early is harmless
        # (a job already started or finished is dropped when popped again).
        orphan_after_s = max(2 * self.settings.heartbeat_interval_s, float(self.settings.execution_ttl_s))
        present = set()
        for raw in entries:
            jid = decode_id(raw)
            key = raw.decode("latin-1")
            present.add(key)
            if jid is not None and jid in mine:
                continue
            first = self._intermediate_seen.setdefault(key, mono)
            if mono - first >= orphan_after_s:
                with self.connection.pipeline() as pipe:
                    pipe.lrem(k.intermediate, 1, raw)
                    pipe.rpush(k.queue, raw)
                    pipe.execute()
                self._intermediate_seen.pop(key, None)
                log.warning("intermediate_requeued", job_id=key[:200])
        self._intermediate_seen = {key: v for key, v in self._intermediate_seen.items() if key in present}

    def enqueue_scheduled(self) -> None:
        """rq's scheduler for this queue: due jobs (``enqueue_in``/``enqueue_at``, retries with an interval) move
        to the queue; atomic per job, so several workers (or ``rq worker --with-scheduler``) never double them."""
        k = self.fence.keys
        due = self.connection.zrangebyscore(k.scheduled, "-inf", int(time.time()), start=0, num=1000)
        if not due:
            return
        stamp = timestamp(utcnow())
        outcomes = [
            Outcome(
                "none",
                "requeue",
                jid.decode("latin-1"),
                "",
                0,
                {"status": "queued", "enqueued_at": stamp},
                None,
                k.queue,
            )
            for jid in due
        ]
        with self.connection.pipeline() as pipe:
            for jid in due:
                pipe.zrem(k.scheduled, jid)
            removed = pipe.execute()
        mine = [o for o, r in zip(outcomes, removed, strict=True) if r]
        self.fence.apply(mine, time.time(), self.key, self.name)
        log.info("scheduled_enqueued", jobs=len(mine))

    # --- liveness: heartbeats of the worker and of every job in hand ---------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.heartbeat_batch()
            except Exception as exc:  # never let the thread die: without it, jobs in hand would look dead
                self._heartbeat_failed_at = time.monotonic()
                log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")

    def heartbeat_batch(self) -> None:
        """Refresh the worker and every job in hand (ZADD XX: a completed job's entry is never re-created), and
        say in the worker's hash whether preprocessing is stuck (``arcface-worker-health`` fails while it is).
        After a FLUSHALL or a Redis restarted empty the worker registers itself again."""
        stalled = self._procs.stalled() if self._procs is not None else None
        if stalled != self._stalled:
            if stalled:
                log.error("preprocessing_stalled", reason=stalled)
            else:
                log.info("preprocessing_moving_again", after=self._stalled)
            self._stalled = stalled
        with self._lock:
            members = {t.member: time.time() + self.settings.execution_ttl_s for t in self._jobs.values()}
            with self.connection.pipeline() as pipe:
                # registered = in rq's worker set: the idle loop's own heartbeat HSETs re-create a bare worker
                # key right after a FLUSHALL, so the key's existence proves nothing
                pipe.sismember(REDIS_WORKER_KEYS, self.key)
                self.heartbeat(pipeline=pipe)
                if stalled:
                    pipe.hset(self.key, STALLED_FIELD, stalled)
                else:
                    pipe.hdel(self.key, STALLED_FIELD)
                self.fence.refresh_started(pipe, members)
                alive = pipe.execute()[0]
        if not alive:
            log.warning(
                "worker_reregistered", worker=self.name, reason="not in rq:workers (Redis flushed or restarted empty)"
            )
            # the loop's own heartbeat may re-create the bare key at any moment: rq's register_birth refuses a
            # live-looking key, so mark it dead first (rqfence) rather than delete it
            mark_worker_dead(self.connection, self.key)
            self.register_birth()
            if self.on_reregister is not None:
                self.on_reregister()  # what a flushed Redis lost besides the worker: the published model info
