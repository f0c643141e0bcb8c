"""The job contract, shared by producers and workers: job kinds, image references, typed results and
errors, the wire serializer, and the Redis names we own.

Nothing here imports TensorFlow or rq's worker side, so a backend service can depend on it alone.

Wire format (what a non-Python producer writes; see README "Wire format"): an rq job hash whose ``data``
field is the UTF-8 JSON array ``[func_name, null, [payload], {}]``, with ``func_name`` one of
:data:`ALLOWED_FUNCTIONS` and ``payload`` an :class:`EmbedRequest` or :class:`VerifyRequest` as JSON.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
GALLERY_FUNCTIONS = frozenset(
    {ENROLL_FUNC, ENROLL_BATCH_FUNC, IDENTIFY_FUNC, FORGET_FUNC}
)  # producer.gallery; verify also takes a subject
ALLOWED_FUNCTIONS = frozenset({EMBED_FUNC, VERIFY_FUNC, EMBED_BATCH_FUNC, VERIFY_BATCH_FUNC}) | GALLERY_FUNCTIONS
MAX_IMAGES_PER_JOB = (
    4096  # hard ceiling of the contract; workers enforce their own (ARCFACE_MAX_IMAGES_PER_JOB, default 256)
)
ERROR_META_KEY = "error"  # job.meta[...] holds {"code", "message"} of a failed job
SERIALIZER = "producer.jobs.JSONSerializer"  # dotted path, for `rq worker --serializer`
JOB_CLASS = "producer.jobs.SafeJob"  # dotted path, for `rq worker --job-class`
MODEL_INFO_PREFIX = (
    "arcface:model:"  # + queue: JSON {"model","dim","threshold","input_size","detect","started_at"}, set by workers
)


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


# --- errors ----------------------------------------------------------------------------------------
class ErrorCode(str, enum.Enum):
    """Stable error codes a failed job carries (``job.meta['error']['code']``)."""

    IMAGE_DECODE_ERROR = "image_decode_error"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    PATH_NOT_ALLOWED = "path_not_allowed"
    UNSUPPORTED_JOB = "unsupported_job"
    INVALID_PAYLOAD = "invalid_payload"
    UNKNOWN_MODEL = "unknown_model"
    NO_FACE_DETECTED = "no_face_detected"
    UNKNOWN_GALLERY = "unknown_gallery"
    UNKNOWN_SUBJECT = "unknown_subject"
    GALLERY_MODEL_MISMATCH = "gallery_model_mismatch"
    ENROLLMENT_CONFLICT = "enrollment_conflict"
    JOB_TIMEOUT = "job_timeout"
    WORKER_DIED = "worker_died"
    INTERNAL_ERROR = "internal_error"


class JobError(BaseModel):
    """A typed failure: a stable ``code`` and a message a person can act on."""

    code: ErrorCode
    message: str


class JobFailure(Exception):
    """Raised by worker code when one job cannot be done; carries the :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"[{code.value}] {message}")
        self.code = code
        self.message = message

    def to_error(self) -> JobError:
        return JobError(code=self.code, message=self.message)


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
class _Strict(BaseModel):
    # strict: JSON types as the contract says ("0.5" or true is not a threshold, 1 is not a string)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ImageRef(_Strict):
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
        if len(self.data_b64) > (limit * 4) // 3 + 4:
            raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"inline image is over the {limit}-byte limit")
        try:
            data = base64.b64decode(self.data_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise JobFailure(ErrorCode.INVALID_PAYLOAD, f"image data_b64 is not valid base64: {exc}") from None
        if len(data) > limit:
            raise JobFailure(
                ErrorCode.IMAGE_TOO_LARGE, f"inline image has {len(data)} bytes, over the {limit}-byte limit"
            )
        return data


Detect = Literal["none", "blazeface"]


class EmbedRequest(_Strict):
    kind: Literal["embed"] = "embed"
    image: ImageRef
    model: str | None = None
    detect: Detect | None = Field(
        default=None, description="find and align the face first; default: the worker's setting"
    )
    faces: Literal["one", "all"] = Field(
        default="one", description="with detection: 'all' embeds every face (largest first)"
    )
    ref: str | None = Field(default=None, max_length=1024, description="client reference, echoed back")


class VerifyRequest(_Strict):
    kind: Literal["verify"] = "verify"
    a: ImageRef
    b: ImageRef
    model: str | None = None
    detect: Detect | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=2.0)
    ref: str | None = Field(default=None, max_length=1024)


