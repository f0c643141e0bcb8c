"""The micro-batching rq worker: takes many jobs at once, packs their images into engine batches, completes
each job through rq's data structures (status, result stream, registries), and loses nothing when it dies.

rq runs one job per worker and has no multi-pop (rq issue #928). This worker subclasses rq's ``SimpleWorker``
for registration, ``rq info`` and ``rq suspend``, and replaces its loop:

1. take: block for a first id with rq's crash-safe pop (BLMOVE into the intermediate list), then more without
   blocking for up to ``batch_timeout_ms`` (and for as long as the model is busy) until ``max_batch_size``
   images are waiting; read every hash in one round trip, defensively (:mod:`worker.taking`): a job that
   cannot be read or run fails alone, at once;
2. register the runnable ones in one MULTI (status started, started-registry entries, out of the intermediate
   list); their images go to the preprocessing pool;
3. pack waiting images, from any jobs, into engine batches of at most ``max_batch_size``: a 256-image job spans
   several engine calls, small jobs share one; the next batch is gathered while the model runs;
4. a job whose last image is embedded is complete: one Lua call per engine batch writes every finished job's
   outcome atomically (:mod:`worker.rqfence`).

A heartbeat thread keeps the started entries of jobs in hand alive (``execution_ttl_s``). When a worker dies,
its entries expire and a live worker's maintenance re-queues those jobs (with their retries) or fails them
``worker_died``; an entry must be seen expired twice, a heartbeat apart, so a Redis stall never makes a live
worker's jobs look dead. Delivery is at-least-once; each job's outcome is written at most once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

import numpy as np
import redis
import structlog
from rq.suspension import is_suspended
from rq.worker import SimpleWorker, WorkerStatus

from producer.jobs import ErrorCode, JobFailure, Timing
from worker.metrics import WorkerMetrics
from worker.rqfence import (
    Fence, Outcome, exc_string, failure_entry, failure_meta, split_member, success_entry, timestamp, valid_job_id,
)
from worker.runtime import PreparedImage, Runtime
from worker.settings import WorkerSettings
from worker.taking import Taken, classify, decode_id, pop_first, pop_many, read_hashes, utcnow

log = structlog.get_logger("arcface.batcher")
_BUSY_POLL_S = 0.05  # BLMOVE timeout while the model is busy: wakes at once when a job arrives
_UNREADABLE_DATA = b'["<unreadable job>",null,[],{}]'
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError)


def _transient(exc: BaseException) -> bool:
    """Redis errors that pass by themselves: unreachable, loading, read-only replica, or full (OOM)."""
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(("OOM", "LOADING", "READONLY", "MISCONF", "BUSY"))


class Item:
    """One image of a job on its way through preprocessing and the engine."""

    __slots__ = ("taken", "index", "future")

    def __init__(self, taken: Taken, index: int, future: Future) -> None:
        self.taken, self.index, self.future = taken, index, future


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
        self.metrics = metrics
        self.max_batch_size = settings.max_batch_size
        self.batch_timeout_s = settings.batch_timeout_ms / 1000.0
        self.fence = Fence(queue.connection, queue.name)
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._lock = threading.Lock()  # guards _jobs against the heartbeat thread
        self._jobs: dict[str, Taken] = {}  # registered, not yet completed
        self._bytes_in_hand = 0  # payload bytes of _jobs: taking pauses at 2 x max_job_bytes
        self._waiting: deque[Item] = deque()  # images not yet in an engine batch
        self._stop = threading.Event()
        self._signals = 0
        self._suspects: dict[str, tuple[float, float]] = {}  # started member -> (score, first seen, monotonic)
        self._intermediate_seen: dict[str, float] = {}
        self._last_maintenance = 0.0
        self._last_schedule = 0.0
        self._outage = False
        self.batches_done = 0

    # --- Redis outages -----------------------------------------------------------------------------
    def _redis_retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` until Redis takes it: backoff from 0.5 s to 30 s, one log line per attempt. Results in
        hand are never dropped because Redis restarted, stalled or filled up; the worker waits for it."""
        backoff = 0.5
        while True:
            try:
                out = fn()
            except Exception as exc:
                if not _transient(exc):
                    raise
                self._outage = True
                log.error("redis_unreachable", during=what, error=str(exc)[:300], retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if self._outage:
                self._outage = False
                log.info("redis_reachable_again", during=what)
            return out

    # --- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("warm_shutdown", signal=signal.Signals(signum).name, in_flight=len(self._jobs))
            self._stop.set()
            self._stop_requested = True
        else:
            # Cold shutdown: exit at once. Jobs in hand stay in the started registry and are re-queued by
            # a live worker once their entries expire.
            log.warning("cold_shutdown", signal=signal.Signals(signum).name, in_flight=len(self._jobs))
            os._exit(128 + signum)

    # --- taking -----------------------------------------------------------------------------------
    def _waiting_images(self) -> int:
        return len(self._waiting)

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
                first = pop_first(self.connection, keys, block_s) if block_s > 0 else next(iter(pop_many(self.connection, keys, 1)), None)
            if first is None:
                return 0
            taken += self._admit([first])
        deadline = time.monotonic() + self.batch_timeout_s
        # While the model runs, take up to two batches ahead so preprocessing never starves (multi-image jobs).
        while (self._waiting_images() < self.max_batch_size * (2 if model_busy() else 1) and not self._stop.is_set()
               and self._bytes_in_hand < 2 * self.settings.max_job_bytes):
            ids = pop_many(self.connection, keys, max(1, self.max_batch_size - self._waiting_images()))
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
        hashes = dict(zip(ids, read_hashes(self.connection, ids))) if ids else {}
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
            self._complete([self._failure_outcome(t, t.failure, guard="none") for t in failed], failed)  # type: ignore[arg-type]
        if runnable:
            self._register(runnable, now)
        return len(runnable)

    def _register(self, jobs: list[Taken], now: Any) -> None:
        stamp = timestamp(now)
        ttl = self.settings.execution_ttl_s
        expiry = time.time() + ttl
        members: dict[str, float] = {}

        def write() -> None:
            with self.connection.pipeline() as pipe:
                for t in jobs:
                    fields = {"status": "started", "started_at": stamp, "last_heartbeat": stamp, "worker_name": self.name}
                    if t.job.origin != self.queue.name:
                        fields["origin"] = self.queue.name  # a producer that wrote no origin (wire-format default)
                    if t.job.enqueued_at is None:
                        fields["enqueued_at"] = stamp
                    self.fence.register(pipe, t.id, t.member, fields)
                self.fence.add_started(pipe, members)
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                pipe.execute()

        for t in jobs:
            t.execution_id = uuid.uuid4().hex
            t.member = f"{t.id}:{t.execution_id}"
            t.started_at = now
            members[t.member] = expiry
        with self._lock:
            for t in jobs:
                self._jobs[t.id] = t
                self._bytes_in_hand += t.nbytes
        self._redis_retry("register", write)
        instant = [t for t in jobs if t.n_images == 0]  # nothing to embed (forget): complete now
        if instant:
            self._complete([self._finish(t) for t in instant], instant)
        for t in jobs:
            if t.n_images == 0:
                continue
            assert t.request is not None
            t.embeddings = None
            t.faces = [None] * t.n_images
            refs = self._images(t)
            all_faces = getattr(t.request, "faces", "one") == "all"
            for i, ref in enumerate(refs):
                self._waiting.append(Item(t, i, self._pool.submit(self.runtime.prepare_image, ref, t.detect, all_faces)))

    @staticmethod
    def _images(t: Taken) -> list[Any]:
        from producer.jobs import request_images

        assert t.request is not None
        return request_images(t.request)

    # --- heartbeats -------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.heartbeat_batch()
            except redis.RedisError as exc:
                log.warning("heartbeat_failed", error=str(exc)[:300])

    def heartbeat_batch(self) -> None:
        """Refresh the worker and every job in hand (ZADD XX: a completed job's entry is never re-created).
        After a FLUSHALL or a Redis restarted empty the worker registers itself again."""
        with self._lock:
            members = {t.member: time.time() + self.settings.execution_ttl_s for t in self._jobs.values()}
            with self.connection.pipeline() as pipe:
                pipe.exists(self.key)
                self.heartbeat(pipeline=pipe)
                self.fence.add_started(pipe, members, only_existing=True)
                alive = pipe.execute()[0]
        if not alive:
            log.warning("worker_reregistered", worker=self.name, reason="worker key missing (Redis flushed or restarted empty)")
            self.connection.delete(self.key)
            self.register_birth()

    # --- executing --------------------------------------------------------------------------------
    def next_engine_batch(self) -> list[Item]:
        """Up to ``max_batch_size`` waiting images, oldest first."""
        out: list[Item] = []
        while self._waiting and len(out) < self.max_batch_size:
            out.append(self._waiting.popleft())
        return out

    def run_batch(self, items: list[Item]) -> None:
        """Wait for the images' preprocessing, run detection and the engine once, complete finished jobs."""
        t0 = time.perf_counter()
        images: list[PreparedImage] = []
        for item in items:
            images.append(self._prepared(item))
        alive = [k for k, im in enumerate(images) if im is not None and (im.input is not None or im.raw is not None)]
        detect_ms = 0.0
        if any(images[k].raw is not None for k in alive):
            try:
                found, detect_ms = self.runtime.detect_images([images[k] for k in alive])
            except Exception as exc:
                log.exception("detection_crashed", images=len(alive))
                found = {j: JobFailure(ErrorCode.INTERNAL_ERROR, f"detection failed: {type(exc).__name__}: {exc}") for j in range(len(alive))}
            for j, failure in found.items():
                items[alive[j]].taken.item_failures[items[alive[j]].index] = failure
            alive = [k for j, k in enumerate(alive) if j not in found]
        t1 = time.perf_counter()
        inference_ms = 0.0
        if alive:
            extra = [(k, x, f) for k in alive for x, f in (images[k].extra or [])]
            try:
                emb, inference_ms = self.runtime.embed_inputs([images[k].input for k in alive] + [x for _, x, _ in extra])  # type: ignore[misc]
                for k, row in zip(alive, emb):
                    self._store(items[k], row, images[k])
                for (k, _, f), row in zip(extra, emb[len(alive):]):
                    items[k].taken.extra_faces.append((f, row))
            except Exception as exc:
                log.exception("inference_crashed", images=len(alive))
                for k in alive:
                    items[k].taken.item_failures[items[k].index] = JobFailure(ErrorCode.INTERNAL_ERROR, f"inference failed: {type(exc).__name__}: {exc}")
        done: list[Taken] = []
        for item in items:
            t = item.taken
            t.remaining -= 1
            t.batch_size = len(items)
            t.inference_ms += inference_ms / max(1, len(items))
            t.detect_ms += detect_ms / max(1, len(items))
            if t.remaining == 0:
                done.append(t)
        t2 = time.perf_counter()
        outcomes = [self._finish(t) for t in done]
        self._complete(outcomes, done, working_s=t2 - t0)
        t3 = time.perf_counter()
        self.batches_done += 1
        failed = sum(1 for o in outcomes if o.kind == "failed")
        if self.metrics is not None:
            m = self.metrics
            m.batch_images.observe(len(items))
            m.images.inc(len(alive))
            m.preprocess.observe(max(0.0, t1 - t0 - detect_ms / 1000.0))
            if detect_ms:
                m.detect.observe(detect_ms / 1000.0)
            m.inference.observe(inference_ms / 1000.0)
            m.write.observe(t3 - t2)
        log.info("batch", images=len(items), jobs=len(done), failed=failed,
                 preprocess_ms=round((t1 - t0) * 1000.0 - detect_ms, 1), detect_ms=round(detect_ms, 1),
                 inference_ms=round(inference_ms, 1), write_ms=round((t3 - t2) * 1000.0, 1),
                 queue_wait_ms=round(max((t.queued_ms for t in done), default=0.0), 1))
        log.debug("batch_jobs", job_ids=[t.id for t in done])

    def _prepared(self, item: Item) -> PreparedImage:
        t = item.taken
        try:
            im = item.future.result(timeout=self.settings.decode_timeout_s)
            t.preprocess_ms += im.ms
            return im
        except JobFailure as failure:
            t.item_failures[item.index] = failure
        except FutureTimeout:
            t.item_failures[item.index] = JobFailure(
                ErrorCode.IMAGE_DECODE_ERROR, f"image took over {self.settings.decode_timeout_s:g}s to decode (ARCFACE_DECODE_TIMEOUT_S)")
        except Exception as exc:  # a bug, not bad input: fail this image, keep the worker
            log.exception("prepare_crashed", job_id=t.id)
            t.item_failures[item.index] = JobFailure(ErrorCode.INTERNAL_ERROR, f"preprocessing crashed: {type(exc).__name__}: {exc}")
        return PreparedImage()

    def _store(self, item: Item, row: np.ndarray, image: PreparedImage) -> None:
        t = item.taken
        if t.embeddings is None:
            t.embeddings = np.zeros((t.n_images, row.shape[0]), np.float32)
        t.embeddings[item.index] = row
        t.faces[item.index] = image.face

    def _finish(self, t: Taken) -> Outcome:
        """The job's outcome once all its images went through: its result, or its failure."""
        assert t.request is not None
        timing = Timing(queued_ms=t.queued_ms, batch_size=t.batch_size, preprocess_ms=t.preprocess_ms, detect_ms=t.detect_ms,
                        inference_ms=t.inference_ms)
        dim = self.runtime.engine.model.embedding_dim
        embeddings = t.embeddings if t.embeddings is not None else np.zeros((t.n_images, dim), np.float32)
        try:
            result = self.runtime.finish(t.request, embeddings, t.item_failures, t.faces, timing, t.extra_faces)
        except JobFailure as failure:
            return self._failure_outcome(t, failure)
        except Exception as exc:
            log.exception("finish_crashed", job_id=t.id)
            return self._failure_outcome(t, JobFailure(ErrorCode.INTERNAL_ERROR, f"building the result failed: {type(exc).__name__}: {exc}"))
        ended = utcnow()
        ttl = t.job.get_result_ttl(self.settings.result_ttl)
        fields = {"status": "finished", "ended_at": timestamp(ended)}
        return Outcome("own", "finished", t.id, t.member, ttl if ttl is not None else -1, fields,
                       success_entry(result, self.name, t.execution_id, t.started_at or ended, ended))

    def _failure_outcome(self, t: Taken, failure: JobFailure, guard: str = "own") -> Outcome:
        ended = utcnow()
        fields = {"status": "failed", "ended_at": timestamp(ended), "retries_left": "0", "exc_info": exc_string(failure)}
        if guard == "none":
            fields["worker_name"] = self.name
        ttl = self.settings.failure_ttl
        if t.job is not None:
            ttl = t.job.failure_ttl if t.job.failure_ttl is not None else ttl
            fields["meta"] = failure_meta(t.job.meta, failure).decode()
        else:
            fields["meta"] = failure_meta(None, failure).decode()
        if t.rewrite:
            # rq cannot read this hash: replace it with a failed job every rq tool can read.
            stamp = timestamp(ended)
            fields.update({"__replace__": "1", "data": _UNREADABLE_DATA.decode(), "origin": self.queue.name, "created_at": stamp,
                           "enqueued_at": stamp, "description": "unreadable job, replaced by the arcface worker",
                           "failure_ttl": str(ttl)})
        lrem = self.fence.keys.intermediate if guard == "none" else ""
        entry = failure_entry(exc_string(failure), self.name, t.execution_id or None, t.started_at, ended)
        log.info("job_failed", job_id=t.id[:200], code=failure.code.value, error=failure.message[:500])
        if not t.valid_id:
            # no registry: rq's registry code cannot parse such ids. The hash and result stream still say why.
            return Outcome("none", "invalid", t.id, "", ttl, fields, entry, "", lrem)
        return Outcome(guard, "failed", t.id, t.member, ttl, fields, entry, "", lrem)

    def _complete(self, outcomes: list[Outcome], jobs: list[Taken], working_s: float = 0.0) -> None:
        """Write outcomes in one script call (per job on a non-transient error, so one bad outcome cannot
        block the others); enqueue rq dependents of jobs that have them."""
        if not outcomes:
            return
        if self.metrics is not None:
            self._count(outcomes, jobs)
        try:
            replies = self._redis_retry("complete", lambda: self._apply(outcomes, working_s))
        except Exception:
            log.exception("complete_failed", jobs=len(outcomes))
            replies = []
            for o in outcomes:
                try:
                    replies.extend(self._redis_retry("complete", lambda o=o: self._apply([o])))
                except Exception as exc:
                    log.error("outcome_not_written", job_id=o.job_id[:200], error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    replies.append(0)
        with self._lock:
            for t in jobs:
                if self._jobs.pop(t.id, None) is not None:
                    self._bytes_in_hand -= t.nbytes
        for t, o, reply in zip(jobs, outcomes, replies):
            if reply == 0 and o.guard == "own":
                log.warning("outcome_skipped", job_id=t.id, reason="started entry gone: recovered by another worker or Redis was flushed")
            if reply == 2 and t.job is not None:
                try:
                    self._enqueue_dependents(t)
                except Exception as exc:  # a hand-written dependents entry must not stop the worker
                    log.error("dependents_failed", job_id=t.id, error=f"{type(exc).__name__}: {str(exc)[:300]}")

    def _enqueue_dependents(self, t: Taken) -> None:
        """rq's ``enqueue_dependents``, for deferred jobs only: a hand-written dependents set may name a finished
        or failed job (rq would queue it again and it would run twice), a missing job, an id rq refuses or bytes
        that are not UTF-8; those members are removed first."""
        key = t.job.dependents_key
        members = [(m, decode_id(m)) for m in self.connection.smembers(key)]
        named = [jid for _, jid in members if jid is not None and valid_job_id(jid)]
        with self.connection.pipeline(transaction=False) as pipe:
            for jid in named:
                pipe.hget(f"rq:job:{jid}", "status")
            deferred = {jid for jid, status in zip(named, pipe.execute()) if status == b"deferred"}
        stale = [m for m, jid in members if jid not in deferred]
        if stale:
            self.connection.srem(key, *stale)
            log.warning("dependents_dropped", job_id=t.id, count=len(stale), reason="not deferred jobs: finished, failed, missing or bad ids")
        if deferred:
            self.queue.enqueue_dependents(t.job)

    def _apply(self, outcomes: list[Outcome], working_s: float = 0.0) -> list[int]:
        replies = self.fence.apply(outcomes, time.time(), self.key, self.name)
        finished = sum(1 for o in outcomes if o.kind == "finished")
        with self.connection.pipeline(transaction=False) as pipe:
            if finished:
                pipe.hincrby(self.key, "successful_job_count", finished)
            if len(outcomes) > finished:
                pipe.hincrby(self.key, "failed_job_count", len(outcomes) - finished)
            if working_s:  # wall time of the batch, once (not the sum over its jobs)
                pipe.hincrbyfloat(self.key, "total_working_time", round(working_s, 6))
            pipe.execute()
        return replies

    def _count(self, outcomes: list[Outcome], jobs: list[Taken]) -> None:
        m = self.metrics
        assert m is not None
        for t, o in zip(jobs, outcomes):
            kind = t.request.kind if t.request is not None else "invalid"
            if o.kind == "finished":
                m.jobs.labels(kind, "finished", "").inc()
                m.queue_wait.observe(t.queued_ms / 1000.0)
                continue
            failure = t.failure or next(iter(t.item_failures.values()), None)
            m.jobs.labels(kind, "failed", failure.code.value if failure else "internal_error").inc()
            m.queue_wait.observe(t.queued_ms / 1000.0)

    # --- maintenance: recovery, scheduled jobs ----------------------------------------------------
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
            from rq.worker_registration import clean_worker_registry

            clean_worker_registry(self.queue)
        except redis.RedisError as exc:
            log.warning("worker_registry_cleanup_failed", error=str(exc)[:300])

    def recover_started(self) -> None:
        """Jobs whose started entry expired, seen expired on two passes a heartbeat apart (a live worker would
        have refreshed it in between): re-queued while they have retries, else failed ``worker_died``."""
        now, mono = time.time(), time.monotonic()
        with self._lock:
            mine = {t.member for t in self._jobs.values()}
        expired = [(m, s) for m, s in self.fence.expired_started(now) if m not in mine]
        seen = {m for m, _ in expired}
        self._suspects = {m: v for m, v in self._suspects.items() if m in seen}
        ready: list[str] = []
        for member, score in expired:
            prev = self._suspects.get(member)
            if prev is None or prev[0] != score:
                self._suspects[member] = (score, mono)
            elif mono - prev[1] >= self.settings.heartbeat_interval_s * 2:
                ready.append(member)
        for member in ready:
            self._suspects.pop(member, None)
            self._recover(member)

    def _recover(self, member: str) -> None:
        job_id = split_member(member)

        fields = self.connection.hgetall(f"rq:job:{job_id}") if valid_job_id(job_id) else {}
        t = classify(job_id, fields, self.connection, self.settings.max_job_bytes, utcnow(), recovering=True) if fields else None
        if t is None or t.job is None:
            # gone, or unreadable: just drop the entry
            self.connection.zrem(self.fence.keys.started, member)
            return
        job = t.job
        if job.retries_left and job.retries_left > 0:
            interval = job.get_retry_interval()
            fields_out = {"retries_left": str(job.retries_left - 1), "status": "scheduled" if interval else "queued"}
            if interval:
                o = Outcome("expired", "schedule", job_id, member, 0, fields_out, None, str(int(time.time() + interval)))
            else:
                fields_out["enqueued_at"] = timestamp(utcnow())
                o = Outcome("expired", "requeue", job_id, member, 0, fields_out, None, self.fence.keys.queue)
            applied = self.fence.apply([o], time.time(), self.key, self.name)
            if applied and applied[0]:
                log.warning("job_requeued", job_id=job_id, reason="worker died", retries_left=job.retries_left - 1)
            return
        t.member, t.execution_id = member, member.rsplit(":", 1)[-1]
        failure = JobFailure(ErrorCode.WORKER_DIED, "the worker running this job died (its heartbeat expired) and no retries are left")
        o = self._failure_outcome(t, failure, guard="expired")
        self.fence.apply([o], time.time(), self.key, self.name)

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
        outcomes = [Outcome("none", "requeue", jid.decode("latin-1"), "", 0, {"status": "queued", "enqueued_at": stamp}, None, k.queue)
                    for jid in due]
        with self.connection.pipeline() as pipe:
            for jid in due:
                pipe.zrem(k.scheduled, jid)
            removed = pipe.execute()
        mine = [o for o, r in zip(outcomes, removed) if r]
        self.fence.apply(mine, time.time(), self.key, self.name)
        log.info("scheduled_enqueued", jobs=len(mine))

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
                    if not _transient(exc):
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
            self._heartbeat_stop.set()
            beat.join(timeout=5)
            self._pool.shutdown(wait=True)
            self._infer.shutdown(wait=True)
            try:
                self.teardown()
            except redis.RedisError as exc:
                log.warning("teardown_failed", error=str(exc)[:300])
        return worked

    def _cycle(self, burst: bool, pending: Future | None) -> bool:
        """Maintenance, then take jobs (gathering while the model runs ``pending``). Returns whether any job came."""
        self.maintain()
        if self._outage:
            self._outage = False
            log.info("redis_reachable_again", during="take")
        if self._stop.is_set():
            return False
        if is_suspended(self.connection, self):
            if not self._waiting and pending is None:
                self.set_state(WorkerStatus.SUSPENDED)
                time.sleep(1.0 if not burst else 0)
            return False
        if pending is None and not self._waiting:
            self.set_state(WorkerStatus.IDLE)
            self.heartbeat()
        busy = (lambda p=pending: not p.done()) if pending is not None else (lambda: False)
        block = 0.0 if burst or pending is not None or self._waiting else 1.0
        return self.take(block, busy) > 0
