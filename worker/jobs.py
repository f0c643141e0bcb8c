"""The rq job functions named by the contract (``worker.jobs.embed`` / ``worker.jobs.verify``).

The micro-batching worker never calls these: it reads the same payloads and runs them many at a time.
They exist so a plain
``rq worker --job-class producer.contract.rqjob.SafeJob --serializer producer.contract.rqjob.JSONSerializer``
also serves the queue, one job at a time, with the same results and error codes (the slow path).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable

from rq import get_current_job

from producer.contract.codes import JobFailure
from producer.contract.keys import (
    EMBED_BATCH_FUNC,
    EMBED_FUNC,
    ENROLL_BATCH_FUNC,
    ENROLL_FUNC,
    FORGET_FUNC,
    IDENTIFY_FUNC,
    VERIFY_BATCH_FUNC,
    VERIFY_FUNC,
)
from producer.contract.rqjob import record_failure
from producer.contract.wire import parse_request
from worker.runtime import Runtime, load_detector, load_gallery, prepare_engine
from worker.settings import WorkerSettings

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The process's runtime, loaded on first use (the model loads once per process)."""
    global _runtime
    if _runtime is None:
        settings = WorkerSettings()
        from producer.redisconn import connect

        engine = prepare_engine(settings).engine  # the same precision decision as arcface-worker's
        _runtime = Runtime(settings, engine, load_detector(settings), load_gallery(settings, connect(settings), engine))
    return _runtime


def _run(func_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
    job = get_current_job()
    try:
        request = parse_request(func_name, list(args), kwargs)
        queued_ms = 0.0
        if job is not None and job.enqueued_at is not None:
            enqueued = (
                job.enqueued_at.replace(tzinfo=timezone.utc) if job.enqueued_at.tzinfo is None else job.enqueued_at
            )
            queued_ms = (datetime.now(timezone.utc) - enqueued).total_seconds() * 1000.0
        return runtime().run_one(request, queued_ms)
    except JobFailure as failure:
        if job is not None:
            record_failure(job, failure)
        raise


def _job_function(func_name: str, what: str) -> Callable[..., dict]:
    """The function rq imports as ``func_name`` (``worker.jobs.<kind>``): runs the request it is called with."""
    name = func_name.rpartition(".")[2]
    kind = "".join(part.title() for part in name.split("_"))

    def job(*args: Any, **kwargs: Any) -> dict:
        return _run(func_name, args, kwargs)

    job.__name__ = job.__qualname__ = name
    job.__doc__ = f"{what}: ``args == ({kind}Request JSON,)``; returns its ``{kind}Result`` as JSON."
    return job


embed = _job_function(EMBED_FUNC, "Embed one image")
verify = _job_function(VERIFY_FUNC, "Verify a pair")
embed_batch = _job_function(EMBED_BATCH_FUNC, "Embed many images")
verify_batch = _job_function(VERIFY_BATCH_FUNC, "Verify many pairs")
enroll = _job_function(ENROLL_FUNC, "Enroll one image under a subject of a gallery")
enroll_batch = _job_function(ENROLL_BATCH_FUNC, "Enroll many images")
identify = _job_function(IDENTIFY_FUNC, "Search a gallery for the image's face")
forget = _job_function(FORGET_FUNC, "Delete a subject or one enrollment")
