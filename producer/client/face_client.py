"""The producer client: enqueue embed/verify jobs through rq and wait for their typed results.

Every error it raises is a :class:`~producer.contract.errors.ArcFaceError` (see :mod:`producer.contract.errors`); Redis,
rq and pydantic exceptions never escape it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union, Unpack, cast

import redis
from pydantic import ValidationError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import JobStatus
from rq.results import Result

from producer.client.images import ImageInput, image_ref
from producer.client.options import JobOptions, Options, build
from producer.client.waiting import FINAL_FAILURES, ResultStream, check_keeps_result, job_error
from producer.contract.codes import ErrorCode, JobError
from producer.contract.errors import (
    ArcFaceError,
    InputError,
    JobFailed,
    JobNotFound,
    RedisUnavailable,
    ResultNotKept,
    ResultTimeout,
)
from producer.contract.keys import model_info_key
from producer.contract.requests import (
    AnyRequest,
    EmbedBatchRequest,
    EmbedRequest,
    ImageRef,
    Pair,
    VerifyBatchRequest,
    VerifyRequest,
)
from producer.contract.results import AnyResult, EmbedBatchResult, EmbedResult, VerifyBatchResult, VerifyResult
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.contract.wire import func_for, parse_result
from producer.redisconn import announce_embedded, connect, redis_errors
from producer.settings import ProducerSettings, load_settings

if TYPE_CHECKING:
    from producer.contract.gallery import GalleryRequest
    from producer.contract.gallery_results import GalleryInfo

    Request = Union[AnyRequest, GalleryRequest]

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what rq accepts as a job id (plus a length bound)
R = TypeVar("R", EmbedResult, VerifyResult, EmbedBatchResult, VerifyBatchResult)
_FAILED_STATUSES = frozenset({JobStatus.FAILED, JobStatus.STOPPED})  # the statuses a job has an error in


class FaceClient:
    """Enqueue ArcFace jobs and read their results.

    ``image`` arguments accept bytes, a file path (``str`` / ``pathlib.Path``), a PIL image, a numpy array
    (HxW or HxWxC, 0..255) or an :class:`~producer.contract.requests.ImageRef`. With ``as_path=True`` a path is sent as
    a reference relative to the shared root instead of inline bytes. Every enqueueing method takes the
    keyword :class:`JobOptions` (``model``, ``detect``, ``ref``, ``as_path``, ``job_id``).

    Raises only :class:`~producer.contract.errors.ArcFaceError` subclasses: :class:`ConfigError` (a bad setting, at
    construction), :class:`InputError`, :class:`JobNotFound`, :class:`ResultNotKept`, :class:`JobFailed`,
    :class:`ResultTimeout`, :class:`RedisUnavailable`. One client may be shared by any number of threads: its
    connection pool (``ARCFACE_REDIS_MAX_CONNECTIONS``) makes a thread wait for a free connection rather
    than fail.
    """

    def __init__(self, settings: ProducerSettings | None = None, connection: redis.Redis | None = None) -> None:
        self.settings = settings or load_settings(ProducerSettings, unknown="warn")
        if connection is None and self.settings.redis_url is None and self.settings.embedded_redis:
            announce_embedded(self.settings)
        self.connection: redis.Redis = connection or connect(self.settings, pooled=True)
        self.queue: Queue = Queue(
            self.settings.queue, connection=self.connection, serializer=JSONSerializer, job_class=SafeJob
        )

    # --- requests -------------------------------------------------------------------------------
    def image_ref(self, image: ImageInput, as_path: bool = False) -> ImageRef:
        """Turn any accepted image input into the contract's :class:`ImageRef` (validated here too)."""
        return image_ref(image, self.settings.max_inline_bytes, self.settings.shared_root, as_path)

    def _labelled_ref(self, label: str, image: ImageInput, as_path: bool) -> ImageRef:
        try:
            return self.image_ref(image, as_path)
        except InputError as exc:
            raise InputError(exc.code, f"{label}: {exc.message}") from None

    def embed_request(self, image: ImageInput, *, faces: str = "one", **options: Unpack[JobOptions]) -> EmbedRequest:
        """The checked :class:`EmbedRequest` :meth:`embed` would enqueue (for :meth:`submit_many`)."""
        o = Options(**options)
        extra = {"faces": faces} if faces != "one" else {}
        return build(EmbedRequest, image=self.image_ref(image, o.as_path), **extra, **o.request_fields())

    def verify_request(
        self, a: ImageInput, b: ImageInput, *, threshold: float | None = None, **options: Unpack[JobOptions]
    ) -> VerifyRequest:
        """The checked :class:`VerifyRequest` :meth:`verify` would enqueue (for :meth:`submit_many`)."""
        o = Options(**options)
        ref_a = self._labelled_ref("image a", a, o.as_path)
        ref_b = self._labelled_ref("image b", b, o.as_path)
        return build(VerifyRequest, a=ref_a, b=ref_b, threshold=threshold, **o.request_fields())

    # --- enqueue --------------------------------------------------------------------------------
    def _job_options(self, request: Request, job_id: str | None) -> dict[str, Any]:
        s = self.settings
        return dict(
            args=(request.model_dump(mode="json", exclude_none=True),),
            timeout=s.job_timeout,
            result_ttl=s.result_ttl,
            failure_ttl=s.failure_ttl,
            retry=Retry(max=s.retries) if s.retries else None,
            job_id=job_id,
            description=f"{request.kind}" + (f" ref={request.ref}" if request.ref else ""),
        )

    def submit(self, request: Request, job_id: str | None = None) -> str:
        """Enqueue a ready-made request (any job kind of the contract); returns the job id."""
        if job_id is not None and not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"job id {job_id!r} is not valid: use 1-128 letters, digits, '_' or '-'"
            )
        with redis_errors("enqueueing"):
            return self.queue.enqueue_call(func_for(request), **self._job_options(request, job_id)).id

    def submit_many(self, requests: Iterable[Request]) -> list[str]:
        """Enqueue many requests in one Redis round trip (rq's ``enqueue_many``)."""
        datas = [Queue.prepare_data(func_for(r), **self._job_options(r, None)) for r in requests]
        with redis_errors("enqueueing"):
            return [job.id for job in self.queue.enqueue_many(datas)] if datas else []

    def embed(self, image: ImageInput, *, faces: str = "one", **options: Unpack[JobOptions]) -> str:
        """Enqueue an embed job; returns its id. ``faces="all"`` (with detection) embeds every face of the
        image, largest first (``result.faces``)."""
        return self.submit(self.embed_request(image, faces=faces, **options), options.get("job_id"))

    def verify(
        self, a: ImageInput, b: ImageInput, *, threshold: float | None = None, **options: Unpack[JobOptions]
    ) -> str:
        """Enqueue a verify job for a pair; returns its id."""
        return self.submit(self.verify_request(a, b, threshold=threshold, **options), options.get("job_id"))

    def embed_batch(self, images: Iterable[ImageInput], **options: Unpack[JobOptions]) -> str:
        """Enqueue ONE job that embeds many images (1 to the workers' ARCFACE_MAX_IMAGES_PER_JOB, default 256);
        returns its id. Its result (:meth:`result`) is an :class:`EmbedBatchResult`: ``.embeddings`` ``[N, D]``
        and per-image ``.errors``; a bad image fails only its own row."""
        o = Options(**options)
        refs = [self._labelled_ref(f"image {i}", image, o.as_path) for i, image in enumerate(images)]
        return self.submit(build(EmbedBatchRequest, images=refs, **o.request_fields()), o.job_id)

    def verify_batch(
        self, pairs: Iterable[Sequence[ImageInput]], *, threshold: float | None = None, **options: Unpack[JobOptions]
    ) -> str:
        """Enqueue ONE job that verifies many ``(a, b)`` pairs; its result is a :class:`VerifyBatchResult`."""
        o = Options(**options)
        items = [
            Pair(a=self._labelled_ref("image a", a, o.as_path), b=self._labelled_ref("image b", b, o.as_path))
            for a, b in pairs
        ]
        return self.submit(build(VerifyBatchRequest, pairs=items, threshold=threshold, **o.request_fields()), o.job_id)

    def embed_many(self, images: Iterable[ImageInput], *, model: str | None = None, as_path: bool = False) -> list[str]:
        """Enqueue one embed job per image in one round trip; returns the ids in order."""
        return self.submit_many(self.embed_request(im, model=model, as_path=as_path) for im in images)

    def verify_many(
        self,
        pairs: Iterable[Sequence[ImageInput]],
        *,
        threshold: float | None = None,
        model: str | None = None,
        as_path: bool = False,
    ) -> list[str]:
        """Enqueue one verify job per ``(a, b)`` pair in one round trip; returns the ids in order."""
        return self.submit_many(
            self.verify_request(a, b, threshold=threshold, model=model, as_path=as_path) for a, b in pairs
        )

    # --- enrolled identities (producer.client.gallery holds the logic) ----------------------------
    def enroll(self, subject: str, image: ImageInput, gallery: str = "default", **kwargs: Any) -> str:
        """Enqueue an enroll job: the image's embedding is stored under ``subject`` in ``gallery`` (idempotent by
        ``enrollment_id``, derived from subject + image when not given). Result: ``EnrollResult``."""
        from producer.client import gallery as gallery_client

        return gallery_client.enroll(self, subject, image, gallery, **kwargs)

    def identify(self, image: ImageInput, gallery: str = "default", top_k: int = 5, **kwargs: Any) -> str:
        """Enqueue a 1:N search: the ``top_k`` closest enrolled subjects within the threshold.
        Result: ``IdentifyResult``."""
        from producer.client import gallery as gallery_client

        return gallery_client.identify(self, image, gallery, top_k, **kwargs)

    def verify_subject(self, image: ImageInput, subject: str, gallery: str = "default", **kwargs: Any) -> str:
        """Enqueue a verify of ``image`` against an enrolled subject (its closest enrollment).
        Result: ``VerifySubjectResult``."""
        from producer.client import gallery as gallery_client

        return gallery_client.verify_subject(self, image, subject, gallery, **kwargs)

    def forget(self, subject: str, gallery: str = "default", **kwargs: Any) -> str:
        """Enqueue the deletion of a subject (or, with ``enrollment_id=``, one enrollment). Result: ``ForgetResult``."""
        from producer.client import gallery as gallery_client

        return gallery_client.forget(self, subject, gallery, **kwargs)

    def galleries(self) -> list[GalleryInfo]:
        """Every gallery with its model, dimension and counts (read from Redis; no job)."""
        from producer.client import gallery as gallery_client

        return gallery_client.list_galleries(self)

    # --- jobs -----------------------------------------------------------------------------------
    def _job(self, job_id: str) -> SafeJob:
        """The job, read and checked: :class:`JobNotFound` for an id rq refuses, a missing job, or a hash that
        is not an ArcFace job (another application's pickled job, a corrupt field)."""
        if not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
            raise JobNotFound(
                str(job_id), f"{str(job_id)[:80]!r} is not a job id (ids are 1-128 letters, digits, '_' or '-')"
            )
        with redis_errors("reading the job"):
            try:
                # rq's fetch builds an instance of the class it is called on.
                job = cast(SafeJob, SafeJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer))
                func_name = job.func_name  # decodes the job's data: fails here, not later, for a foreign job
            except NoSuchJobError:
                raise JobNotFound(
                    job_id, f"no job {job_id!r} in Redis (unknown id, or its result TTL has passed)"
                ) from None
            except redis.RedisError:
                raise
            except Exception as exc:  # rq could not restore the hash: pickled data, a field in another format
                raise JobNotFound(
                    job_id,
                    f"job {job_id!r} is not an ArcFace job this client can read ({type(exc).__name__}: "
                    f"{str(exc)[:120]})",
                ) from None
        if not isinstance(func_name, str):
            raise JobNotFound(job_id, f"job {job_id!r} is not an ArcFace job (its data names no function)")
        return job  # a function outside ALLOWED_FUNCTIONS is read too: workers fail it with unsupported_job

    def status(self, job_id: str) -> str:
        """rq's status of the job: queued, started, finished, failed, scheduled, deferred, stopped, canceled."""
        job = self._job(job_id)
        with redis_errors("reading the job status"):
            status = job.get_status(refresh=False)
        return str(status.value if hasattr(status, "value") else status)

    def error(self, job_id: str, result: Result | None = None) -> JobError | None:
        """The typed error of a failed job (from its meta; derived from rq's record if the worker died); ``None``
        for a job that has not failed (queued, started, finished). ``result``: the job's failed rq result, when
        the caller already holds it (the status is then not read)."""
        job = self._job(job_id)
        if result is None:
            with redis_errors("reading the job status"):
                status = job.get_status(refresh=False)
            if status not in _FAILED_STATUSES:
                return None
        return job_error(job, result)

    def model_info(self) -> dict[str, Any] | None:
        """What the workers of this queue serve, as they publish it at start (``arcface:model:<queue>``):
        ``{"model", "dim", "threshold", "input_size", "detect", "started_at"}``; ``None`` before any worker started."""
        with redis_errors("reading the model info"):
            raw = self.connection.get(model_info_key(self.settings.queue))
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    # --- results --------------------------------------------------------------------------------
    def result(self, job_id: str, timeout: float | None = None) -> AnyResult:
        """Block until the job finishes (an XREAD on rq's result stream: no polling) and return its result.

        Raises :class:`JobFailed` (with the error code), :class:`ResultTimeout`, :class:`JobNotFound`,
        :class:`ResultNotKept` (at once for a job enqueued with ``result_ttl`` 0; as soon as it ends for a failing
        job with ``failure_ttl`` 0) or :class:`RedisUnavailable` (Redis still unreachable at the deadline). A
        Redis that restarts while waiting is waited for, with backoff, until the deadline.
        """
        if timeout is not None and not (timeout >= 0 and timeout != float("inf")):
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"timeout must be a finite number of seconds >= 0, got {timeout!r}"
            )
        timeout = self.settings.wait_timeout if timeout is None else timeout
        stream = ResultStream(self.connection, job_id, timeout)
        job: SafeJob | None = None
        while True:
            try:
                if job is None:  # inside the retry loop: a Redis restarting at the first read is waited for too
                    job = self._job(job_id)
                    check_keeps_result(job)
                entries = stream.read(job.key)
            except RedisUnavailable as exc:  # Redis restarting, or every pooled connection busy
                stream.back_off(exc)
                continue
            if not entries:
                self._check_still_waiting(job, stream, timeout)
                continue
            latest = stream.latest(entries)
            if latest is not None and latest.type == Result.Type.SUCCESSFUL:
                try:
                    return parse_result(latest.return_value)
                except (ValueError, ValidationError):
                    raise JobNotFound(
                        job_id, f"job {job_id} finished with a value that is not an ArcFace result"
                    ) from None
            if latest is not None and latest.type in FINAL_FAILURES:
                raise JobFailed(job_id, stream.error or self._error_or_unknown(job_id, latest))
            # RETRIED: the job was requeued; keep waiting on the same stream.

    def result_embed(self, job_id: str, timeout: float | None = None) -> EmbedResult:
        """:meth:`result` for an embed job, typed as :class:`EmbedResult` (``InputError`` for another kind)."""
        return self._typed(job_id, timeout, EmbedResult)

    def result_verify(self, job_id: str, timeout: float | None = None) -> VerifyResult:
        """:meth:`result` for a verify job, typed as :class:`VerifyResult` (``InputError`` for another kind)."""
        return self._typed(job_id, timeout, VerifyResult)

    def result_embed_batch(self, job_id: str, timeout: float | None = None) -> EmbedBatchResult:
        """:meth:`result` for an embed_batch job, typed as :class:`EmbedBatchResult`."""
        return self._typed(job_id, timeout, EmbedBatchResult)

    def result_verify_batch(self, job_id: str, timeout: float | None = None) -> VerifyBatchResult:
        """:meth:`result` for a verify_batch job, typed as :class:`VerifyBatchResult`."""
        return self._typed(job_id, timeout, VerifyBatchResult)

    def _typed(self, job_id: str, timeout: float | None, kind: type[R]) -> R:
        result = self.result(job_id, timeout)
        if not isinstance(result, kind):
            raise InputError(
                ErrorCode.UNSUPPORTED_JOB,
                f"job {job_id} is a {result.kind} job, not {kind.model_fields['kind'].default}",
            )
        return result

    def _check_still_waiting(self, job: SafeJob, stream: ResultStream, timeout: float) -> None:
        """After a read that found nothing: :class:`ResultTimeout` past the deadline, :class:`ResultNotKept` or
        :class:`JobNotFound` when the job hash is gone."""
        if stream.remaining_ms <= 0:
            raise ResultTimeout(
                job.id, f"job {job.id} has no result after {timeout:g}s (status {self._status_or_unknown(job.id)})"
            )
        if not stream.gone:
            return
        if job.failure_ttl == 0:
            raise ResultNotKept(
                job.id,
                f"job {job.id} ended without a result and was deleted at once: it was enqueued with "
                "failure_ttl 0 (ARCFACE_FAILURE_TTL=0), so a failure leaves no record",
            )
        raise JobNotFound(job.id, f"job {job.id} was deleted while waiting for it (its TTL passed, or it was removed)")

    def _status_or_unknown(self, job_id: str) -> str:
        try:
            return self.status(job_id)
        except ArcFaceError:
            return "unknown"

    def _error_or_unknown(self, job_id: str, result: Result) -> JobError:
        try:
            return job_error(self._job(job_id), result)
        except JobNotFound:  # the job hash expired between the result and this read
            return JobError(code=ErrorCode.INTERNAL_ERROR, message="the job failed; its record has expired")


__all__ = [
    "FaceClient",
]
