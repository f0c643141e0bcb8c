"""Waiting for a job's outcome on rq's result stream (``rq:results:<id>``): a server-side blocking read
(XREAD), woken the moment a worker writes the result, in chunks so a socket's read timeout never fires during
a long wait and a restarted Redis is noticed, with backoff (never a tight loop) while Redis is unreachable.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis
from pydantic import ValidationError
from rq.exceptions import AbandonedJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.timeouts import JobTimeoutException

from producer.contract.codes import ErrorCode, JobError
from producer.contract.errors import JobNotFound, RedisUnavailable, ResultNotKept
from producer.contract.keys import ERROR_ENTRY_FIELD, ERROR_META_KEY
from producer.contract.rqjob import JSONSerializer
from producer.redisconn import redis_errors

BLOCK_CHUNK_MS = 2000  # one XREAD blocks at most this long
FINAL_FAILURES = frozenset({Result.Type.FAILED, Result.Type.STOPPED, Result.Type.MAX_RETRIES_EXCEEDED})
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.25, 5.0

StreamEntry = tuple[Any, dict[Any, Any]]  # (entry id, fields) as redis-py returns them (bytes)


def result_stream_key(job_id: str) -> str:
    """The stream rq appends a job's results to."""
    key: str = Result.get_key(job_id)  # type: ignore[no-untyped-call]  # unannotated in rq
    return key


class ResultStream:
    """One wait on one job's result stream, up to a deadline ``timeout`` seconds from now."""

    def __init__(self, connection: redis.Redis, job_id: str, timeout: float) -> None:
        self.connection = connection
        self.job_id = job_id
        self.key = result_stream_key(job_id)
        self.deadline = time.monotonic() + timeout
        self.last_id: Any = "0-0"
        self.remaining_ms = 0  # at the last read
        self.gone = False  # the last read found nothing and the job hash no longer exists
        self.error: JobError | None = None  # the typed error in the latest entry read (a failure by our workers)
        self._backoff = 0.0

    def read(self, job_key: str) -> list[StreamEntry]:
        """The entries after the last one read: blocks up to :data:`BLOCK_CHUNK_MS` (never past the deadline),
        or, past the deadline, one last look without blocking. When nothing came before the deadline, also
        checks whether the job hash ``job_key`` still exists (:attr:`gone`). :class:`RedisUnavailable` on a
        Redis failure."""
        self.remaining_ms = int((self.deadline - time.monotonic()) * 1000)
        with redis_errors("waiting for the result"):
            if self.remaining_ms > 0:
                response = self.connection.xread({self.key: self.last_id}, block=min(self.remaining_ms, BLOCK_CHUNK_MS))
            else:  # past the deadline: one last look, without blocking
                response = self.connection.xread({self.key: self.last_id})
            self.gone = not response and self.remaining_ms > 0 and not self.connection.exists(job_key)
        self._backoff = 0.0
        streams = cast("list[tuple[Any, list[StreamEntry]]]", response)  # RESP2: [[key, [(id, fields), ...]]]
        return list(streams[0][1]) if streams else []

    def back_off(self, exc: RedisUnavailable) -> None:
        """Sleep before trying again (0.25 s, doubling up to 5 s, never past the deadline); past the deadline,
        raise ``exc``."""
        if time.monotonic() >= self.deadline:
            raise exc
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S) if self._backoff else _BACKOFF_FIRST_S
        time.sleep(min(self._backoff, max(0.0, self.deadline - time.monotonic())))

    def latest(self, entries: list[StreamEntry]) -> Result | None:
        """The last of ``entries`` as an rq :class:`Result` (the read goes on after it); :class:`JobNotFound`
        when an entry is not a result this client can read."""
        latest: Result | None = None
        for rid, payload in entries:
            self.last_id = rid
            try:
                latest = Result.restore(
                    self.job_id, rid.decode(), payload, connection=self.connection, serializer=JSONSerializer
                )
                self.error = _entry_error(payload)
            except Exception as exc:
                raise JobNotFound(
                    self.job_id,
                    f"job {self.job_id}'s result cannot be read ({type(exc).__name__}): not an ArcFace result",
                ) from None
        return latest


def check_keeps_result(job: Job) -> None:
    """:class:`ResultNotKept` for a job still to run that was enqueued with ``result_ttl`` 0."""
    status = job.get_status(refresh=False)
    if status in (JobStatus.FINISHED, JobStatus.FAILED):
        return  # its outcome is already stored: read it
    if job.result_ttl == 0:
        raise ResultNotKept(
            job.id,
            f"job {job.id} was enqueued with result_ttl 0 (ARCFACE_RESULT_TTL=0): its result is deleted as "
            "soon as it is written, so there is nothing to wait for; enqueue with ARCFACE_RESULT_TTL > 0",
        )


def _entry_error(payload: dict[Any, Any]) -> JobError | None:
    raw = payload.get(ERROR_ENTRY_FIELD.encode(), payload.get(ERROR_ENTRY_FIELD))
    if not raw:
        return None
    try:
        return JobError.model_validate_json(raw)
    except ValidationError:
        return None


def job_error(job: Job, result: Result | None = None) -> JobError:
    """The typed error of a failed job: the one its worker stored in its meta, else what rq itself failed it for
    (a worker rq found dead, a job past its timeout: rq records only text, named by rq's exception classes),
    else ``internal_error`` with the last line of rq's text."""
    stored = job.meta.get(ERROR_META_KEY)
    if stored:
        try:
            return JobError.model_validate(stored)
        except ValidationError:
            pass
    latest = result if result is not None else job.latest_result()
    # what rq's deprecated Job.exc_info gives, without its warning: the failed result's text, else the job hash's
    # exc_info field (rq reads it into _exc_info)
    text = (latest.exc_string if latest is not None else None) or job._exc_info or ""
    if AbandonedJobError.__name__ in text:
        return JobError(code=ErrorCode.WORKER_DIED, message="the worker running this job died and no retries were left")
    if JobTimeoutException.__name__ in text:
        return JobError(code=ErrorCode.JOB_TIMEOUT, message=f"the job ran past its timeout of {job.timeout}s")
    last = text.strip().splitlines()[-1] if text.strip() else "no error details stored"
    return JobError(code=ErrorCode.INTERNAL_ERROR, message=last)
