"""The producer client: enqueue embed/verify jobs through rq and wait for their typed results."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.results import Result

from producer.jobs import (
    EMBED_FUNC, ERROR_META_KEY, VERIFY_FUNC, EmbedRequest, EmbedResult, ErrorCode, ImageRef, JobError, JobFailure,
    JSONSerializer, SafeJob, VerifyRequest, VerifyResult, func_for, parse_result, resolve_shared_path,
)
from producer.redisconn import connect
from producer.settings import ProducerSettings

ImageInput = Union[bytes, bytearray, str, os.PathLike, ImageRef, np.ndarray, Any]  # Any: a PIL image


class InputError(ValueError):
    """An image the client cannot send (missing file, too large, unsupported type); carries a code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class JobFailed(RuntimeError):
    """The job ran and failed; ``error`` holds its stable code and message."""

    def __init__(self, job_id: str, error: JobError) -> None:
        super().__init__(f"job {job_id} failed [{error.code.value}]: {error.message}")
        self.job_id = job_id
        self.error = error


class ResultTimeout(TimeoutError):
    """No result arrived within the timeout (the job may still finish later)."""


class JobNotFound(LookupError):
    """No such job in Redis (never enqueued, or its TTL ran out)."""


_CODED_ERROR = re.compile(r"JobFailure: \[(?P<code>[a-z_]+)\] (?P<message>.*)")
_BLOCK_CHUNK_MS = 2000
_FINAL_FAILURES = {Result.Type.FAILED, Result.Type.STOPPED, Result.Type.MAX_RETRIES_EXCEEDED}


