"""The job contract, shared by producers and workers: it gathers the Redis names (:mod:`producer.keys`), the
requests (:mod:`producer.requests`, :mod:`producer.gallery`), the results (:mod:`producer.results`,
:mod:`producer.gallery_results`) and the error codes (:mod:`producer.codes`), and holds the wire serializer, the
dispatch over every job kind and the rq job class both sides use.

Nothing here imports TensorFlow or rq's worker side, so a backend service can depend on it alone.

Wire format (what a non-Python producer writes; see README "Wire format"): an rq job hash whose ``data``
field is the UTF-8 JSON array ``[func_name, null, [payload], {}]``, with ``func_name`` one of
:data:`ALLOWED_FUNCTIONS` and ``payload`` an :class:`EmbedRequest` or :class:`VerifyRequest` as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from producer.codes import ErrorCode, JobError, JobFailure
from producer.gallery import GalleryRequest, gallery_func_for, images_for, parse_gallery_request
from producer.gallery_results import parse_gallery_result
from producer.keys import (
    ALLOWED_FUNCTIONS,
    DEFAULT_QUEUE,
    EMBED_BATCH_FUNC,
    EMBED_FUNC,
    ENROLL_BATCH_FUNC,
    ENROLL_FUNC,
    ERROR_ENTRY_FIELD,
    ERROR_META_KEY,
    FORGET_FUNC,
    GALLERY_FUNCTIONS,
    IDENTIFY_FUNC,
    JOB_CLASS,
    MODEL_INFO_PREFIX,
    SERIALIZER,
    VERIFY_BATCH_FUNC,
    VERIFY_FUNC,
    model_info_key,
)
from producer.requests import (
    MAX_IMAGES_PER_JOB,
    AnyRequest,
    Detect,
    EmbedBatchRequest,
    EmbedRequest,
    ImageRef,
    Pair,
    RequestBase,
    StrictModel,
    VerifyBatchRequest,
    VerifyRequest,
    check_arguments,
    validate_payload,
)
from producer.results import (
    AnyResult,
    EmbedBatchResult,
    EmbedResult,
    FaceEmbedding,
    ItemError,
    PairResult,
    Timing,
    VerifyBatchResult,
    VerifyResult,
    cosine_distance,
    decode_embedding,
    encode_embedding,
    encode_matrix,
    parse_embedding_result,
)


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


# --- errors (the codes and the stored record: producer.codes) -----------------------------------------
def resolve_shared_path(root: Path | None, relative: str) -> Path:
    """The file a path image names, refused (``path_not_allowed``) unless it lies inside ``root``.

    Absolute paths, ``..`` components and symlinks that lead out of the root are all refused; the check
    is made on the fully resolved path, so it holds on both the producer's and the worker's side.
    """
    if root is None:
        raise JobFailure(
            ErrorCode.PATH_NOT_ALLOWED, "path images are disabled: no shared root is configured (ARCFACE_SHARED_ROOT)"
        )
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} must be relative to the shared root")
    if ".." in Path(relative).parts or "\x00" in relative:
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} may not contain '..'")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} leads outside the shared root (symlink)")
    return target


# --- dispatch over every kind (gallery kinds included) ---------------------------------------------
_REQUEST_FOR_FUNC: dict[str, type[AnyRequest]] = {
    EMBED_FUNC: EmbedRequest,
    VERIFY_FUNC: VerifyRequest,
    EMBED_BATCH_FUNC: EmbedBatchRequest,
    VERIFY_BATCH_FUNC: VerifyBatchRequest,
}
_FUNC_FOR_KIND = {model.model_fields["kind"].default: func for func, model in _REQUEST_FOR_FUNC.items()}


def request_images(request: AnyRequest) -> list[ImageRef]:
    """Every image a request needs embedded, in order (a pair contributes a then b)."""
    if isinstance(request, EmbedRequest):
        return [request.image]
    if isinstance(request, VerifyRequest):
        return [request.a, request.b]
    if isinstance(request, EmbedBatchRequest):
        return list(request.images)
    if isinstance(request, VerifyBatchRequest):
        return [ref for pair in request.pairs for ref in (pair.a, pair.b)]
    return images_for(request)  # gallery kinds (enroll, identify, forget, verify against a subject)


def _targets_gallery(b: Any) -> bool:
    """A verify job whose ``b`` is an enrolled subject or a given embedding (not an image)."""
    return isinstance(b, dict) and ("subject" in b or "embedding_b64" in b)


def func_for(request: AnyRequest | GalleryRequest) -> str:
    """The rq function path that runs ``request`` (any kind, gallery kinds included)."""
    if isinstance(request, (EmbedRequest, VerifyRequest, EmbedBatchRequest, VerifyBatchRequest)):
        return _FUNC_FOR_KIND[request.kind]
    return gallery_func_for(request)


def parse_request(func_name: str | None, args: Any, kwargs: Any) -> AnyRequest:
    """Validate an rq job's function and arguments against the contract (worker side).

    Raises :class:`JobFailure` with ``unsupported_job`` for a function outside the allow-list and
    ``invalid_payload`` for anything that is not exactly one valid request dict.
    """
    if func_name not in ALLOWED_FUNCTIONS:
        raise JobFailure(
            ErrorCode.UNSUPPORTED_JOB,
            f"function {func_name!r} is not an ArcFace job; allowed: {sorted(ALLOWED_FUNCTIONS)}",
        )
    payload = check_arguments(args, kwargs)
    if func_name in GALLERY_FUNCTIONS or (func_name == VERIFY_FUNC and _targets_gallery(payload.get("b"))):
        return parse_gallery_request(func_name, args, kwargs)  # type: ignore[return-value]  # a gallery request
    return validate_payload(_REQUEST_FOR_FUNC[func_name], args[0])


def parse_result(value: Any) -> AnyResult:
    """Turn a stored rq return value back into its typed result (any kind, gallery kinds included)."""
    if isinstance(value, dict) and (
        value.get("kind") in ("enroll", "enroll_batch", "identify", "forget")
        or (value.get("kind") == "verify" and "subject" in value)
    ):
        return parse_gallery_result(value)  # type: ignore[return-value]  # a gallery result (see producer.gallery)
    return parse_embedding_result(value)


# --- the rq job class both sides use -------------------------------------------------------------------
from rq.job import Job as _RqJob  # noqa: E402  (rq is a producer dependency; kept at the end for readability)


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
    Workers (ours and a plain ``rq worker --job-class producer.jobs.SafeJob``) use this class, so such a
    job fails with ``unsupported_job`` (recorded as data in its meta) before anything is imported.
    """

    @property
    def func(self) -> Any:
        if self.func_name not in ALLOWED_FUNCTIONS or self.instance is not None:
            failure = JobFailure(ErrorCode.UNSUPPORTED_JOB, f"function {self.func_name!r} is not an ArcFace job")
            record_failure(self, failure)
            raise failure
        return super().func


