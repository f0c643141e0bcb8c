"""The micro-batching rq worker: takes many jobs at once, packs their images into engine batches, completes
each job through rq's data structures (status, result stream, registries), and loses nothing when it dies.

rq runs one job per worker and has no multi-pop (rq issue #928). This worker subclasses rq's ``SimpleWorker``
for registration, ``rq info`` and ``rq suspend``, replaces its loop and delegates each step to a part:

1. take: block for a first id with rq's crash-safe pop (BLMOVE into the intermediate list), then more without
   blocking for up to ``batch_timeout_ms`` (and for as long as the model is busy) until ``max_batch_size``
   images are waiting; read every hash in one round trip, defensively (:mod:`worker.batching.reading`): a job that
   cannot be read or run fails alone, at once;
2. register the runnable ones in one script (status started, started-registry entries, out of the intermediate
   list), each only while this worker's pop of it is still in the intermediate list; their images go to the
   preprocessing pool (:mod:`worker.batching.taking`, :mod:`worker.batching.reading`);
3. pack waiting images, from any jobs, into engine batches of at most ``max_batch_size``: a 256-image job spans
   several engine calls, small jobs share one; the next batch is gathered while the model runs (the policy:
   :mod:`worker.batching.scheduler`; the engine calls: :mod:`worker.batching.executing`);
4. a job whose last image is embedded is complete: one Lua call per engine batch writes every finished job's
   outcome atomically (:mod:`worker.batching.completion`, through :mod:`worker.batching.rqfence`).

A heartbeat thread keeps the liveness entries of jobs in hand fresh (``execution_ttl_s``). When a worker dies, its
entries expire and a live worker's maintenance (:mod:`worker.batching.maintenance`) re-queues those jobs (with their
retries) or fails them ``worker_died``; an entry must be seen expired twice, two heartbeats apart, after the
recovering worker's own last failed heartbeat, so a Redis stall or a full Redis never makes a live worker's jobs
look dead. Delivery is at-least-once; each job's outcome is written at most once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any

import redis
import structlog
from rq import Queue
from rq.suspension import is_suspended
from rq.worker import SimpleWorker, WorkerStatus

from worker.batching.completion import Completer, WorkerIdentity
from worker.batching.executing import Executor, Item
from worker.batching.inhand import InHand
from worker.batching.maintenance import Heartbeat, Maintainer
from worker.batching.retry import RedisRetry, transient
from worker.batching.rqfence import Fence
from worker.batching.scheduler import BatchPolicy, Scheduler
from worker.batching.taking import Taker
from worker.inference.prepool import start_preprocessors
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime
from worker.settings import WorkerSettings

log = structlog.get_logger("arcface.batcher")


class BatchWorker(SimpleWorker):
    """An rq worker (one queue) that executes ArcFace jobs in micro-batches. Never forks."""

    def __init__(
        self,
        queue: Queue,
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
        max_batch_size = settings.max_batch_size if isinstance(settings.max_batch_size, int) else 32  # auto: cli sets
        self.batch_scheduler: Scheduler[Item] = Scheduler(
            BatchPolicy(max_batch_size, settings.batch_timeout_ms / 1000.0)
        )
        self.fence = Fence(queue.connection, queue.name)
        self.in_hand = InHand()
        self.retry = RedisRetry(log)
        self.stop_requested = threading.Event()
        identity = WorkerIdentity(self.name, self.key)
        self.completer = Completer(self.fence, queue, runtime, settings, metrics, identity, self.in_hand, self.retry)
        self.executor = Executor(runtime, settings, metrics, self.batch_scheduler, self.completer)
        self.taker = Taker(
            self.fence,
            queue,
            runtime,
            settings,
            self.batch_scheduler,
            self.in_hand,
            self.completer,
            self.executor,
            self.retry,
            identity,
            lambda pipe: self.set_state(WorkerStatus.BUSY, pipeline=pipe),
            self.stop_requested,
        )
        self.beats = Heartbeat(self.fence, settings, self.in_hand, self, lambda: self.executor.procs)
        self.maintainer = Maintainer(self.fence, queue, settings, identity, self.in_hand, self.completer, self.beats)
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._signals = 0

    @property
    def batches_done(self) -> int:
        """Engine batches run so far."""
        return self.executor.batches_done

    @property
    def on_reregister(self) -> Callable[[], None] | None:
        """Called after the worker registered itself again (Redis lost it): republish what Redis lost."""
        return self.beats.on_reregister

    @on_reregister.setter
    def on_reregister(self, callback: Callable[[], None] | None) -> None:
        self.beats.on_reregister = callback

    # --- signals --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("warm_shutdown", signal=signal.Signals(signum).name, in_flight=len(self.in_hand))
            self.stop_requested.set()
        else:
            # Cold shutdown: exit at once. Jobs in hand stay in the started registry and are re-queued by
            # a live worker once their entries expire.
            log.warning("cold_shutdown", signal=signal.Signals(signum).name, in_flight=len(self.in_hand))
            os._exit(128 + signum)

    # --- the loop ---------------------------------------------------------------------------------
    def work(self, burst: bool = False, logging_level: str | None = "WARNING", **_: Any) -> bool:  # type: ignore[override]
        """Run until stopped (or, with ``burst``, until the queue is empty). Returns whether any job ran."""
        self.bootstrap(logging_level or "WARNING")
        self.install_signal_handlers()
        self.beats.start()
        pending: Future[None] | None = None
        worked = False
        backoff = 0.5
        try:
            self.executor.procs = start_preprocessors(
                self.settings, self.runtime.engine.model.input_size, self.batch_scheduler.policy.max_batch_size
            )
            while True:
                if pending is not None and pending.done():
                    pending.result()
                    pending = None
                if self.stop_requested.is_set() and not len(self.batch_scheduler):
                    break
                try:
                    took = self._cycle(burst, pending)
                    backoff = 0.5
                except Exception as exc:
                    if not transient(exc):
                        log.exception("loop_error")  # never let one iteration's surprise stop the worker
                    else:
                        self.retry.refused()
                        log.error("redis_unreachable", during="take", error=str(exc)[:300], retry_in_s=backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                worked = worked or took
                if len(self.batch_scheduler):
                    if pending is not None:
                        pending.result()
                    pending = self._infer.submit(self.executor.run_batch, self.batch_scheduler.next_batch())
                elif pending is None and burst and not took:
                    break
            if pending is not None:
                pending.result()
        finally:
            self._shut_down()
        return worked

    def _shut_down(self) -> None:
        self.beats.stop()
        self._infer.shutdown(wait=True)
        self.executor.close()
        try:
            self.teardown()  # type: ignore[no-untyped-call]  # rq's, untyped
        except redis.RedisError as exc:
            log.warning("teardown_failed", error=str(exc)[:300])

    def unsubscribe(self) -> None:
        """rq's unsubscribe from its command channel, without its wait of up to a minute: rq reads the channel on
        a redis-py thread blocked in ``get_message(timeout=60)``, and redis-py's ``PubSubWorkerThread.stop()`` joins
        that thread with no timeout. The thread is told to stop first, then the UNSUBSCRIBE reply wakes it, and it
        closes the channel itself; a SIGTERM'd worker exits in about a second, not 60."""
        thread = self.pubsub_thread
        if thread is None or self.pubsub is None:
            return
        try:
            thread.stop(timeout=0)  # clears the running flag; redis-py before 6 takes no timeout and never waits
        except TypeError:
            thread.stop()
        try:
            self.pubsub.unsubscribe()
        except redis.RedisError as exc:
            log.warning("unsubscribe_failed", error=str(exc)[:300])
        thread.join(timeout=1)

    def _cycle(self, burst: bool, pending: Future[None] | None) -> bool:
        """Maintenance, then take jobs (gathering while the model runs ``pending``). Returns whether any job came."""
        self.maintainer.maintain()
        if self.stop_requested.is_set():
            return False
        suspended = is_suspended(self.connection, self)  # a real round trip: Redis answers again
        self.retry.answered("take")
        if suspended:
            if not len(self.batch_scheduler) and pending is None:
                self.set_state(WorkerStatus.SUSPENDED)
                time.sleep(1.0 if not burst else 0)
            return False
        if pending is None and not len(self.batch_scheduler):
            self.set_state(WorkerStatus.IDLE)
            self.heartbeat()

        def busy() -> bool:
            return pending is not None and not pending.done()

        block = self.batch_scheduler.first_block_s(burst, model_running=pending is not None)
        return self.taker.take(block, busy) > 0
