"""The rq job functions named by the contract (``worker.jobs.embed`` / ``worker.jobs.verify``).

The micro-batching worker never calls these: it reads the same payloads and runs them many at a time.
They exist so a plain ``rq worker --job-class producer.jobs.SafeJob --serializer producer.jobs.JSONSerializer``
also serves the queue, one job at a time, with the same results and error codes (the slow path).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rq import get_current_job

from producer.jobs import (
    EMBED_BATCH_FUNC,
    EMBED_FUNC,
    ENROLL_BATCH_FUNC,
    ENROLL_FUNC,
    ERROR_META_KEY,
    FORGET_FUNC,
    IDENTIFY_FUNC,
    VERIFY_BATCH_FUNC,
    VERIFY_FUNC,
    JobFailure,
    parse_request,
)
from worker.runtime import Runtime, load_detector, load_engine, load_gallery
from worker.settings import WorkerSettings

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The process's runtime, loaded on first use (the model loads once per process)."""
    global _runtime
    if _runtime is None:
        settings = WorkerSettings()
        from producer.redisconn import connect

        engine = load_engine(settings)
        _runtime = Runtime(settings, engine, load_detector(settings), load_gallery(settings, connect(settings), engine))
    return _runtime


def record_failure(job: Any, failure: JobFailure) -> None:
    """Store the typed error in the job's meta, where producers read it, and stop rq from retrying:
    retries are for jobs whose worker died; a bad image stays bad."""
    job.meta[ERROR_META_KEY] = failure.to_error().model_dump(mode="json")
    job.save_meta()
    job.retries_left = 0


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


def embed(*args: Any, **kwargs: Any) -> dict:
    """Embed one image: ``args == (EmbedRequest JSON,)``; returns an ``EmbedResult`` as JSON."""
    return _run(EMBED_FUNC, args, kwargs)


def verify(*args: Any, **kwargs: Any) -> dict:
    """Verify a pair: ``args == (VerifyRequest JSON,)``; returns a ``VerifyResult`` as JSON."""
    return _run(VERIFY_FUNC, args, kwargs)


def embed_batch(*args: Any, **kwargs: Any) -> dict:
    """Embed many images: ``args == (EmbedBatchRequest JSON,)``; returns an ``EmbedBatchResult`` as JSON."""
    return _run(EMBED_BATCH_FUNC, args, kwargs)


def verify_batch(*args: Any, **kwargs: Any) -> dict:
    """Verify many pairs: ``args == (VerifyBatchRequest JSON,)``; returns a ``VerifyBatchResult`` as JSON."""
    return _run(VERIFY_BATCH_FUNC, args, kwargs)


def enroll(*args: Any, **kwargs: Any) -> dict:
    """Enroll one image under a subject of a gallery: ``args == (EnrollRequest JSON,)``."""
    return _run(ENROLL_FUNC, args, kwargs)


def enroll_batch(*args: Any, **kwargs: Any) -> dict:
    """Enroll many images: ``args == (EnrollBatchRequest JSON,)``."""
    return _run(ENROLL_BATCH_FUNC, args, kwargs)


def identify(*args: Any, **kwargs: Any) -> dict:
    """Search a gallery for the image's face: ``args == (IdentifyRequest JSON,)``."""
    return _run(IDENTIFY_FUNC, args, kwargs)


def forget(*args: Any, **kwargs: Any) -> dict:
    """Delete a subject or one enrollment: ``args == (ForgetRequest JSON,)``."""
    return _run(FORGET_FUNC, args, kwargs)