class EmbedBatchRequest(_Strict):
    """Many images in one job: one engine pass for all of them, one result holding every embedding."""

    kind: Literal["embed_batch"] = "embed_batch"
    images: list[ImageRef] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB)
    model: str | None = None
    detect: Detect | None = None
    ref: str | None = Field(default=None, max_length=1024)


class Pair(_Strict):
    a: ImageRef
    b: ImageRef


class VerifyBatchRequest(_Strict):
    """Many pairs in one job; each pair is verified on its own, a bad image fails only its pair."""

    kind: Literal["verify_batch"] = "verify_batch"
    pairs: list[Pair] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB // 2)
    model: str | None = None
    detect: Detect | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=2.0)
    ref: str | None = Field(default=None, max_length=1024)


AnyRequest = Union[EmbedRequest, VerifyRequest, EmbedBatchRequest, VerifyBatchRequest]
JobRequest = Annotated[AnyRequest, Field(discriminator="kind")]
_FUNC_FOR_KIND = {
    "embed": EMBED_FUNC,
    "verify": VERIFY_FUNC,
    "embed_batch": EMBED_BATCH_FUNC,
    "verify_batch": VERIFY_BATCH_FUNC,
}
_REQUEST_FOR_FUNC: dict[str, type[BaseModel]] = {
    EMBED_FUNC: EmbedRequest,
    VERIFY_FUNC: VerifyRequest,
    EMBED_BATCH_FUNC: EmbedBatchRequest,
    VERIFY_BATCH_FUNC: VerifyBatchRequest,
}


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


