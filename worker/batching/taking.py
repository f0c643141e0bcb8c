"""Taking: pop job ids with rq's crash-safe pop (BLMOVE into the intermediate list, then pipelined LMOVEs), read
and sort them (:mod:`worker.batching.reading`), fail at once what cannot run, register the rest through the fence
and hand their images to preprocessing. How many to take and how long to wait is the scheduler's to say.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from rq import Queue

from producer.contract.codes import JobFailure
from worker.batching.completion import Completer, WorkerIdentity
from worker.batching.executing import Executor, Item
from worker.batching.inhand import InHand
from worker.batching.reading import Taken, classify, decode_id, pop_first, pop_many, utcnow
from worker.batching.retry import RedisRetry
from worker.batching.rqfence import Fence, started_fields, timestamp
from worker.batching.scheduler import Scheduler
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.runtime import Runtime


log = structlog.get_logger("arcface.batcher")

# Marks the worker busy in rq's worker hash, on the registration's pipeline (rq's ``set_state``).
MarkBusy = Callable[[Any], None]


class Taker:
    """Takes jobs from one queue into the worker's hand."""

    def __init__(
        self,
        fence: Fence,
        queue: Queue,
        runtime: Runtime,
        settings: WorkerSettings,
        scheduler: Scheduler[Item],
        in_hand: InHand,
        completer: Completer,
        executor: Executor,
        retry: RedisRetry,
        identity: WorkerIdentity,
        mark_busy: MarkBusy,
        stop: threading.Event,
    ) -> None:
        self.fence = fence
        self.connection = fence.connection
        self.queue = queue
        self.runtime = runtime
        self.settings = settings
        self.scheduler = scheduler
        self.in_hand = in_hand
        self.completer = completer
        self.executor = executor
        self.retry = retry
        self.identity = identity
        self.mark_busy = mark_busy
        self.stop = stop

    def take(self, block_s: float, model_busy: Callable[[], bool] = lambda: False) -> int:
        """Take jobs until the scheduler has room for no more: block up to ``block_s`` for a first one when none
        wait, then fill until the scheduler's fill deadline, and for as long as the model is busy. Returns the jobs
        registered."""
        keys = self.fence.keys
        poll_s = self.scheduler.policy.busy_poll_s
        taken = 0
        if not len(self.scheduler):
            first = None
            while first is None and model_busy() and not self.stop.is_set():
                first = pop_first(self.connection, keys, poll_s)
            if first is None and not model_busy():
                first = (
                    pop_first(self.connection, keys, block_s)
                    if block_s > 0
                    else next(iter(pop_many(self.connection, keys, 1)), None)
                )
            if first is None:
                return 0
            taken += self._admit([first])
        deadline = self.scheduler.fill_deadline()
        while (
            self.scheduler.room(model_busy())
            and not self.stop.is_set()
            and self.in_hand.nbytes < 2 * self.settings.max_job_bytes
        ):
            ids = pop_many(self.connection, keys, self.scheduler.pop_size())
            if not ids and model_busy():
                one = pop_first(self.connection, keys, poll_s)
                ids = [one] if one else []
            if ids:
                taken += self._admit(ids)
                continue
            remaining = self.scheduler.fill_wait_s(deadline)
            if remaining <= 0:
                break
            # Redis checks blocking timeouts at its own tick (BLMOVE with 5 ms waits ~15 ms), so the few-ms
            # wait for a batch to fill is short sleeps between non-blocking pops instead.
            time.sleep(min(remaining, 0.001))
        return taken

    def _admit(self, raw_ids: list[bytes]) -> int:
        """Read, sort and register popped ids; fail at once what cannot run; queue the images of the rest."""
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
            self.fence.drop_popped(drop)
            log.debug("stale_entries_dropped", count=len(drop))
        if failed:
            refused = [(t, t.failure) for t in failed if t.failure is not None]
            outcomes = [self.completer.failure_outcome(t, failure, guard="popped") for t, failure in refused]
            self.completer.complete(outcomes, [t for t, _ in refused])
        if runnable:
            self._register(runnable, now)
        return len(runnable)

    def _register(self, jobs: list[Taken], now: datetime) -> None:
        stamp = timestamp(now)
        expiry = time.time() + self.settings.execution_ttl_s
        rows: list[tuple[str, str, dict[str, str]]] = []
        for t in jobs:
            t.execution_id = uuid.uuid4().hex
            t.member = f"{t.id}:{t.execution_id}"
            t.started_at = now
            origin = self.queue.name if t.job.origin != self.queue.name else None
            fields = started_fields(stamp, self.identity.name, t.member, origin, t.job.enqueued_at is None)
            rows.append((t.id, t.member, fields))
        self.in_hand.add(jobs)

        def write() -> list[int]:
            with self.connection.pipeline() as pipe:
                self.fence.register(pipe, rows, expiry)
                self.mark_busy(pipe)
                flags: list[int] = pipe.execute()[0]
                return flags

        try:
            flags = self.retry("register", write)
        except Exception:  # not a Redis outage (those are waited out): the jobs were never ours
            self.in_hand.release(jobs)
            raise
        elsewhere = [t for t, ok in zip(jobs, flags, strict=True) if not ok]
        if elsewhere:
            self.in_hand.release(elsewhere)
            log.warning("registration_lost", job_ids=[t.id for t in elsewhere], reason="another worker has it")
            jobs = [t for t, ok in zip(jobs, flags, strict=True) if ok]
        instant = [t for t in jobs if t.n_images == 0]  # nothing to embed (forget): complete now
        if instant:
            self.completer.complete([self.completer.finish(t) for t in instant], instant)
        self.executor.preprocess(jobs)
