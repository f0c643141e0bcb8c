"""Reading taken jobs: pop ids crash-safely, read every job hash defensively, sort what can run from what cannot.

Nothing a producer writes can make this raise: an id rq refuses, a hash field rq cannot parse, data that is
not our JSON (or a zlib bomb), a function outside the allow-list, a payload that does not validate, all
become a :class:`Taken` with a ``failure`` that the worker records on that job alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import redis

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.keys import ALLOWED_FUNCTIONS
from producer.contract.requests import AnyRequest
from producer.contract.wire import parse_request, request_images
from worker.batching.rqfence import (
    TAKEN_STATUSES,
    TOO_LARGE,
    QueueKeys,
    decode_data,
    parse_timestamp,
    restore,
    valid_job_id,
)

# Statuses in which a queue entry is stale (the job already ran, or another worker holds it): dropped, not run.


@dataclass
class Taken:
    """A job taken from the queue, from reading to completion."""

    id: str
    job: Any = None  # rq Job (SafeJob) when the hash could be read
    request: AnyRequest | None = None
    failure: JobFailure | None = None  # fails the whole job before it runs
    valid_id: bool = True
    rewrite: bool = False  # the hash cannot be read by rq: replace it with a readable failed job
    enqueued_at: datetime | None = None
    status: str = ""
    member: str = ""  # started-registry member <id>:<execution id>
    execution_id: str = ""
    started_at: datetime | None = None
    queued_ms: float = 0.0
    detect: bool = False
    nbytes: int = 0  # inflated payload size: bounds what the worker holds (ARCFACE_MAX_JOB_BYTES)
    # filled as the job's images pass through the engine
    n_images: int = 0
    remaining: int = 0
    embeddings: np.ndarray | None = None
    item_failures: dict[int, JobFailure] = field(default_factory=dict)
    faces: list[Any] = field(default_factory=list)
    extra_faces: list[tuple[Any, np.ndarray]] = field(
        default_factory=list
    )  # faces="all": the other faces and their rows
    preprocess_ms: float = 0.0
    detect_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0


def pop_first(connection: redis.Redis, keys: QueueKeys, timeout_s: float) -> bytes | None:
    """Block up to ``timeout_s`` for one id, moved atomically into the intermediate list (rq's BLMOVE pop)."""
    return connection.blmove(keys.queue, keys.intermediate, timeout_s, "LEFT", "RIGHT")  # type: ignore[arg-type, return-value]


def pop_many(connection: redis.Redis, keys: QueueKeys, n: int) -> list[bytes]:
    """Up to ``n`` ids without blocking, each moved into the intermediate list (pipelined LMOVEs)."""
    if n <= 0:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for _ in range(n):
            pipe.lmove(keys.queue, keys.intermediate, "LEFT", "RIGHT")
        return [jid for jid in pipe.execute() if jid is not None]


def decode_id(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def classify(
    job_id: str,
    fields: dict[bytes, bytes],
    connection: redis.Redis,
    max_job_bytes: int,
    now: datetime,
    recovering: bool = False,
) -> Taken | None:
    """What to do with one popped job: run it, fail it, or (``None``) drop a stale entry. ``recovering``: the
    job of a dead worker (status started), read to decide between retry and failure."""
    if not fields:
        return None  # deleted or expired while queued
    if TOO_LARGE in fields:
        taken = Taken(id=job_id, rewrite=True, valid_id=valid_job_id(job_id))
        size = fields[TOO_LARGE].decode()
        taken.failure = JobFailure(
            ErrorCode.INVALID_PAYLOAD, f"job hash holds {size} bytes, over the worker's bound (ARCFACE_MAX_JOB_BYTES)"
        )
        return taken
    status = fields.get(b"status", b"").decode("ascii", "replace")
    if status in TAKEN_STATUSES and not recovering:
        return None
    taken = Taken(id=job_id, status=status)
    taken.enqueued_at = parse_timestamp(fields.get(b"enqueued_at")) or parse_timestamp(fields.get(b"created_at"))
    if taken.enqueued_at is not None:
        taken.queued_ms = max(0.0, (now - taken.enqueued_at).total_seconds() * 1000.0)
    if not valid_job_id(job_id):
        taken.valid_id = False
        taken.failure = JobFailure(
            ErrorCode.INVALID_PAYLOAD,
            f"job id {job_id[:80]!r} is not a valid rq id (letters, digits, '_' and '-' only)",
        )
        return taken
    try:
        taken.job = restore(job_id, fields, connection, max_job_bytes)
    except Exception as exc:  # any field rq cannot read, or data over the bound
        taken.rewrite = True
        taken.failure = JobFailure(ErrorCode.INVALID_PAYLOAD, f"job hash cannot be read by rq: {str(exc)[:300]}")
        return taken
    taken.nbytes = len(taken.job.data or b"")
    taken.failure = _request(taken)
    if taken.failure is not None and b"data" not in fields:
        taken.rewrite = True  # rq's Job.fetch refuses a hash without data: leave a failed job rq can read
    return taken


def _request(taken: Taken) -> JobFailure | None:
    try:
        func_name, instance, args, kwargs = decode_data(taken.job)
    except Exception as exc:  # a pickle, garbage, wrong shape: never executed
        taken.rewrite = True  # no JSON reader (rq's tools, our client) could read it: leave a failed job they can
        return JobFailure(ErrorCode.INVALID_PAYLOAD, f"job data is not the JSON job array ({type(exc).__name__})")
    if func_name not in ALLOWED_FUNCTIONS or instance is not None:
        return JobFailure(
            ErrorCode.UNSUPPORTED_JOB,
            f"function {func_name[:200]!r} is not an ArcFace job; allowed: {sorted(ALLOWED_FUNCTIONS)}",
        )
    try:
        taken.request = parse_request(func_name, args, kwargs or {})
    except JobFailure as failure:
        return failure
    taken.n_images = taken.remaining = len(request_images(taken.request))
    return None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