def func_for(request: AnyRequest) -> str:
    """The rq function path that runs ``request``."""
    if request.kind in ("enroll", "enroll_batch", "identify", "forget") or not isinstance(
        getattr(request, "b", None), (ImageRef, type(None))
    ):
        from producer.gallery import gallery_func_for

        return gallery_func_for(request)  # type: ignore[arg-type]
    return _FUNC_FOR_KIND[request.kind]


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
    if kwargs or not isinstance(args, (list, tuple)) or len(args) != 1 or not isinstance(args[0], dict):
        raise JobFailure(ErrorCode.INVALID_PAYLOAD, "job arguments must be exactly one JSON object (the request)")
    if func_name in GALLERY_FUNCTIONS or (func_name == VERIFY_FUNC and _targets_gallery(args[0].get("b"))):
        from producer.gallery import parse_gallery_request

        return parse_gallery_request(func_name, args, kwargs)  # type: ignore[return-value]
    model = _REQUEST_FOR_FUNC[func_name]
    try:
        return model.model_validate(args[0])  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise JobFailure(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']}") from None


# --- results ---------------------------------------------------------------------------------------
class Timing(BaseModel):
    """Observability fields: time in queue, the batch the job ran in, and the model's share."""

    queued_ms: float = 0.0
    batch_size: int = 1
    preprocess_ms: float = 0.0
    detect_ms: float = 0.0
    inference_ms: float = 0.0


def encode_embedding(vector: np.ndarray) -> str:
    """Base64 of little-endian float32: 2,732 characters for a 512-d embedding."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_embedding(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4").astype(np.float32)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - a.b`` for L2-normalised embeddings (0 same direction, 1 orthogonal, 2 opposite)."""
    return float(1.0 - np.dot(np.asarray(a, np.float64), np.asarray(b, np.float64)))


class FaceEmbedding(BaseModel):
    """One detected face of an image and its embedding (``faces: "all"``)."""

    box: list[float]
    keypoints: list[list[float]] = Field(default_factory=list)
    score: float
    embedding_b64: str

    @property
    def embedding(self) -> np.ndarray:
        return decode_embedding(self.embedding_b64)


class EmbedResult(BaseModel):
    kind: Literal["embed"] = "embed"
    embedding_b64: str = Field(description="L2-normalised embedding, base64 of little-endian float32")
    dim: int
    model: str
    ref: str | None = None
    face: dict | None = Field(default=None, description="with detection: box [x1,y1,x2,y2], keypoints, score")
    faces: list[FaceEmbedding] | None = Field(
        default=None, description="with faces='all': every face, largest first (the first is `face`)"
    )
    timing: Timing = Field(default_factory=Timing)

    @property
    def embedding(self) -> np.ndarray:
        """The embedding as a float32 numpy vector of length :attr:`dim`."""
        return decode_embedding(self.embedding_b64)


class VerifyResult(BaseModel):
    kind: Literal["verify"] = "verify"
    distance: float = Field(description="cosine distance 1 - a.b of the L2-normalised embeddings")
    threshold: float
    similar: bool = Field(description="distance <= threshold")
    model: str
    ref: str | None = None
    face_a: dict | None = None
    face_b: dict | None = None
    timing: Timing = Field(default_factory=Timing)


class ItemError(BaseModel):
    """Why one item (image or pair) of a multi-item job failed; the other items are unaffected."""

    index: int
    code: ErrorCode
    message: str


def encode_matrix(rows: np.ndarray) -> str:
    """Base64 of an N x D little-endian float32 matrix, row-major."""
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode("ascii")


class EmbedBatchResult(BaseModel):
    kind: Literal["embed_batch"] = "embed_batch"
    count: int = Field(description="number of images in the job (rows of the matrix)")
    dim: int
    embeddings_b64: str = Field(
        description="count x dim little-endian float32, row-major; rows of failed items are zero"
    )
    errors: list[ItemError] = Field(default_factory=list, description="one entry per failed image, by index")
    model: str
    ref: str | None = None
    faces: list[dict | None] | None = Field(default=None, description="with detection: the face used for each image")
    timing: Timing = Field(default_factory=Timing)

    @property
    def embeddings(self) -> np.ndarray:
        """All embeddings as a ``[count, dim]`` float32 array (zero rows where :attr:`errors` has the index)."""
        flat = np.frombuffer(base64.b64decode(self.embeddings_b64), dtype="<f4").astype(np.float32)
        return flat.reshape(self.count, self.dim)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the images that were embedded."""
        mask = np.ones(self.count, dtype=bool)
        mask[[e.index for e in self.errors]] = False
        return mask


class PairResult(BaseModel):
    distance: float
    similar: bool


class VerifyBatchResult(BaseModel):
    kind: Literal["verify_batch"] = "verify_batch"
    count: int
    threshold: float
    results: list[PairResult | None] = Field(
        description="one per pair, in order; null where the pair failed (see errors)"
    )
    errors: list[ItemError] = Field(default_factory=list, description="one entry per failed pair, by pair index")
    model: str
    ref: str | None = None
    timing: Timing = Field(default_factory=Timing)


AnyResult = Union[EmbedResult, VerifyResult, EmbedBatchResult, VerifyBatchResult]
JobResult = Annotated[AnyResult, Field(discriminator="kind")]
_RESULT_FOR_KIND: dict[str, type[BaseModel]] = {
    "embed": EmbedResult,
    "verify": VerifyResult,
    "embed_batch": EmbedBatchResult,
    "verify_batch": VerifyBatchResult,
}


def parse_result(value: Any) -> AnyResult:
    """Turn a stored rq return value back into its typed result."""
    if isinstance(value, dict) and (
        value.get("kind") in ("enroll", "enroll_batch", "identify", "forget")
        or (value.get("kind") == "verify" and "subject" in value)
    ):
        from producer.gallery import parse_gallery_result

        return parse_gallery_result(value)  # type: ignore[return-value]
    if not isinstance(value, dict) or value.get("kind") not in _RESULT_FOR_KIND:
        raise ValueError(f"not an ArcFace job result: {str(value)[:80]!r}")
    return _RESULT_FOR_KIND[value["kind"]].model_validate(value)  # type: ignore[return-value]


# --- the rq job class both sides use -------------------------------------------------------------------
from rq.job import Job as _RqJob  # noqa: E402  (rq is a producer dependency; kept at the end for readability)


class SafeJob(_RqJob):
    """An rq ``Job`` that will only ever resolve our own job functions.

    rq imports whatever dotted path a job names; a job hand-written into Redis could name ``os.system``.
    Workers (ours and a plain ``rq worker --job-class producer.jobs.SafeJob``) use this class, so such a
    job fails with ``unsupported_job`` before anything is imported.
    """

    @property
    def func(self) -> Any:  # type: ignore[override]
        if self.func_name not in ALLOWED_FUNCTIONS or self.instance is not None:
            raise JobFailure(ErrorCode.UNSUPPORTED_JOB, f"function {self.func_name!r} is not an ArcFace job")
        return super().func