__all__ = [
    "ALLOWED_FUNCTIONS",
    "DEFAULT_QUEUE",
    "EMBED_BATCH_FUNC",
    "EMBED_FUNC",
    "ENROLL_BATCH_FUNC",
    "ENROLL_FUNC",
    "ERROR_ENTRY_FIELD",
    "ERROR_META_KEY",
    "FORGET_FUNC",
    "GALLERY_FUNCTIONS",
    "IDENTIFY_FUNC",
    "JOB_CLASS",
    "MAX_IMAGES_PER_JOB",
    "MODEL_INFO_PREFIX",
    "RequestBase",
    "StrictModel",
    "SERIALIZER",
    "VERIFY_BATCH_FUNC",
    "VERIFY_FUNC",
    "AnyRequest",
    "AnyResult",
    "Detect",
    "EmbedBatchRequest",
    "EmbedBatchResult",
    "EmbedRequest",
    "EmbedResult",
    "ErrorCode",
    "FaceEmbedding",
    "ImageRef",
    "ItemError",
    "JSONSerializer",
    "JobError",
    "JobFailure",
    "Pair",
    "PairResult",
    "SafeJob",
    "Timing",
    "VerifyBatchRequest",
    "VerifyBatchResult",
    "VerifyRequest",
    "VerifyResult",
    "check_arguments",
    "cosine_distance",
    "decode_embedding",
    "encode_embedding",
    "encode_matrix",
    "func_for",
    "model_info_key",
    "parse_request",
    "parse_result",
    "record_failure",
    "request_images",
    "resolve_shared_path",
    "validate_payload",
]
