"""Completing jobs: a finished job's result or failure becomes an :class:`~worker.batching.rqfence.Outcome`, and the
outcomes of an engine batch are written in one atomic script (per job when one of them cannot be written), with rq's
worker counters, metrics and dependents; completed jobs leave the worker's hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import redis
import structlog
from rq import Queue

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.results import Timing
from worker.batching.inhand import InHand
from worker.batching.reading import Taken, decode_id, utcnow
from worker.batching.retry import RedisRetry
from worker.batching.rqfence import (
    Fence,
    Outcome,
    exc_string,
    failure_entry,
    failure_meta,
    job_key,
    success_entry,
    timestamp,
    valid_job_id,
)
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics
    from worker.runtime import Runtime


log = structlog.get_logger("arcface.batcher")
_UNREADABLE_DATA = b'["<unreadable job>",null,[],{}]'


@dataclass(frozen=True)
class WorkerIdentity:
    """Who writes the outcomes: the rq worker's name and its hash key (rq's worker counters live there)."""

    name: str
    key: str


class Completer:
    """Outcomes of jobs and writing them."""

    def __init__(
        self,
        fence: Fence,
        queue: Queue,
        runtime: Runtime,
        settings: WorkerSettings,
        metrics: WorkerMetrics | None,
        identity: WorkerIdentity,
        in_hand: InHand,
        retry: RedisRetry,
    ) -> None:
        self.fence = fence
        self.connection = fence.connection
        self.queue = queue
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.identity = identity
        self.in_hand = in_hand
        self.retry = retry

    def finish(self, t: Taken) -> Outcome:
        """The job's outcome once all its images went through: its result, or its failure."""
        assert t.request is not None
        timing = Timing(
            queued_ms=t.queued_ms,
            batch_size=t.batch_size,
            preprocess_ms=t.preprocess_ms,
            detect_ms=t.detect_ms,
            inference_ms=t.inference_ms,
        )
        dim = self.runtime.engine.model.embedding_dim
        embeddings = t.embeddings if t.embeddings is not None else np.zeros((t.n_images, dim), np.float32)
        try:
            result = self.runtime.finish(t.request, embeddings, t.item_failures, t.faces, timing, t.extra_faces)
        except JobFailure as failure:
            return self.failure_outcome(t, failure)
        except Exception as exc:
            log.exception("finish_crashed", job_id=t.id)
            return self.failure_outcome(
                t, JobFailure(ErrorCode.INTERNAL_ERROR, f"building the result failed: {type(exc).__name__}: {exc}")
            )
        ended = utcnow()
        ttl = t.job.get_result_ttl(self.settings.result_ttl)
        fields = {"status": "finished", "ended_at": timestamp(ended)}
        return Outcome(
            "own",
            "finished",
            t.id,
            t.member,
            ttl if ttl is not None else -1,
            fields,
            success_entry(result, self.identity.name, t.execution_id, t.started_at or ended, ended),
        )

    def failure_outcome(self, t: Taken, failure: JobFailure, guard: str = "own") -> Outcome:
        """The outcome that fails ``t`` with ``failure``; ``guard`` says when the fence may write it (``own``: the
        job runs under this worker's entry; ``popped``: it is in the intermediate list; ``expired``: recovery)."""
        ended = utcnow()
        fields = {
            "status": "failed",
            "ended_at": timestamp(ended),
            "retries_left": "0",
            "exc_info": exc_string(failure),
        }
        if guard == "popped":
            fields["worker_name"] = self.identity.name
        ttl = self.settings.failure_ttl
        if t.job is not None:
            ttl = t.job.failure_ttl if t.job.failure_ttl is not None else ttl
            fields["meta"] = failure_meta(t.job.meta, failure).decode()
        else:
            fields["meta"] = failure_meta(None, failure).decode()
        if t.rewrite:
            # rq cannot read this hash: replace it with a failed job every rq tool can read.
            stamp = timestamp(ended)
            fields.update(
                {
                    "__replace__": "1",
                    "data": _UNREADABLE_DATA.decode(),
                    "origin": self.queue.name,
                    "created_at": stamp,
                    "enqueued_at": stamp,
                    "description": "unreadable job, replaced by the arcface worker",
                    "failure_ttl": str(ttl),
                }
            )
        lrem = self.fence.keys.intermediate if guard == "popped" else ""
        entry = failure_entry(failure, self.identity.name, t.execution_id or None, t.started_at, ended)
        if guard != "expired":  # recovery logs it once the fence applied it (a stale entry is only dropped)
            log.info("job_failed", job_id=t.id[:200], code=failure.code.value, error=failure.message[:500])
        if not t.valid_id:
            # no registry: rq's registry code cannot parse such ids. The hash and result stream still say why.
            return Outcome(guard, "invalid", t.id, "", ttl, fields, entry, "", lrem)
        return Outcome(guard, "failed", t.id, t.member, ttl, fields, entry, "", lrem)

    def complete(self, outcomes: list[Outcome], jobs: list[Taken], working_s: float = 0.0) -> None:
        """Write outcomes in one script call (per job on a non-transient error, so one bad outcome cannot
        block the others); enqueue rq dependents of jobs that have them."""
        if not outcomes:
            return
        if self.metrics is not None:
            self._count(outcomes, jobs)
        try:
            replies = self.retry("complete", lambda: self._apply(outcomes, working_s))
        except Exception:
            log.exception("complete_failed", jobs=len(outcomes))
            replies = []
            for o in outcomes:
                try:
                    replies.extend(self.retry("complete", partial(self._apply, [o])))
                except Exception as exc:
                    log.error(
                        "outcome_not_written", job_id=o.job_id[:200], error=f"{type(exc).__name__}: {str(exc)[:300]}"
                    )
                    replies.append(0)
        self.in_hand.release(jobs)
        for t, o, reply in zip(jobs, outcomes, replies, strict=True):
            if reply == 0 and o.guard == "own":
                log.warning(
                    "outcome_skipped",
                    job_id=t.id,
                    reason="started entry gone: recovered by another worker or Redis was flushed",
                )
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
                pipe.hget(job_key(jid), "status")
            deferred = {jid for jid, status in zip(named, pipe.execute(), strict=True) if status == b"deferred"}
        stale = [m for m, jid in members if jid not in deferred]
        if stale:
            self.connection.srem(key, *stale)
            log.warning(
                "dependents_dropped",
                job_id=t.id,
                count=len(stale),
                reason="not deferred jobs: finished, failed, missing or bad ids",
            )
        if deferred:
            self.queue.enqueue_dependents(t.job)

    def _apply(self, outcomes: list[Outcome], working_s: float = 0.0) -> list[int]:
        replies = self.fence.apply(outcomes, time.time(), self.identity.key, self.identity.name)
        try:  # rq's worker counters: best effort, never a reason to retry outcomes already written
            self._count_in_rq(outcomes, working_s)
        except redis.RedisError as exc:
            log.warning("worker_counters_not_written", error=str(exc)[:300])
        return replies

    def _count_in_rq(self, outcomes: list[Outcome], working_s: float) -> None:
        finished = sum(1 for o in outcomes if o.kind == "finished")
        with self.connection.pipeline(transaction=False) as pipe:
            if finished:
                pipe.hincrby(self.identity.key, "successful_job_count", finished)
            if len(outcomes) > finished:
                pipe.hincrby(self.identity.key, "failed_job_count", len(outcomes) - finished)
            if working_s:  # wall time of the batch, once (not the sum over its jobs)
                pipe.hincrbyfloat(self.identity.key, "total_working_time", round(working_s, 6))
            pipe.execute()

    def _count(self, outcomes: list[Outcome], jobs: list[Taken]) -> None:
        m = self.metrics
        assert m is not None
        for t, o in zip(jobs, outcomes, strict=True):
            kind = t.request.kind if t.request is not None else "invalid"
            if o.kind == "finished":
                m.jobs.labels(kind, "finished", "").inc()
                m.queue_wait.observe(t.queued_ms / 1000.0)
                continue
            failure = t.failure or next(iter(t.item_failures.values()), None)
            m.jobs.labels(kind, "failed", failure.code.value if failure else "internal_error").inc()
            m.queue_wait.observe(t.queued_ms / 1000.0)
