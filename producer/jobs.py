"""The job contract, shared by producers and workers: job kinds, image references, typed results and
errors, the wire serializer, and the Redis names we own.

Nothing here imports TensorFlow or rq's worker side, so a backend service can depend on it alone.

Wire format (what a non-Python producer writes; see README "Wire format"): an rq job hash whose ``data``
field is the UTF-8 JSON array ``[func_name, null, [payload], {}]``, with ``func_name`` one of
:data:`ALLOWED_FUNCTIONS` and ``payload`` an :class:`EmbedRequest` or :class:`VerifyRequest` as JSON.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from producer.codes import ErrorCode, JobError, JobFailure, inline_bytes
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
    parse_result,
)

if TYPE_CHECKING:
    from producer.gallery import GalleryRequest

# --- Redis names -----------------------------------------------------------------------------------
DEFAULT_QUEUE = "arcface"
EMBED_FUNC = "worker.jobs.embed"
VERIFY_FUNC = "worker.jobs.verify"
EMBED_BATCH_FUNC = "worker.jobs.embed_batch"
VERIFY_BATCH_FUNC = "worker.jobs.verify_batch"
ENROLL_FUNC = "worker.jobs.enroll"
ENROLL_BATCH_FUNC = "worker.jobs.enroll_batch"
IDENTIFY_FUNC = "worker.jobs.identify"
FORGET_FUNC = "worker.jobs.forget"
# The gallery kinds (producer.gallery); verify also takes a subject or an embedding there.
GALLERY_FUNCTIONS = frozenset({ENROLL_FUNC, ENROLL_BATCH_FUNC, IDENTIFY_FUNC, FORGET_FUNC})
ALLOWED_FUNCTIONS = frozenset({EMBED_FUNC, VERIFY_FUNC, EMBED_BATCH_FUNC, VERIFY_BATCH_FUNC}) | GALLERY_FUNCTIONS
# Hard ceiling of the contract; workers enforce their own (ARCFACE_MAX_IMAGES_PER_JOB, default 256).
MAX_IMAGES_PER_JOB = 4096
ERROR_META_KEY = "error"  # job.meta[...] holds {"code", "message"} of a failed job
ERROR_ENTRY_FIELD = "error"  # the same JSON in a failed job's result-stream entry (a field rq does not read)
SERIALIZER = "producer.jobs.JSONSerializer"  # dotted path, for `rq worker --serializer`
JOB_CLASS = "producer.jobs.SafeJob"  # dotted path, for `rq worker --job-class`
# + queue: JSON {"model","dim","threshold","input_size","detect","started_at"}, set by workers.
MODEL_INFO_PREFIX = "arcface:model:"


def model_info_key(queue: str) -> str:
    """The Redis string where the workers of ``queue`` publish what they serve (see README "Wire format")."""
    return MODEL_INFO_PREFIX + queue


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


# --- requests --------------------------------------------------------------------------------------
class StrictModel(BaseModel):
    """Every request model: strict JSON types as the contract says ("0.5" or true is not a threshold, 1 is not a
    string), no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageRef(StrictModel):
    """An image, inline (``data_b64``: base64 of the encoded file) or as ``path`` relative to the
    workers' shared root. Exactly one of the two."""

    data_b64: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        if (self.data_b64 is None) == (self.path is None):
            raise ValueError("an image needs exactly one of data_b64 or path")
        return self

    @classmethod
    def inline(cls, data: bytes) -> "ImageRef":
        return cls(data_b64=base64.b64encode(data).decode("ascii"))

    def inline_bytes(self, limit: int) -> bytes:
        """Decode the inline image; :class:`JobFailure` when it is not base64 or exceeds ``limit`` bytes."""
        assert self.data_b64 is not None
        return inline_bytes(self.data_b64, limit)


Detect = Literal["none", "blazeface"]
M = TypeVar("M", bound=BaseModel)


