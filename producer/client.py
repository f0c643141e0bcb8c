"""The producer client: enqueue embed/verify jobs through rq and wait for their typed results.

Every error it raises is a :class:`~producer.errors.ArcFaceError` (see :mod:`producer.errors`); Redis,
rq and pydantic exceptions never escape it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import redis
from pydantic import ValidationError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import JobStatus
from rq.results import Result

from producer.errors import (
    ArcFaceError,
    InputError,
    JobFailed,
    JobNotFound,
    RedisUnavailable,
    ResultNotKept,
    ResultTimeout,
)
from producer.jobs import (
    EMBED_FUNC,
    ERROR_META_KEY,
    VERIFY_FUNC,
    AnyResult,
    EmbedBatchRequest,
    EmbedBatchResult,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    ImageRef,
    JobError,
    JobFailure,
    JSONSerializer,
    Pair,
    SafeJob,
    VerifyBatchRequest,
    VerifyBatchResult,
    VerifyRequest,
    VerifyResult,
    func_for,
    model_info_key,
    parse_result,
    resolve_shared_path,
)
from producer.redisconn import announce_embedded, connect
from producer.settings import ProducerSettings, load_settings, redact

ImageInput = Union[bytes, bytearray, str, os.PathLike, ImageRef, np.ndarray, Any]  # Any: a PIL image
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what rq accepts as a job id (plus a length bound)


@contextlib.contextmanager
def _redis(what: str) -> Iterator[None]:
    """Turn any Redis failure into :class:`RedisUnavailable` with a one-line, password-free reason."""
    try:
        yield
    except redis.RedisError as exc:
        kind = "unreachable" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) else "refused the command"
        raise RedisUnavailable(f"Redis {kind} while {what}: {redact(str(exc)) or type(exc).__name__}") from None


def _input_error(exc: ValidationError) -> InputError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "request"
    return InputError(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']} (got {first.get('input')!r:.80})")


_CODED_ERROR = re.compile(r"JobFailure: \[(?P<code>[a-z_]+)\] (?P<message>.*)")
_BLOCK_CHUNK_MS = 2000
_FINAL_FAILURES = {Result.Type.FAILED, Result.Type.STOPPED, Result.Type.MAX_RETRIES_EXCEEDED}


class FaceClient:
    """Enqueue ArcFace jobs and read their results.

    ``image`` arguments accept bytes, a file path (``str`` / ``pathlib.Path``), a PIL image, a numpy array
    (HxW or HxWxC, 0..255) or an :class:`~producer.jobs.ImageRef`. With ``as_path=True`` a path is sent as
    a reference relative to the shared root instead of inline bytes.

    Raises only :class:`~producer.errors.ArcFaceError` subclasses: :class:`ConfigError` (a bad setting, at
    construction), :class:`InputError`, :class:`JobNotFound`, :class:`ResultNotKept`, :class:`JobFailed`,
    :class:`ResultTimeout`, :class:`RedisUnavailable`. One client may be shared by any number of threads: its
    connection pool (``ARCFACE_REDIS_MAX_CONNECTIONS``) makes a thread wait for a free connection rather
    than fail.
    """

    def __init__(self, settings: ProducerSettings | None = None, connection: redis.Redis | None = None) -> None:
        self.settings = settings or load_settings(ProducerSettings)
        if connection is None and self.settings.redis_url is None and self.settings.embedded_redis:
            announce_embedded(self.settings)
        self.connection = connection or connect(self.settings, pooled=True)
        self.queue = Queue(
            self.settings.queue, connection=self.connection, serializer=JSONSerializer, job_class=SafeJob
        )

    # --- images ---------------------------------------------------------------------------------
    def image_ref(self, image: ImageInput, as_path: bool = False) -> ImageRef:
        """Turn any accepted image input into the contract's :class:`ImageRef` (validated here too)."""
        limit = self.settings.max_inline_bytes
        if isinstance(image, ImageRef):
            return image
        if isinstance(image, (str, os.PathLike)):
            if as_path:
                root = self.settings.shared_root
                rel = str(image)
                if root is not None and os.path.isabs(rel) and Path(rel).resolve().is_relative_to(Path(root).resolve()):
                    rel = str(Path(rel).resolve().relative_to(Path(root).resolve()))
                try:
                    target = resolve_shared_path(root, rel)
                except JobFailure as exc:
                    raise InputError(exc.code, exc.message) from None
                if not target.is_file():
                    raise InputError(ErrorCode.PATH_NOT_ALLOWED, f"{rel}: no such file under the shared root {root}")
                return ImageRef(path=rel)
            path = Path(image)
            try:
                size = path.stat().st_size
                if size > limit:
                    raise InputError(
                        ErrorCode.IMAGE_TOO_LARGE, f"{path}: {size} bytes, over the {limit}-byte inline limit"
                    )
                data = path.read_bytes()
            except OSError as exc:
                raise InputError(ErrorCode.INVALID_PAYLOAD, f"{path}: {exc.strerror or exc}") from None
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, np.ndarray):
            try:
                data = _png(_array_image(image))
            except (TypeError, ValueError, OSError) as exc:
                raise InputError(
                    ErrorCode.INVALID_PAYLOAD, f"numpy image of shape {image.shape} and dtype {image.dtype}: {exc}"
                ) from None
        elif hasattr(image, "save") and hasattr(image, "mode"):
            try:
                data = _png(image)
            except (TypeError, ValueError, OSError) as exc:
                raise InputError(ErrorCode.INVALID_PAYLOAD, f"PIL image cannot be encoded: {exc}") from None
        else:
            raise InputError(ErrorCode.INVALID_PAYLOAD, f"unsupported image type {type(image).__name__}")
        if not data:
            raise InputError(ErrorCode.IMAGE_DECODE_ERROR, "image is empty (0 bytes)")
        if len(data) > limit:
            raise InputError(
                ErrorCode.IMAGE_TOO_LARGE, f"image has {len(data)} bytes, over the {limit}-byte inline limit"
            )
        return ImageRef.inline(data)

    # --- enqueue --------------------------------------------------------------------------------
    def _job_options(self, request: EmbedRequest | VerifyRequest, job_id: str | None) -> dict[str, Any]:
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

    def _embed_request(
        self, image: ImageInput, model: str | None, ref: str | None, as_path: bool, detect: str | None = None
    ) -> EmbedRequest:
        try:
            return EmbedRequest(image=self.image_ref(image, as_path), model=model, ref=ref, detect=detect)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise _input_error(exc) from None

    def _verify_request(
        self,
        a: ImageInput,
        b: ImageInput,
        threshold: float | None,
        model: str | None,
        ref: str | None,
        as_path: bool,
        detect: str | None = None,
    ) -> VerifyRequest:
        try:
            ref_a = self.image_ref(a, as_path)
        except InputError as exc:
            raise InputError(exc.code, f"image a: {exc.message}") from None
        try:
            ref_b = self.image_ref(b, as_path)
        except InputError as exc:
            raise InputError(exc.code, f"image b: {exc.message}") from None
        try:
            return VerifyRequest(a=ref_a, b=ref_b, threshold=threshold, model=model, ref=ref, detect=detect)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise _input_error(exc) from None

    @staticmethod
    def _check_new_id(job_id: str | None) -> None:
        if job_id is not None and not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"job id {job_id!r} is not valid: use 1-128 letters, digits, '_' or '-'"
            )

    def submit(self, request: EmbedRequest | VerifyRequest, job_id: str | None = None) -> str:
        """Enqueue a ready-made request; returns the job id."""
        self._check_new_id(job_id)
        with _redis("enqueueing"):
            return self.queue.enqueue_call(func_for(request), **self._job_options(request, job_id)).id

    def embed(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        ref: str | None = None,
        as_path: bool = False,
        job_id: str | None = None,
        detect: str | None = None,
        faces: str = "one",
    ) -> str:
        """Enqueue an embed job; returns its id. ``detect`` ("none" / "blazeface") overrides the worker's setting;
        ``faces="all"`` (with detection) embeds every face of the image, largest first (``result.faces``)."""
        request = self._embed_request(image, model, ref, as_path, detect)
        if faces != "one":
            try:
                request = EmbedRequest(**{**request.model_dump(), "faces": faces})
            except ValidationError as exc:
                raise _input_error(exc) from None
        return self.submit(request, job_id)

    def verify(
        self,
        a: ImageInput,
        b: ImageInput,
        *,
        threshold: float | None = None,
        model: str | None = None,
        ref: str | None = None,
        as_path: bool = False,
        job_id: str | None = None,
        detect: str | None = None,
    ) -> str:
        """Enqueue a verify job for a pair; returns its id."""
        return self.submit(self._verify_request(a, b, threshold, model, ref, as_path, detect), job_id)

    def submit_many(self, requests: Iterable[EmbedRequest | VerifyRequest]) -> list[str]:
        """Enqueue many requests in one Redis round trip (rq's ``enqueue_many``)."""
        datas = [Queue.prepare_data(func_for(r), **self._job_options(r, None)) for r in requests]
        with _redis("enqueueing"):
            return [job.id for job in self.queue.enqueue_many(datas)] if datas else []

    def embed_batch(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        ref: str | None = None,
        as_path: bool = False,
        job_id: str | None = None,
        detect: str | None = None,
    ) -> str:
        """Enqueue ONE job that embeds many images (1 to the workers' ARCFACE_MAX_IMAGES_PER_JOB, default 256); returns
        its id. Its result (:meth:`result`) is an :class:`EmbedBatchResult`: ``.embeddings`` ``[N, D]`` and per-image
        ``.errors``; a bad image fails only its own row."""
        refs = []
        for i, image in enumerate(images):
            try:
                refs.append(self.image_ref(image, as_path))
            except InputError as exc:
                raise InputError(exc.code, f"image {i}: {exc.message}") from None
        try:
            request = EmbedBatchRequest(images=refs, model=model, ref=ref, detect=detect)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise _input_error(exc) from None
        return self.submit(request, job_id)

    def verify_batch(
        self,
        pairs: Iterable[Sequence[ImageInput]],
        *,
        threshold: float | None = None,
        model: str | None = None,
        ref: str | None = None,
        as_path: bool = False,
        job_id: str | None = None,
        detect: str | None = None,
    ) -> str:
        """Enqueue ONE job that verifies many ``(a, b)`` pairs; its result is a :class:`VerifyBatchResult`."""
        items = []
        for i, (a, b) in enumerate(pairs):
            v = self._verify_request(a, b, threshold, model, None, as_path)
            items.append(Pair(a=v.a, b=v.b))
        try:
            request = VerifyBatchRequest(pairs=items, threshold=threshold, model=model, ref=ref, detect=detect)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise _input_error(exc) from None
        return self.submit(request, job_id)

    # --- enrolled identities (producer.gallery_client holds the logic) ----------------------------
    def enroll(self, subject: str, image: ImageInput, gallery: str = "default", **kwargs: Any) -> str:
        """Enqueue an enroll job: the image's embedding is stored under ``subject`` in ``gallery`` (idempotent by
        ``enrollment_id``, derived from subject + image when not given). Result: ``EnrollResult``."""
        from producer import gallery_client

        return gallery_client.enroll(self, subject, image, gallery, **kwargs)

    def identify(self, image: ImageInput, gallery: str = "default", top_k: int = 5, **kwargs: Any) -> str:
        """Enqueue a 1:N search: the ``top_k`` closest enrolled subjects within the threshold. Result: ``IdentifyResult``."""
        from producer import gallery_client

        return gallery_client.identify(self, image, gallery, top_k, **kwargs)

    def verify_subject(self, image: ImageInput, subject: str, gallery: str = "default", **kwargs: Any) -> str:
        """Enqueue a verify of ``image`` against an enrolled subject (its closest enrollment). Result: ``VerifySubjectResult``."""
        from producer import gallery_client

        return gallery_client.verify_subject(self, image, subject, gallery, **kwargs)

    def forget(self, subject: str, gallery: str = "default", **kwargs: Any) -> str:
        """Enqueue the deletion of a subject (or, with ``enrollment_id=``, one enrollment). Result: ``ForgetResult``."""
        from producer import gallery_client

        return gallery_client.forget(self, subject, gallery, **kwargs)

    def galleries(self) -> list[Any]:
        """Every gallery with its model, dimension and counts (read from Redis; no job)."""
        from producer import gallery_client

        return gallery_client.list_galleries(self)

    def embed_many(self, images: Iterable[ImageInput], *, model: str | None = None, as_path: bool = False) -> list[str]:
        """Enqueue one embed job per image in one round trip; returns the ids in order."""
        return self.submit_many(self._embed_request(im, model, None, as_path) for im in images)

    def verify_many(
        self,
        pairs: Iterable[Sequence[ImageInput]],
        *,
        threshold: float | None = None,
        model: str | None = None,
        as_path: bool = False,
    ) -> list[str]:
        """Enqueue one verify job per ``(a, b)`` pair in one round trip; returns the ids in order."""
        return self.submit_many(self._verify_request(a, b, threshold, model, None, as_path) for a, b in pairs)

    # --- results --------------------------------------------------------------------------------
    def _job(self, job_id: str) -> SafeJob:
        """The job, read and checked: :class:`JobNotFound` for an id rq refuses, a missing job, or a hash that
        is not an ArcFace job (another application's pickled job, a corrupt field)."""
        if not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
            raise JobNotFound(
                str(job_id), f"{str(job_id)[:80]!r} is not a job id (ids are 1-128 letters, digits, '_' or '-')"
            )
        with _redis("reading the job"):
            try:
                job = SafeJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
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
        with _redis("reading the job status"):
            status = job.get_status(refresh=False)
        return str(status.value if hasattr(status, "value") else status)

    def error(self, job_id: str, result: Result | None = None) -> JobError:
        """The typed error of a failed job (from its meta; derived from rq's record if the worker died)."""
        job = self._job(job_id)
        stored = job.meta.get(ERROR_META_KEY)
        if stored:
            try:
                return JobError.model_validate(stored)
            except ValidationError:
                pass
        text = (result.exc_string if result is not None else None) or job.exc_info or ""
        if "AbandonedJobError" in text:
            return JobError(
                code=ErrorCode.WORKER_DIED, message="the worker running this job died and no retries were left"
            )
        if "JobTimeoutException" in text:
            return JobError(code=ErrorCode.JOB_TIMEOUT, message=f"the job ran past its timeout of {job.timeout}s")
        coded = _CODED_ERROR.search(text)
        if coded and coded["code"] in ErrorCode._value2member_map_:
            return JobError(code=ErrorCode(coded["code"]), message=coded["message"])
        last = text.strip().splitlines()[-1] if text.strip() else "no error details stored"
        return JobError(code=ErrorCode.INTERNAL_ERROR, message=last)

    def model_info(self) -> dict[str, Any] | None:
        """What the workers of this queue serve, as they publish it at start (``arcface:model:<queue>``):
        ``{"model", "dim", "threshold", "input_size", "detect", "started_at"}``; ``None`` before any worker started."""
        with _redis("reading the model info"):
            raw = self.connection.get(model_info_key(self.settings.queue))
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def result(self, job_id: str, timeout: float | None = None) -> AnyResult:
        """Block until the job finishes (an XREAD on rq's result stream: no polling) and return its result.

        Raises :class:`JobFailed` (with the error code), :class:`ResultTimeout`, :class:`JobNotFound`,
        :class:`ResultNotKept` (at once for a job enqueued with ``result_ttl`` 0; as soon as it ends for a failing
        job with ``failure_ttl`` 0) or
        :class:`RedisUnavailable` (Redis still unreachable at the deadline). A Redis that restarts while
        waiting is waited for, with backoff, until the deadline.
        """
        if timeout is not None and not (timeout >= 0 and timeout != float("inf")):
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"timeout must be a finite number of seconds >= 0, got {timeout!r}"
            )
        timeout = self.settings.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        key, last_id = Result.get_key(job_id), "0-0"
        job: SafeJob | None = None
        backoff = 0.0
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            try:
                if job is None:  # inside the retry loop: a Redis restarting at the first read is waited for too
                    job = self._job(job_id)
                    self._check_keeps_result(job)
                # Server-side blocking read, woken the moment rq XADDs the result. Capped per call so the
                # socket's read timeout never fires during a long wait and a restarted Redis is noticed.
                with _redis("waiting for the result"):
                    if remaining_ms > 0:
                        response = self.connection.xread({key: last_id}, block=min(remaining_ms, _BLOCK_CHUNK_MS))
                    else:  # past the deadline: one last look, without blocking
                        response = self.connection.xread({key: last_id})
                    gone = not response and remaining_ms > 0 and not self.connection.exists(job.key)
                backoff = 0.0
            except RedisUnavailable:
                # Redis restarting, or every pooled connection busy: back off (never a tight loop), keep waiting.
                if time.monotonic() >= deadline:
                    raise
                backoff = min(backoff * 2, 5.0) if backoff else 0.25
                time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                continue
            if not response:
                if remaining_ms <= 0:
                    raise ResultTimeout(
                        job_id,
                        f"job {job_id} has no result after {timeout:g}s (status {self._status_or_unknown(job_id)})",
                    )
                if gone:
                    if job.failure_ttl == 0:
                        raise ResultNotKept(
                            job_id,
                            f"job {job_id} ended without a result and was deleted at once: it was enqueued with "
                            "failure_ttl 0 (ARCFACE_FAILURE_TTL=0), so a failure leaves no record",
                        )
                    raise JobNotFound(
                        job_id, f"job {job_id} was deleted while waiting for it (its TTL passed, or it was removed)"
                    )
                continue
            latest: Result | None = None
            for rid, payload in response[0][1]:
                last_id = rid
                try:
                    latest = Result.restore(
                        job_id, rid.decode(), payload, connection=self.connection, serializer=JSONSerializer
                    )
                except Exception as exc:
                    raise JobNotFound(
                        job_id, f"job {job_id}'s result cannot be read ({type(exc).__name__}): not an ArcFace result"
                    ) from None
            if latest is None:
                continue
            if latest.type == Result.Type.SUCCESSFUL:
                try:
                    return parse_result(latest.return_value)  # type: ignore[return-value]
                except (ValueError, ValidationError):
                    raise JobNotFound(
                        job_id, f"job {job_id} finished with a value that is not an ArcFace result"
                    ) from None
            if latest.type in _FINAL_FAILURES:
                raise JobFailed(job_id, self._error_or_unknown(job_id, latest))
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

    def _typed(self, job_id: str, timeout: float | None, kind: Any) -> Any:
        result = self.result(job_id, timeout)
        if not isinstance(result, kind):
            raise InputError(
                ErrorCode.UNSUPPORTED_JOB,
                f"job {job_id} is a {result.kind} job, not {kind.model_fields['kind'].default}",
            )
        return result

    @staticmethod
    def _check_keeps_result(job: SafeJob) -> None:
        status = job.get_status(refresh=False)
        if status in (JobStatus.FINISHED, JobStatus.FAILED):
            return  # its outcome is already stored: read it
        if job.result_ttl == 0:
            raise ResultNotKept(
                job.id,
                f"job {job.id} was enqueued with result_ttl 0 (ARCFACE_RESULT_TTL=0): its result is deleted as "
                "soon as it is written, so there is nothing to wait for; enqueue with ARCFACE_RESULT_TTL > 0",
            )

    def _status_or_unknown(self, job_id: str) -> str:
        try:
            return self.status(job_id)
        except ArcFaceError:
            return "unknown"

    def _error_or_unknown(self, job_id: str, result: Result) -> JobError:
        try:
            return self.error(job_id, result)
        except JobNotFound:  # the job hash expired between the result and this read
            text = result.exc_string or ""
            coded = _CODED_ERROR.search(text)
            if coded and coded["code"] in ErrorCode._value2member_map_:
                return JobError(code=ErrorCode(coded["code"]), message=coded["message"])
            return JobError(code=ErrorCode.INTERNAL_ERROR, message="the job failed; its record has expired")


def _array_image(arr: np.ndarray) -> Any:
    from PIL import Image

    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


__all__ = [
    "EMBED_FUNC",
    "VERIFY_FUNC",
    "ArcFaceError",
    "FaceClient",
    "InputError",
    "JobFailed",
    "JobNotFound",
    "RedisUnavailable",
    "ResultNotKept",
    "ResultTimeout",
]
