"""Maintenance: jobs of dead workers, ids orphaned in the intermediate list, rq's scheduled jobs, registry and
worker-registry cleanup (:class:`Maintainer`, run from the worker's loop); and the liveness of the worker and of
every job in hand (:class:`Heartbeat`, its own thread).

A started entry is recovered only when seen expired on two passes two heartbeats apart, both after this worker's
own last failed heartbeat (a live worker would have refreshed it in between, since Redis took writes all that
time), so a Redis stall or a full Redis never makes a live worker's jobs look dead; a worker never recovers its
own jobs.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import redis
import structlog
from rq import Queue
from rq.worker import SimpleWorker

from producer.contract.codes import ErrorCode, JobFailure
from worker.batching.completion import Completer, WorkerIdentity
from worker.batching.inhand import InHand
from worker.batching.reading import classify, decode_id, utcnow
from worker.batching.rqfence import (
    REDIS_WORKER_KEYS,
    STALLED_FIELD,
    Fence,
    Outcome,
    clean_worker_registry,
    job_key,
    mark_worker_dead,
    split_member,
    timestamp,
    valid_job_id,
)
from worker.inference.prepool import ProcessPreprocessor
from worker.settings import WorkerSettings

log = structlog.get_logger("arcface.batcher")


class Heartbeat:
    """The worker's liveness and that of every job in hand, refreshed every ``heartbeat_interval_s`` on a thread
    of its own; it also publishes whether preprocessing is stuck, and registers the worker again after Redis lost
    it. ``failed_at`` (monotonic) is when Redis last refused or missed a heartbeat: recovery trusts no sighting
    older than that."""

    def __init__(
        self,
        fence: Fence,
        settings: WorkerSettings,
        in_hand: InHand,
        worker: SimpleWorker,
        preprocessors: Callable[[], ProcessPreprocessor | None],
    ) -> None:
        self.fence = fence
        self.connection = fence.connection
        self.settings = settings
        self.in_hand = in_hand
        self.worker = worker
        self.preprocessors = preprocessors
        self.on_reregister: Callable[[], None] | None = None
        self.failed_at = -math.inf
        self._stalled: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        """Start beating (again, after :meth:`stop`: a worker's ``work`` may run more than once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.beat()
            except Exception as exc:  # never let the thread die: without it, jobs in hand would look dead
                self.failed_at = time.monotonic()
                log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")

    def beat(self) -> None:
        """Refresh the worker and every job in hand (ZADD XX: a completed job's entry is never re-created), and
        say in the worker's hash whether preprocessing is stuck (``arcface-worker-health`` fails while it is).
        After a FLUSHALL or a Redis restarted empty the worker registers itself again."""
        procs = self.preprocessors()
        stalled = procs.stalled() if procs is not None else None
        if stalled != self._stalled:
            if stalled:
                log.error("preprocessing_stalled", reason=stalled)
            else:
                log.info("preprocessing_moving_again", after=self._stalled)
            self._stalled = stalled
        key = self.worker.key
        with self.in_hand.lock:
            expiry = time.time() + self.settings.execution_ttl_s
            members = dict.fromkeys(self.in_hand.members_unlocked(), expiry)
            with self.connection.pipeline() as pipe:
                # registered = in rq's worker set: the idle loop's own heartbeat HSETs re-create a bare worker
                # key right after a FLUSHALL, so the key's existence proves nothing
                pipe.sismember(REDIS_WORKER_KEYS, key)
                self.worker.heartbeat(pipeline=pipe)
                if stalled:
                    pipe.hset(key, STALLED_FIELD, stalled)
                else:
                    pipe.hdel(key, STALLED_FIELD)
                self.fence.refresh_started(pipe, members)
                alive = pipe.execute()[0]
        if not alive and not self._stop.is_set():  # a worker shutting down stays deregistered
            log.warning(
                "worker_reregistered",
                worker=self.worker.name,
                reason="not in rq:workers (Redis flushed or restarted empty)",
            )
            # the loop's own heartbeat may re-create the bare key at any moment: rq's register_birth refuses a
            # live-looking key, so mark it dead first (rqfence) rather than delete it
            mark_worker_dead(self.connection, key)
            self.worker.register_birth()  # type: ignore[no-untyped-call]  # rq's, untyped
            if self.on_reregister is not None:
                self.on_reregister()  # what a flushed Redis lost besides the worker: the published model info


class Maintainer:
    """Recovery and scheduling, run from the worker's loop."""

    def __init__(
        self,
        fence: Fence,
        queue: Queue,
        settings: WorkerSettings,
        identity: WorkerIdentity,
        in_hand: InHand,
        completer: Completer,
        heartbeat: Heartbeat,
    ) -> None:
        self.fence = fence
        self.connection = fence.connection
        self.queue = queue
        self.settings = settings
        self.identity = identity
        self.in_hand = in_hand
        self.completer = completer
        self.heartbeat = heartbeat
        self._suspects: dict[str, tuple[float, float]] = {}  # started member -> (expiry score, first seen)
        self._intermediate_seen: dict[str, float] = {}
        self._last_maintenance = 0.0
        self._last_schedule = 0.0

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
        self.fence.purge_expired(time.time())
        try:
            clean_worker_registry(self.queue)
        except redis.RedisError as exc:
            log.warning("worker_registry_cleanup_failed", error=str(exc)[:300])

    def recover_started(self) -> None:
        """Jobs whose started entry expired, seen expired on two passes two heartbeats apart while Redis took this
        worker's heartbeats (a live worker's would have refreshed it in between): re-queued while they have
        retries, else failed ``worker_died``."""
        now, mono = time.time(), time.monotonic()
        mine = self.in_hand.members()
        expired = [(m, s) for m, s in self.fence.expired_started(now) if m not in mine]
        seen = {m for m, _ in expired}
        self._suspects = {m: v for m, v in self._suspects.items() if m in seen}
        ready: list[str] = []
        for member, score in expired:
            prev = self._suspects.get(member)
            if prev is None or prev[0] != score or prev[1] <= self.heartbeat.failed_at:
                # a first sighting, or one from before Redis last refused a write: it proves nothing
                self._suspects[member] = (score, mono)
            elif mono - prev[1] >= self.settings.heartbeat_interval_s * 2:
                ready.append(member)
        requeued: list[str] = []
        for member in ready:
            self._suspects.pop(member, None)
            if self._recover(member):
                requeued.append(split_member(member))
        if requeued:  # one line for a dead worker's jobs, however many it held
            log.warning("jobs_requeued", reason="worker died", count=len(requeued), job_ids=requeued[:100])

    def _recover(self, member: str) -> bool:
        """Re-queue (True) or fail ``member``'s job, or drop an entry whose job is gone."""
        job_id = split_member(member)

        fields: dict[bytes, bytes] = self.connection.hgetall(job_key(job_id)) if valid_job_id(job_id) else {}  # type: ignore[assignment]
        t = (
            classify(job_id, fields, self.connection, self.settings.max_job_bytes, utcnow(), recovering=True)
            if fields
            else None
        )
        if t is None or t.job is None:
            # gone, or unreadable: just drop the entry
            self.fence.drop_started(member)
            return False
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
            applied = self.fence.apply([o], time.time(), self.identity.key, self.identity.name)
            return bool(applied and applied[0])
        t.member, t.execution_id = member, member.rsplit(":", 1)[-1]
        failure = JobFailure(
            ErrorCode.WORKER_DIED, "the worker running this job died (its heartbeat expired) and no retries are left"
        )
        o = self.completer.failure_outcome(t, failure, guard="expired")
        if self.fence.apply([o], time.time(), self.identity.key, self.identity.name)[0]:
            log.info("job_failed", job_id=job_id, code=failure.code.value, error=failure.message)
        return False

    def recover_intermediate(self) -> None:
        """Ids left in the intermediate list by a worker that died between pop and registration go back to the
        queue once seen there for ``execution_ttl_s``."""
        k = self.fence.keys
        entries: list[bytes] = self.connection.lrange(k.intermediate, 0, -1)  # type: ignore[assignment]
        mine = self.in_hand.ids()
        mono = time.monotonic()
        # A live worker registers what it popped within milliseconds; a stale entry re-queued early is harmless
        # (a job already started or finished is dropped when popped again).
        orphan_after_s = max(2 * self.settings.heartbeat_interval_s, float(self.settings.execution_ttl_s))
        present = set()
        requeued: list[str] = []
        for raw in entries:
            jid = decode_id(raw)
            key = raw.decode("latin-1")
            present.add(key)
            if jid is not None and jid in mine:
                continue
            first = self._intermediate_seen.setdefault(key, mono)
            if mono - first >= orphan_after_s:
                self.fence.requeue_orphan(raw)
                self._intermediate_seen.pop(key, None)
                requeued.append(key[:200])
        if requeued:
            log.warning("intermediate_requeued", count=len(requeued), job_ids=requeued[:100])
        self._intermediate_seen = {key: v for key, v in self._intermediate_seen.items() if key in present}

    def enqueue_scheduled(self) -> None:
        """rq's scheduler for this queue: due jobs (``enqueue_in``/``enqueue_at``, retries with an interval) move
        to the queue; atomic per job, so several workers (or ``rq worker --with-scheduler``) never double them."""
        due = self.fence.take_due_scheduled(time.time())
        if not due:
            return
        stamp = timestamp(utcnow())
        fields = {"status": "queued", "enqueued_at": stamp}
        outcomes = [Outcome("none", "requeue", jid, "", 0, dict(fields), None, self.fence.keys.queue) for jid in due]
        self.fence.apply(outcomes, time.time(), self.identity.key, self.identity.name)
        log.info("scheduled_enqueued", jobs=len(outcomes))
