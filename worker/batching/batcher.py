"""The micro-batching rq worker: takes many jobs at once, packs their images into engine batches, completes
each job through rq's data structures (status, result stream, registries), and loses nothing when it dies.

rq runs one job per worker and has no multi-pop (rq issue #928). This worker subclasses rq's ``SimpleWorker``
for registration, ``rq info`` and ``rq suspend``, and replaces its loop:

1. take: block for a first id with rq's crash-safe pop (BLMOVE into the intermediate list), then more without
   blocking for up to ``batch_timeout_ms`` (and for as long as the model is busy) until ``max_batch_size``
   images are waiting; read every hash in one round trip, defensively (:mod:`worker.batching.taking`): a job that
   cannot be read or run fails alone, at once;
2. register the runnable ones in one script (status started, started-registry entries, out of the intermediate
   list), each only while this worker's pop of it is still in the intermediate list; their images go to the
   preprocessing pool;
3. pack waiting images, from any jobs, into engine batches of at most ``max_batch_size``: a 256-image job spans
   several engine calls, small jobs share one; the next batch is gathered while the model runs;
4. a job whose last image is embedded is complete: one Lua call per engine batch writes every finished job's
   outcome atomically (:mod:`worker.batching.rqfence`).

A heartbeat thread keeps the started entries of jobs in hand alive (``execution_ttl_s``). When a worker dies,
its entries expire and a live worker's maintenance re-queues those jobs (with their retries) or fails them
``worker_died``; an entry must be seen expired twice, two heartbeats apart, after the recovering worker's own
last failed heartbeat, so a Redis stall or a full Redis never makes a live worker's jobs look dead. Delivery is
at-least-once; each job's outcome is written at most once.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import redis
import structlog
from rq.suspension import is_suspended
from rq.worker import SimpleWorker, WorkerStatus

from producer.contract.codes import JobFailure
from worker.batching.completion import CompletionMixin
from worker.batching.executing import ExecutionMixin, Item
from worker.batching.maintenance import MaintenanceMixin
from worker.batching.retry import transient, until_redis_takes
from worker.batching.rqfence import EXECUTION_FIELD, Fence, timestamp
from worker.batching.taking import Taken, classify, decode_id, pop_first, pop_many, utcnow
from worker.inference.prepool import ProcessPreprocessor, start_preprocessors
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime
from worker.settings import WorkerSettings

log = structlog.get_logger("arcface.batcher")
_BUSY_POLL_S = 0.05  # BLMOVE timeout while the model is busy: wakes at once when a job arrives


class BatchWorker(ExecutionMixin, CompletionMixin, MaintenanceMixin, SimpleWorker):
    """An rq worker (one queue) that executes ArcFace jobs in micro-batches. Never forks."""

    def __init__(
        self,
        queue: Any,
        runtime: Runtime,
        settings: WorkerSettings,
        metrics: WorkerMetrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            [queue],
            connection=queue.connection,
            serializer=queue.serializer,
            job_class=queue.job_class,
            worker_ttl=settings.worker_ttl_s,
            maintenance_interval=settings.maintenance_interval_s,
            **kwargs,
        )
        self.queue = queue
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.max_batch_size = (
            settings.max_batch_size if isinstance(settings.max_batch_size, int) else 32
        )  # auto: cli sets it
        self.batch_timeout_s = settings.batch_timeout_ms / 1000.0
        self.fence = Fence(queue.connection, queue.name)
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self._procs: ProcessPreprocessor | None = None  # started by work()
        self._stalled: str | None = None  # why preprocessing is stuck, as the last heartbeat published it
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._lock = threading.Lock()  # guards _jobs against the heartbeat thread
        self._jobs: dict[str, Taken] = {}  # registered, not yet completed
        self._bytes_in_hand = 0  # payload bytes of _jobs: taking pauses at 2 x max_job_bytes
        self._waiting: deque[Item] = deque()  # images not yet in an engine batch
        self._stop = threading.Event()
        self._signals = 0
        self._suspects: dict[str, tuple[float, float]] = {}  # started member -> (score, first seen, monotonic)
        self._intermediate_seen: dict[str, float] = {}
        self._heartbeat_failed_at = -math.inf  # monotonic: Redis refused or missed this worker's last write then
        self._last_maintenance = 0.0
        self._last_schedule = 0.0
        self._outage = False
        self.batches_done = 0
        self.on_reregister: Callable[[], None] | None = None

    # --- Redis outages -----------------------------------------------------------------------------
    def _redis_retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` until Redis takes it (:func:`~worker.batching.retry.until_redis_takes`). Results in hand
        are never dropped because Redis restarted, stalled or filled up; the worker waits for it."""
        out = until_redis_takes(what, fn, on_refused=self._refused, logger=log)
        if self._outage:
            self._outage = False
            log.info("redis_reachable_again", during=what)
        return out

    def _refused(self) -> None:
        self._outage = True

    # --- signals --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("warm_shutdown", signal=signal.Signals(signum).name, in_flight=len(self._jobs))
            self._stop.set()
        else:
            # Cold shutdown: exit at once. Jobs in hand stay in the started registry and are re-queued by
            # a live worker once their entries expire.
            log.warning("cold_shutdown", signal=signal.Signals(signum).name, in_flight=len(self._jobs))
            os._exit(128 + signum)

    # --- taking -----------------------------------------------------------------------------------
    def take(self, block_s: float, model_busy: Callable[[], bool] = lambda: False) -> int:
        """Take jobs until ``max_batch_size`` images wait: block up to ``block_s`` for a first one when none
        wait, then fill for ``batch_timeout_ms`` and while the model is busy. Returns the jobs registered."""
        keys = self.fence.keys
        taken = 0
        if not self._waiting:
            first = None
            while first is None and model_busy() and not self._stop.is_set():
                first = pop_first(self.connection, keys, _BUSY_POLL_S)
            if first is None and not model_busy():
                first = (
                    pop_first(self.connection, keys, block_s)
                    if block_s > 0
                    else next(iter(pop_many(self.connection, keys, 1)), None)
                )
            if first is None:
                return 0
            taken += self._admit([first])
        deadline = time.monotonic() + self.batch_timeout_s
        # While the model runs, take up to two batches ahead so preprocessing never starves (multi-image jobs).
        while (
            len(self._waiting) < self.max_batch_size * (2 if model_busy() else 1)
            and not self._stop.is_set()
            and self._bytes_in_hand < 2 * self.settings.max_job_bytes
        ):
            ids = pop_many(self.connection, keys, max(1, self.max_batch_size - len(self._waiting)))
            if not ids and model_busy():
                one = pop_first(self.connection, keys, _BUSY_POLL_S)
                ids = [one] if one else []
            if ids:
                taken += self._admit(ids)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Redis checks blocking timeouts at its own tick (BLMOVE with 5 ms waits ~15 ms), so the few-ms
            # wait for a batch to fill is short sleeps between non-blocking pops instead.
            time.sleep(min(remaining, 0.001))
        return taken

    def _admit(self, raw_ids: list[bytes]) -> int:
        """Read, sort and register popped ids; fail at once what cannot run; queue the images of the rest."""
        keys = self.fence.keys
        now = utcnow()
        decoded = [(raw, decode_id(raw)) for raw in raw_ids]
        ids = [jid for _, jid in decoded if jid is not None]
        # the bound: the payload plus room for rq's own fields (a hash rq wrote is a few KB besides ``data``)
        hashes = dict(zip(ids, self.fence.read_jobs(ids, self.settings.max_job_bytes + (1 << 20)), strict=True))
        drop: list[bytes] = [raw for raw, jid in decoded if jid is None]
        failed: list[Taken] = []
        runnable: list[Taken] = []
        seen: set[str] = set()
        for raw, jid in decoded:
            if jid is None:
                continue
            if jid in seen:  # the same id queued twice and taken together: run it once
                drop.append(raw)
                continue
            seen.add(jid)
            t = classify(jid, hashes.get(jid, {}), self.connection, self.settings.max_job_bytes, now)
            if t is None:
                drop.append(raw)
                continue
            if t.failure is None:
                try:
                    assert t.request is not None
                    t.detect = self.runtime.check(t.request)
                except JobFailure as failure:
                    t.failure = failure
            (failed if t.failure is not None else runnable).append(t)
        if drop:
            with self.connection.pipeline(transaction=False) as pipe:
                for raw in drop:
                    pipe.lrem(keys.intermediate, 1, raw)
                pipe.execute()
            log.debug("stale_entries_dropped", count=len(drop))
        if failed:
            self._complete([self._failure_outcome(t, t.failure, guard="popped") for t in failed], failed)
        if runnable:
            self._register(runnable, now)
        return len(runnable)

    def _register(self, jobs: list[Taken], now: Any) -> None:
        stamp = timestamp(now)
        expiry = time.time() + self.settings.execution_ttl_s
        rows: list[tuple[str, str, dict[str, str]]] = []
        for t in jobs:
            t.execution_id = uuid.uuid4().hex
            t.member = f"{t.id}:{t.execution_id}"
            t.started_at = now
            fields = {"status": "started", "started_at": stamp, "last_heartbeat": stamp, "worker_name": self.name}
            fields[EXECUTION_FIELD] = t.member  # recovery acts on the job only while it runs under this entry
            if t.job.origin != self.queue.name:
                fields["origin"] = self.queue.name  # a producer that wrote no origin (wire-format default)
            if t.job.enqueued_at is None:
                fields["enqueued_at"] = stamp
            rows.append((t.id, t.member, fields))
        with self._lock:  # in hand before Redis knows: heartbeats and this worker's recovery count them now
            for t in jobs:
                self._jobs[t.id] = t
                self._bytes_in_hand += t.nbytes

        def write() -> list[int]:
            with self.connection.pipeline() as pipe:
                self.fence.register(pipe, rows, expiry)
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                return pipe.execute()[0]

        flags = self._redis_retry("register", write)
        elsewhere = [t for t, ok in zip(jobs, flags, strict=True) if not ok]
        if elsewhere:
            self._release(elsewhere)
            log.warning("registration_lost", job_ids=[t.id for t in elsewhere], reason="another worker has it")
            jobs = [t for t, ok in zip(jobs, flags, strict=True) if ok]
        instant = [t for t in jobs if t.n_images == 0]  # nothing to embed (forget): complete now
        if instant:
            self._complete([self._finish(t) for t in instant], instant)
        self._preprocess(jobs)

    # --- the loop ---------------------------------------------------------------------------------
    def work(self, burst: bool = False, logging_level: str | None = "WARNING", **_: Any) -> bool:  # type: ignore[override]
        """Run until stopped (or, with ``burst``, until the queue is empty). Returns whether any job ran."""
        self.bootstrap(logging_level or "WARNING")
        self.install_signal_handlers()
        self._heartbeat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        pending: Future | None = None
        worked = False
        backoff = 0.5
        try:
            self._procs = start_preprocessors(self.settings, self.runtime.engine.model.input_size, self.max_batch_size)
            while True:
                if pending is not None and pending.done():
                    pending.result()
                    pending = None
                if self._stop.is_set() and not self._waiting:
                    break
                try:
                    took = self._cycle(burst, pending)
                    backoff = 0.5
                except Exception as exc:
                    if not transient(exc):
                        log.exception("loop_error")  # never let one iteration's surprise stop the worker
                    else:
                        self._outage = True
                        log.error("redis_unreachable", during="take", error=str(exc)[:300], retry_in_s=backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                worked = worked or took
                if self._waiting:
                    if pending is not None:
                        pending.result()
                    pending = self._infer.submit(self.run_batch, self.next_engine_batch())
                elif pending is None and burst and not took:
                    break
            if pending is not None:
                pending.result()
        finally:
            self._shut_down(beat)
        return worked

    def _shut_down(self, beat: threading.Thread) -> None:
        self._heartbeat_stop.set()
        beat.join(timeout=5)
        self._pool.shutdown(wait=True)
        self._infer.shutdown(wait=True)
        if self._procs is not None:
            self._procs.close()
        try:
            self.teardown()
        except redis.RedisError as exc:
            log.warning("teardown_failed", error=str(exc)[:300])

    def _cycle(self, burst: bool, pending: Future | None) -> bool:
        """Maintenance, then take jobs (gathering while the model runs ``pending``). Returns whether any job came."""
        self.maintain()
        if self._stop.is_set():
            return False
        suspended = is_suspended(self.connection, self)  # a real round trip: Redis answers again
        if self._outage:
            self._outage = False
            log.info("redis_reachable_again", during="take")
        if suspended:
            if not self._waiting and pending is None:
                self.set_state(WorkerStatus.SUSPENDED)
                time.sleep(1.0 if not burst else 0)
            return False
        if pending is None and not self._waiting:
            self.set_state(WorkerStatus.IDLE)
            self.heartbeat()

        def busy() -> bool:
            return pending is not None and not pending.done()

        block = 0.0 if burst or pending is not None or self._waiting else 1.0
        return self.take(block, busy) > 0
