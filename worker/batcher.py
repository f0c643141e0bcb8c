"""The micro-batching rq worker: takes many jobs at once, runs them as one batch, completes each through
rq's own bookkeeping (status, results stream, registries), and loses nothing when it dies.

rq runs one job per worker (and forks for each); rq has no multi-pop (rq issue #928). This worker
subclasses rq's ``SimpleWorker`` for registration, ``rq info`` visibility, heartbeats and maintenance
(which re-queues the jobs of dead workers), and replaces its one-job loop:

1. block for the first job with rq's own crash-safe pop (BLMOVE into the queue's intermediate list);
2. take more without blocking (pipelined LMOVEs, retried for what is left of ``batch_timeout_ms``) until
   the batch holds ``max_batch_size`` images (a verify job counts two);
3. register the whole batch in one MULTI (an rq ``Execution`` per job, status started, out of the
   intermediate list), so ``rq info`` shows every job as executing;
4. decode/preprocess in a thread pool while the previous batch is on the model;
5. one engine call, then one pipeline writes every job's success or failure exactly as rq's
   ``handle_job_success`` / ``handle_job_failure`` would.

A heartbeat thread keeps the batch's started-registry entries alive (``execution_ttl_s``): if the process
dies, the entries expire and any live worker's maintenance re-queues the jobs (rq's abandoned-job path,
using the job's retries). Delivery is therefore at-least-once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import redis
import structlog
from rq.executions import Execution
from rq.job import JobStatus
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from producer.jobs import ERROR_META_KEY, ErrorCode, JobFailure, Timing, parse_request
from worker.metrics import WorkerMetrics
from worker.runtime import Prepared, Runtime
from worker.settings import WorkerSettings

log = structlog.get_logger("arcface.batcher")
_BUSY_POLL_S = 0.05  # BLMOVE timeout while the model is busy: wakes at once when a job arrives


@dataclass
class InFlight:
    """One job of a batch, from registration to completion."""

    job: Any
    execution: Execution | None = None
    images: int = 1
    queued_ms: float = 0.0
    prepared: Future | None = None
    failure: JobFailure | None = None


@dataclass
class Batch:
    items: list[InFlight] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(i.images for i in self.items)


def _utc(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts


class BatchWorker(SimpleWorker):
    """An rq worker (one queue) that executes ArcFace jobs in micro-batches. Never forks."""

    def __init__(self, queue: Any, runtime: Runtime, settings: WorkerSettings, metrics: WorkerMetrics | None = None, **kwargs: Any) -> None:
        super().__init__(
            [queue], connection=queue.connection, serializer=queue.serializer, job_class=queue.job_class,
            worker_ttl=settings.worker_ttl_s, maintenance_interval=settings.maintenance_interval_s, **kwargs,
        )
        self.queue = queue
        self.runtime = runtime
        self.settings = settings
        self.max_batch_size = settings.max_batch_size
        self.batch_timeout_s = settings.batch_timeout_ms / 1000.0
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._lock = threading.Lock()  # guards _in_flight against the heartbeat thread
        # rq's bookkeeping helpers read and reset the worker's single ``execution`` attribute; completion (the
        # inference thread) and maintenance (the main thread, which may fail stuck jobs through
        # handle_job_failure) must never interleave on it.
        self._rq_lock = threading.RLock()
        self._in_flight: dict[str, InFlight] = {}
        self._stop = threading.Event()
        self._signals = 0
        self.batches_done = 0
        self.metrics = metrics

    # --- Redis outages -----------------------------------------------------------------------------
    def _redis_retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` until Redis answers: backoff from 0.5 s to 30 s, one log line per attempt. Results in
        hand are never dropped because Redis restarted; the worker simply waits for it."""
        backoff = 0.5
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.error("redis_unreachable", during=what, error=str(exc), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    # --- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("warm_shutdown", signal=signal.Signals(signum).name, in_flight=len(self._in_flight))
            self._stop.set()
            self._stop_requested = True
        else:
            # Cold shutdown: exit at once. Jobs in hand stay in the started registry and are re-queued by
            # a live worker once their execution entries expire.
            log.warning("cold_shutdown", signal=signal.Signals(signum).name, in_flight=len(self._in_flight))
            os._exit(128 + signum)

    # --- taking jobs ------------------------------------------------------------------------------
    def _pop_blocking(self, timeout_s: float) -> bytes | None:
        return self.connection.blmove(self.queue.key, self.queue.intermediate_queue_key, timeout_s, "LEFT", "RIGHT")

    def _pop_many(self, n: int) -> list[bytes]:
        with self.connection.pipeline(transaction=False) as pipe:
            for _ in range(n):
                pipe.lmove(self.queue.key, self.queue.intermediate_queue_key, "LEFT", "RIGHT")
            return [jid for jid in pipe.execute() if jid is not None]

    def take_batch(self, block_s: float, model_busy: Callable[[], bool] = lambda: False) -> Batch:
        """Block up to ``block_s`` for a first job, then fill the batch for ``batch_timeout_ms``, and for as
        long as the model is still busy with the previous batch (those jobs would wait anyway)."""
        first = self._pop_while_busy(model_busy)
        if first is None and not model_busy():
            first = self._pop_blocking(block_s) if block_s > 0 else next(iter(self._pop_many(1)), None)
        if not first:
            return Batch()
        batch = Batch()
        deadline = time.monotonic() + self.batch_timeout_s
        self._add_jobs(batch, [first])
        while batch.images < self.max_batch_size and not self._stop.is_set():
            ids = self._pop_many(self.max_batch_size - batch.images)
            if not ids and model_busy():
                one = self._pop_blocking(_BUSY_POLL_S)
                ids = [one] if one else []
            if ids:
                self._add_jobs(batch, ids)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Redis checks blocking timeouts at its own tick (BLMOVE with 5 ms waits ~15 ms here), so the
            # few-ms wait for a batch to fill is short sleeps between non-blocking pops instead.
            time.sleep(min(remaining, 0.001))
        self._give_back_overflow(batch)
        return batch

    def _pop_while_busy(self, model_busy: Callable[[], bool]) -> bytes | None:
        """While the model runs, wait in Redis (not in Python) for the next batch's first job."""
        while model_busy() and not self._stop.is_set():
            one = self._pop_blocking(_BUSY_POLL_S)
            if one:
                return one
        return None

    def _give_back_overflow(self, batch: Batch) -> None:
        """Verify jobs count two images: jobs past ``max_batch_size`` go back to the head of the queue,
        in their order, in one MULTI (they were never registered, so nothing else refers to them)."""
        extra: list[InFlight] = []
        while batch.images > self.max_batch_size and len(batch.items) > 1:
            extra.append(batch.items.pop())
        if extra:
            with self.connection.pipeline() as pipe:
                for item in extra:  # last popped first: LPUSH restores the original order
                    pipe.lrem(self.queue.intermediate_queue_key, 1, item.job.id)
                    pipe.lpush(self.queue.key, item.job.id)
                pipe.execute()

    def _add_jobs(self, batch: Batch, raw_ids: list[bytes]) -> None:
        ids = [r.decode() if isinstance(r, bytes) else r for r in raw_ids]
        try:
            fetched = [(job, None) for job in self.job_class.fetch_many(ids, connection=self.connection, serializer=self.serializer)]
        except Exception:  # a job hash that cannot be restored (e.g. pickled meta): one by one
            fetched = [self._fetch_one(jid) for jid in ids]
        for jid, (job, failure) in zip(ids, fetched):
            if job is None:  # deleted or expired while queued: nothing to run
                self.connection.lrem(self.queue.intermediate_queue_key, 1, jid)
                continue
            item = InFlight(job=job, failure=failure)
            if failure is None:
                try:
                    item.images = 2 if job.func_name.endswith(".verify") else 1
                except Exception as exc:  # data that is not our JSON (a pickle, garbage): never executed
                    item.failure = JobFailure(ErrorCode.INVALID_PAYLOAD, f"job data cannot be read as JSON ({type(exc).__name__})")
            enqueued = _utc(job.enqueued_at)
            if enqueued is not None:
                item.queued_ms = max(0.0, (now() - enqueued).total_seconds() * 1000.0)
            batch.items.append(item)

    def _fetch_one(self, job_id: str) -> tuple[Any, JobFailure | None]:
        try:
            return self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer), None
        except Exception as exc:
            if not self.connection.exists(self.job_class.key_for(job_id)):
                return None, None
            job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
            job.origin = self.queue.name
            return job, JobFailure(ErrorCode.INVALID_PAYLOAD, f"job hash cannot be read with the JSON serializer ({type(exc).__name__})")

    # --- registering, heartbeats ------------------------------------------------------------------
    def register_batch(self, batch: Batch) -> None:
        """Mark every job started in one MULTI: rq Execution, status, out of the intermediate list."""
        ttl = self.settings.execution_ttl_s
        with self.connection.pipeline() as pipe:
            for item in batch.items:
                item.execution = Execution.create(item.job, ttl, pipeline=pipe, worker_name=self.name)
                item.job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.lrem(self.queue.intermediate_queue_key, 1, item.job.id)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.set_current_job_id(batch.items[0].job.id, pipeline=pipe)
            self.heartbeat(pipeline=pipe)
            pipe.execute()
        with self._lock:
            for item in batch.items:
                self._in_flight[item.job.id] = item

    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.heartbeat_batch()
            except redis.RedisError as exc:
                log.warning("heartbeat_failed", error=str(exc))

    def heartbeat_batch(self) -> None:
        """Refresh the worker and every in-flight execution. Under the lock, so an entry is never
        refreshed after its job was completed (that would re-create it and fail a finished job later)."""
        with self._lock:
            with self.connection.pipeline() as pipe:
                self.heartbeat(pipeline=pipe)
                for item in self._in_flight.values():
                    if item.execution is not None:
                        item.execution.heartbeat(item.job.started_job_registry, self.settings.execution_ttl_s, pipeline=pipe)
                pipe.execute()

    # --- executing --------------------------------------------------------------------------------
    def _prepare(self, item: InFlight) -> Prepared:
        request = parse_request(item.job.func_name, item.job.args, item.job.kwargs)
        return self.runtime.prepare(request)

    def start_preprocessing(self, batch: Batch) -> None:
        for item in batch.items:
            if item.failure is None:
                item.prepared = self._pool.submit(self._prepare, item)

    def run_batch(self, batch: Batch) -> None:
        """Wait for preprocessing, run the engine once, write every result in one pipeline."""
        t0 = time.perf_counter()
        ready: list[tuple[InFlight, Prepared]] = []
        for item in batch.items:
            if item.failure is not None or item.prepared is None:
                continue
            try:
                ready.append((item, item.prepared.result()))
            except JobFailure as failure:
                item.failure = failure
            except Exception as exc:  # a bug, not bad input: fail this job, keep the worker
                log.exception("prepare_crashed", job_id=item.job.id)
                item.failure = JobFailure(ErrorCode.INTERNAL_ERROR, f"preprocessing crashed: {type(exc).__name__}: {exc}")
        detect_ms = 0.0
        if ready:
            try:
                failures, detect_ms = self.runtime.detect([p for _, p in ready])
            except Exception as exc:
                log.exception("detection_crashed", jobs=len(ready))
                failures = {i: JobFailure(ErrorCode.INTERNAL_ERROR, f"detection failed: {type(exc).__name__}: {exc}") for i in range(len(ready))}
            for i, failure in failures.items():
                ready[i][0].failure = failure
            ready = [r for i, r in enumerate(ready) if i not in failures]
        t1 = time.perf_counter()
        results: dict[str, dict] = {}
        inference_ms = 0.0
        if ready:
            try:
                embeddings, inference_ms = self.runtime.run_batch([p for _, p in ready])
                row = 0
                for item, prepared in ready:
                    n = len(prepared.inputs)
                    timing = Timing(queued_ms=item.queued_ms, batch_size=batch.images, preprocess_ms=prepared.preprocess_ms,
                                    detect_ms=detect_ms, inference_ms=inference_ms)
                    results[item.job.id] = self.runtime.finish(prepared, embeddings[row : row + n], timing)
                    row += n
            except Exception as exc:
                log.exception("inference_crashed", jobs=len(ready))
                for item, _ in ready:
                    item.failure = JobFailure(ErrorCode.INTERNAL_ERROR, f"inference failed: {type(exc).__name__}: {exc}")
        t2 = time.perf_counter()
        with self._lock:
            for item in batch.items:
                self._in_flight.pop(item.job.id, None)
        self._redis_retry("complete_batch", lambda: self.complete_batch(batch, results))
        t3 = time.perf_counter()
        failed = sum(1 for i in batch.items if i.job.id not in results)
        if self.metrics is not None:
            self._observe(batch, results, t1 - t0, inference_ms / 1000.0, t3 - t2)
        log.info(
            "batch", jobs=len(batch.items), images=batch.images, failed=failed,
            queue_wait_ms=round(max((i.queued_ms for i in batch.items), default=0.0), 1),
            preprocess_ms=round((t1 - t0) * 1000.0 - detect_ms, 1), detect_ms=round(detect_ms, 1), inference_ms=round(inference_ms, 1),
            write_ms=round((t3 - t2) * 1000.0, 1), job_ids=[i.job.id for i in batch.items][:64],
        )
        self.batches_done += 1

    def _observe(self, batch: Batch, results: dict[str, dict], preprocess_s: float, inference_s: float, write_s: float) -> None:
        m = self.metrics
        assert m is not None
        m.batch_images.observe(batch.images)
        m.preprocess.observe(preprocess_s)
        m.inference.observe(inference_s)
        m.write.observe(write_s)
        for item in batch.items:
            m.queue_wait.observe(item.queued_ms / 1000.0)
            kind = "verify" if item.images == 2 else "embed"
            if item.job.id in results:
                m.jobs.labels(kind, "finished", "").inc()
            else:
                code = item.failure.code.value if item.failure else ErrorCode.INTERNAL_ERROR.value
                m.jobs.labels(kind, "failed", code).inc()

    def complete_batch(self, batch: Batch, results: dict[str, dict]) -> None:
        """Write every job's outcome through rq's own success/failure bookkeeping, in one pipeline."""
        ended = now()
        dependents: list[tuple[Any, int]] = []  # (job, index of its EXISTS reply)
        with self._rq_lock, self.connection.pipeline() as pipe:
            for item in batch.items:
                job = item.job
                job.ended_at = ended
                started = _utc(job.started_at) or ended
                if job.id in results and job.timeout and job.timeout > 0 and (ended - started).total_seconds() > job.timeout:
                    results.pop(job.id)
                    item.failure = JobFailure(ErrorCode.JOB_TIMEOUT, f"job ran {(ended - started).total_seconds():.1f}s, over its timeout of {job.timeout}s")
                self.execution = item.execution  # rq's helpers read the worker's single execution
                if job.id in results:
                    self._write_success(job, results[job.id], pipe, started, ended)
                else:
                    failure = item.failure or JobFailure(ErrorCode.INTERNAL_ERROR, "job produced no result")
                    self._write_failure(job, failure, pipe, started, ended)
                dependents.append((job, len(pipe)))
                pipe.exists(job.dependents_key)
            self.execution = None
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            replies = pipe.execute()
        # rq enqueues jobs that depend on a finished one; our jobs rarely have any, so only those that do
        # cost a round trip.
        for job, index in dependents:
            if replies[index]:
                self.queue.enqueue_dependents(job)

    def _write_success(self, job: Any, result: dict, pipe: Any, started: datetime, ended: datetime) -> None:
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        job._result = result
        self.increment_successful_job_count(pipeline=pipe)
        self.increment_total_working_time(ended - started, pipe)
        if result_ttl != 0:
            job._handle_success(result_ttl, pipeline=pipe, worker_name=self.name, execution_id=self.execution.id if self.execution else None,
                                execution_started_at=self.execution.created_at if self.execution else None, execution_ended_at=ended)
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        if self.execution is not None:
            self.cleanup_execution(job, pipeline=pipe)

    def _write_failure(self, job: Any, failure: JobFailure, pipe: Any, started: datetime, ended: datetime) -> None:
        # Bad input stays bad: no retry (rq's retries are for jobs whose worker died).
        job.retries_left = 0
        job.meta[ERROR_META_KEY] = failure.to_error().model_dump(mode="json")
        pipe.hset(job.key, mapping={"meta": self.serializer.dumps(job.meta), "ended_at": utcformat(ended), "retries_left": 0})
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        exc_string = f"producer.jobs.JobFailure: [{failure.code.value}] {failure.message}"
        job._handle_failure(exc_string, pipe, worker_name=self.name, execution_id=self.execution.id if self.execution else None,
                            execution_started_at=self.execution.created_at if self.execution else None, execution_ended_at=ended)
        self.increment_failed_job_count(pipe)
        self.increment_total_working_time(ended - started, pipe)
        if self.execution is not None:
            self.cleanup_execution(job, pipeline=pipe)
        log.info("job_failed", job_id=job.id, code=failure.code.value, error=failure.message)

    # --- the loop ---------------------------------------------------------------------------------
    def work(self, burst: bool = False, logging_level: str | None = "WARNING", **_: Any) -> bool:  # type: ignore[override]
        """Run until stopped (or, with ``burst``, until the queue is empty). Returns whether any job ran."""
        self.bootstrap(logging_level or "WARNING")
        self._install_signal_handlers()
        self._heartbeat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        pending: Future | None = None
        worked = False
        backoff = 0.5
        try:
            while not self._stop.is_set():
                try:
                    if self.should_run_maintenance_tasks:
                        with self._rq_lock:
                            self.execution = None
                            self.run_maintenance_tasks()
                    if pending is None:
                        self.set_state(WorkerStatus.IDLE)
                        self.heartbeat()
                    # While a batch is on the model, gather the next one until the model is free.
                    busy = (lambda p=pending: not p.done()) if pending is not None else (lambda: False)
                    batch = self.take_batch(0 if burst or pending is not None else 1.0, busy)
                    backoff = 0.5
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.error("redis_unreachable", during="take_batch", error=str(exc), retry_in_s=backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                if batch.items:
                    self._redis_retry("register_batch", lambda b=batch: self.register_batch(b))
                    self.start_preprocessing(batch)
                if pending is not None:
                    pending.result()
                    pending = None
                if batch.items:
                    worked = True
                    pending = self._infer.submit(self.run_batch, batch)
                elif burst:
                    break
            if pending is not None:
                pending.result()
        finally:
            self._heartbeat_stop.set()
            beat.join(timeout=5)
            self._pool.shutdown(wait=True)
            self._infer.shutdown(wait=True)
            self.teardown()
        return worked

