"""rq's side of the contract: the JSON serializer and the job class both sides use. The only rq import in
:mod:`producer.contract`.

Dotted paths for rq's command line (``rq worker``, ``rq info``): :data:`producer.contract.keys.SERIALIZER` and
:data:`producer.contract.keys.JOB_CLASS`.
"""

from __future__ import annotations

import json
from typing import Any

from rq.job import Job as _RqJob

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.keys import ALLOWED_FUNCTIONS, ERROR_META_KEY


class JSONSerializer:
    """rq serializer: UTF-8 JSON, never pickle. Used for job data, meta and results on both sides."""

    @staticmethod
    def dumps(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def loads(data: bytes | str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(data)


def record_failure(job: Any, failure: JobFailure) -> None:
    """Store the typed error in the job's meta, where producers read it, and stop rq from retrying: retries are
    for jobs whose worker died; a bad image stays bad. For a job run by a plain rq worker (ours write the meta
    with the outcome)."""
    job.meta[ERROR_META_KEY] = failure.to_error().model_dump(mode="json")
    job.save_meta()
    job.retries_left = 0


class SafeJob(_RqJob):
    """An rq ``Job`` that will only ever resolve our own job functions.

    rq imports whatever dotted path a job names; a job hand-written into Redis could name ``os.system``.
    Workers (ours and a plain ``rq worker --job-class producer.contract.rqjob.SafeJob``) use this class, so such a
    job fails with ``unsupported_job`` (recorded as data in its meta) before anything is imported.
    """

    @property
    def func(self) -> Any:
        if self.func_name not in ALLOWED_FUNCTIONS or self.instance is not None:
            failure = JobFailure(ErrorCode.UNSUPPORTED_JOB, f"function {self.func_name!r} is not an ArcFace job")
            record_failure(self, failure)
            raise failure
        return super().func