class FaceClient:
    """Enqueue ArcFace jobs and read their results. Thread-safe as long as redis-py's pool is.

    ``image`` arguments accept bytes, a file path (``str`` / ``pathlib.Path``), a PIL image, a numpy array
    (HxW or HxWxC, 0..255) or an :class:`~producer.jobs.ImageRef`. With ``as_path=True`` a path is sent as
    a reference relative to the shared root instead of inline bytes.
    """

    def __init__(self, settings: ProducerSettings | None = None, connection: redis.Redis | None = None) -> None:
        self.settings = settings or ProducerSettings()
        self.connection = connection or connect(self.settings)
        self.queue = Queue(self.settings.queue, connection=self.connection, serializer=JSONSerializer, job_class=SafeJob)

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
                    raise InputError(ErrorCode.IMAGE_TOO_LARGE, f"{path}: {size} bytes, over the {limit}-byte inline limit")
                data = path.read_bytes()
            except OSError as exc:
                raise InputError(ErrorCode.INVALID_PAYLOAD, f"{path}: {exc.strerror or exc}") from None
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, np.ndarray):
            data = _png(_array_image(image))
        elif hasattr(image, "save") and hasattr(image, "mode"):
            data = _png(image)
        else:
            raise InputError(ErrorCode.INVALID_PAYLOAD, f"unsupported image type {type(image).__name__}")
        if not data:
            raise InputError(ErrorCode.IMAGE_DECODE_ERROR, "image is empty (0 bytes)")
        if len(data) > limit:
            raise InputError(ErrorCode.IMAGE_TOO_LARGE, f"image has {len(data)} bytes, over the {limit}-byte inline limit")
        return ImageRef.inline(data)

    # --- enqueue --------------------------------------------------------------------------------
    def _job_options(self, request: EmbedRequest | VerifyRequest, job_id: str | None) -> dict[str, Any]:
        s = self.settings
        return dict(
            args=(request.model_dump(mode="json", exclude_none=True),), timeout=s.job_timeout, result_ttl=s.result_ttl,
            failure_ttl=s.failure_ttl, retry=Retry(max=s.retries) if s.retries else None, job_id=job_id,
            description=f"{request.kind}" + (f" ref={request.ref}" if request.ref else ""),
        )

    def _embed_request(self, image: ImageInput, model: str | None, ref: str | None, as_path: bool, detect: str | None = None) -> EmbedRequest:
        return EmbedRequest(image=self.image_ref(image, as_path), model=model, ref=ref, detect=detect)  # type: ignore[arg-type]

    def _verify_request(self, a: ImageInput, b: ImageInput, threshold: float | None, model: str | None, ref: str | None, as_path: bool,
                        detect: str | None = None) -> VerifyRequest:
        return VerifyRequest(a=self.image_ref(a, as_path), b=self.image_ref(b, as_path), threshold=threshold, model=model, ref=ref,
                             detect=detect)  # type: ignore[arg-type]

    def submit(self, request: EmbedRequest | VerifyRequest, job_id: str | None = None) -> str:
        """Enqueue a ready-made request; returns the job id."""
        return self.queue.enqueue_call(func_for(request), **self._job_options(request, job_id)).id

    def embed(self, image: ImageInput, *, model: str | None = None, ref: str | None = None, as_path: bool = False, job_id: str | None = None,
              detect: str | None = None) -> str:
        """Enqueue an embed job; returns its id. ``detect`` ("none" / "blazeface") overrides the worker's setting."""
        return self.submit(self._embed_request(image, model, ref, as_path, detect), job_id)

    def verify(self, a: ImageInput, b: ImageInput, *, threshold: float | None = None, model: str | None = None,
               ref: str | None = None, as_path: bool = False, job_id: str | None = None, detect: str | None = None) -> str:
        """Enqueue a verify job for a pair; returns its id."""
        return self.submit(self._verify_request(a, b, threshold, model, ref, as_path, detect), job_id)

    def submit_many(self, requests: Iterable[EmbedRequest | VerifyRequest]) -> list[str]:
        """Enqueue many requests in one Redis round trip (rq's ``enqueue_many``)."""
        datas = [Queue.prepare_data(func_for(r), **self._job_options(r, None)) for r in requests]
        return [job.id for job in self.queue.enqueue_many(datas)] if datas else []

    def embed_many(self, images: Iterable[ImageInput], *, model: str | None = None, as_path: bool = False) -> list[str]:
        """Enqueue one embed job per image in one round trip; returns the ids in order."""
        return self.submit_many(self._embed_request(im, model, None, as_path) for im in images)

    def verify_many(self, pairs: Iterable[Sequence[ImageInput]], *, threshold: float | None = None, model: str | None = None,
                    as_path: bool = False) -> list[str]:
        """Enqueue one verify job per ``(a, b)`` pair in one round trip; returns the ids in order."""
        return self.submit_many(self._verify_request(a, b, threshold, model, None, as_path) for a, b in pairs)

    # --- results --------------------------------------------------------------------------------
    def _job(self, job_id: str) -> SafeJob:
        try:
            return SafeJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFound(f"no job {job_id!r} in Redis (unknown id, or its result TTL has passed)") from None

    def status(self, job_id: str) -> str:
        """rq's status of the job: queued, started, finished, failed, scheduled, deferred, stopped, canceled."""
        status = self._job(job_id).get_status(refresh=False)
        return str(status.value if hasattr(status, "value") else status)

    def error(self, job_id: str, result: Result | None = None) -> JobError:
        """The typed error of a failed job (from its meta; derived from rq's record if the worker died)."""
        job = self._job(job_id)
        stored = job.meta.get(ERROR_META_KEY)
        if stored:
            return JobError.model_validate(stored)
        text = (result.exc_string if result is not None else None) or job.exc_info or ""
        if "AbandonedJobError" in text:
            return JobError(code=ErrorCode.WORKER_DIED, message="the worker running this job died and no retries were left")
        if "JobTimeoutException" in text:
            return JobError(code=ErrorCode.JOB_TIMEOUT, message=f"the job ran past its timeout of {job.timeout}s")
        coded = _CODED_ERROR.search(text)
        if coded and coded["code"] in ErrorCode._value2member_map_:
            return JobError(code=ErrorCode(coded["code"]), message=coded["message"])
        last = text.strip().splitlines()[-1] if text.strip() else "no error details stored"
        return JobError(code=ErrorCode.INTERNAL_ERROR, message=last)

    def result(self, job_id: str, timeout: float | None = None) -> EmbedResult | VerifyResult:
        """Block until the job finishes (an XREAD on rq's result stream: no polling) and return its result.

        Raises :class:`JobFailed` (with the error code), :class:`ResultTimeout` or :class:`JobNotFound`.
        """
        job = self._job(job_id)
        timeout = self.settings.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        key, last_id = Result.get_key(job.id), "0-0"
        backoff = 0.0
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise ResultTimeout(f"job {job_id} has no result after {timeout:g}s (status {self.status(job_id)})")
            # Server-side blocking read, woken the moment rq XADDs the result. Capped per call so the
            # socket's read timeout never fires during a long wait and a restarted Redis is noticed.
            try:
                response = self.connection.xread({key: last_id}, block=min(remaining_ms, _BLOCK_CHUNK_MS))
            except (redis.ConnectionError, redis.TimeoutError):
                # Redis restarting: back off (never a tight loop) and keep waiting until the deadline.
                backoff = min(backoff * 2, 5.0) if backoff else 0.25
                time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                continue
            backoff = 0.0
            if not response:
                continue
            latest: Result | None = None
            for rid, payload in response[0][1]:
                last_id = rid
                latest = Result.restore(job.id, rid.decode(), payload, connection=self.connection, serializer=JSONSerializer)
            if latest is None:
                continue
            if latest.type == Result.Type.SUCCESSFUL:
                return parse_result(latest.return_value)
            if latest.type in _FINAL_FAILURES:
                raise JobFailed(job_id, self.error(job_id, latest))
            # RETRIED: the job was requeued; keep waiting on the same stream.


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


__all__ = ["EMBED_FUNC", "VERIFY_FUNC", "FaceClient", "InputError", "JobFailed", "JobNotFound", "ResultTimeout"]