class RequestBase(StrictModel):
    """What every job request that embeds carries besides its inputs (its fields come first on the wire)."""

    kind: str
    model: str | None = Field(default=None, description="the model the job is for; default: the worker's")
    detect: Detect | None = Field(default=None, description="find and align the face first; default: the worker's")
    ref: str | None = Field(default=None, max_length=1024, description="client reference, echoed back")


class EmbedRequest(RequestBase):
    kind: Literal["embed"] = "embed"
    image: ImageRef
    faces: Literal["one", "all"] | None = Field(
        default=None, description="with detection: 'all' embeds every face (largest first); default one"
    )


class VerifyRequest(RequestBase):
    kind: Literal["verify"] = "verify"
    a: ImageRef
    b: ImageRef
    threshold: float | None = Field(default=None, ge=0.0, le=2.0)


class EmbedBatchRequest(RequestBase):
    """Many images in one job: one engine pass for all of them, one result holding every embedding."""

    kind: Literal["embed_batch"] = "embed_batch"
    images: list[ImageRef] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB)


class Pair(StrictModel):
    a: ImageRef
    b: ImageRef


class VerifyBatchRequest(RequestBase):
    """Many pairs in one job; each pair is verified on its own, a bad image fails only its pair."""

    kind: Literal["verify_batch"] = "verify_batch"
    pairs: list[Pair] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB // 2)
    threshold: float | None = Field(default=None, ge=0.0, le=2.0)


AnyRequest = Union[EmbedRequest, VerifyRequest, EmbedBatchRequest, VerifyBatchRequest]
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
    from producer.gallery import images_for  # gallery kinds (enroll, identify, forget, verify against a subject)

    return images_for(request)


def _targets_gallery(b: Any) -> bool:
    """A verify job whose ``b`` is an enrolled subject or a given embedding (not an image)."""
    return isinstance(b, dict) and ("subject" in b or "embedding_b64" in b)


def func_for(request: AnyRequest | GalleryRequest) -> str:
    """The rq function path that runs ``request`` (any kind, gallery kinds included)."""
    if isinstance(request, (EmbedRequest, VerifyRequest, EmbedBatchRequest, VerifyBatchRequest)):
        return _FUNC_FOR_KIND[request.kind]
    from producer.gallery import gallery_func_for

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
        from producer.gallery import parse_gallery_request

        return parse_gallery_request(func_name, args, kwargs)  # type: ignore[return-value]  # a gallery request
    return validate_payload(_REQUEST_FOR_FUNC[func_name], args[0])


def check_arguments(args: Any, kwargs: Any) -> dict[str, Any]:
    """The one request dict of an rq job's arguments; ``invalid_payload`` for anything else."""
    if kwargs or not isinstance(args, (list, tuple)) or len(args) != 1 or not isinstance(args[0], dict):
        raise JobFailure(ErrorCode.INVALID_PAYLOAD, "job arguments must be exactly one JSON object (the request)")
    return args[0]


def validate_payload(model: type[M], payload: dict[str, Any]) -> M:
    """``payload`` as ``model``; ``invalid_payload`` naming the first field that is wrong."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise JobFailure(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']}") from None


# --- the rq job class both sides use -------------------------------------------------------------------
from rq.job import Job as _RqJob  # noqa: E402  (rq is a producer dependency; kept at the end for readability)


class SafeJob(_RqJob):
    """An rq ``Job`` that will only ever resolve our own job functions.

    rq imports whatever dotted path a job names; a job hand-written into Redis could name ``os.system``.
    Workers (ours and a plain ``rq worker --job-class producer.jobs.SafeJob``) use this class, so such a
    job fails with ``unsupported_job`` before anything is imported.
    """

    @property
    def func(self) -> Any:
        if self.func_name not in ALLOWED_FUNCTIONS or self.instance is not None:
            raise JobFailure(ErrorCode.UNSUPPORTED_JOB, f"function {self.func_name!r} is not an ArcFace job")
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
    "request_images",
    "resolve_shared_path",
    "validate_payload",
]
