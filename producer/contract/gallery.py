"""The enrolled-identities contract: gallery key names in Redis, the events stream, job kinds (``enroll``,
``identify``, ``verify`` against a subject or an embedding, ``forget``), typed results and error codes.

Like :mod:`producer.contract.wire`, nothing here imports TensorFlow or rq's worker side.

Data model. A *gallery* (a name) is bound to one model name and embedding dimension by its first enrollment;
it holds *subjects* (any id string: a user id, an e-mail); a subject holds one or more *enrollments*, each an
L2-normalised embedding with an enrollment id (unique within the gallery), a timestamp and optional metadata.

Redis layout (all durable with the queue's own persistence; ``<g>`` a gallery, ``<s>`` a subject):

=====================================  ======  =============================================================
key                                    type    content
=====================================  ======  =============================================================
``arcface:galleries``                  set     gallery names
``arcface:gallery:<g>``                hash    ``model``, ``dim``, ``created_at`` (the gallery's binding)
``arcface:gallery:<g>:subjects``       hash    subject -> number of enrollments
``arcface:gallery:<g>:subject:<s>``    set     the subject's enrollment ids
``arcface:gallery:<g>:embeddings``     hash    enrollment id -> embedding, raw little-endian float32 bytes
``arcface:gallery:<g>:enrollments``    hash    enrollment id -> JSON ``{"subject", "enrolled_at", "meta"}``
``arcface:gallery-events``             stream  one entry per change (below), trimmed to about
                                               :data:`EVENTS_MAXLEN` entries
``arcface:gallery-events:seq``         string  the sequence number of the last event
=====================================  ======  =============================================================

Events (stream fields; every change is written together with its event in one Lua script, so the
``seq`` field numbers the events without gaps): ``seq``, ``op`` (``enroll`` / ``forget``), ``gallery``,
``subject``; for ``enroll`` also ``eid``, ``model``, ``dim`` and ``vec`` (the raw float32 embedding);
for ``forget`` ``eids``, a JSON list of the enrollment ids removed. A worker that sees a sequence number
other than the next one (events trimmed while it was away, a Redis that lost writes) reloads everything.

Wire format of the jobs (same rq envelope as embed/verify, see docs/wire-format.md)::

    ["worker.jobs.enroll", null, [{"kind": "enroll", "image": {...}, "subject": "alice", "gallery": "staff"}], {}]
    ["worker.jobs.enroll_batch", null, [{"kind": "enroll_batch", "gallery": "staff",
                                         "items": [{"image": {...}, "subject": "alice"}, ...]}], {}]
    ["worker.jobs.identify", null, [{"kind": "identify", "image": {...}, "gallery": "staff", "top_k": 5}], {}]
    ["worker.jobs.verify", null, [{"kind": "verify", "a": {...}, "b": {"subject": "alice", "gallery": "staff"}}], {}]
    ["worker.jobs.verify", null, [{"kind": "verify", "a": {...}, "b": {"embedding_b64": "..."}}], {}]
    ["worker.jobs.forget", null, [{"kind": "forget", "subject": "alice", "gallery": "staff"}], {}]
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import AfterValidator, Field, field_validator

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.keys import (
    DEFAULT_GALLERY,
    ENROLL_BATCH_FUNC,
    ENROLL_FUNC,
    FORGET_FUNC,
    IDENTIFY_FUNC,
    VERIFY_FUNC,
)
from producer.contract.requests import ImageRef, RequestBase, StrictModel, check_arguments, validate_payload

# --- job functions: ENROLL_FUNC, ENROLL_BATCH_FUNC, ... are in producer.contract.wire (one allow-list) ----------------
MAX_ENROLL_ITEMS = 1024  # contract ceiling of one enroll_batch job (workers may enforce a lower images-per-job limit)


# --- names -----------------------------------------------------------------------------------------
_GALLERY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_META_BYTES = 4096


def _check_id(value: str, what: str) -> str:
    if not value or len(value) > 256 or _CONTROL.search(value) or value != value.strip():
        raise ValueError(f"{what} must be 1-256 characters without control characters or surrounding spaces")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800", or bytes that are not UTF-8 on a command line)
        raise ValueError(
            f"{what} is not valid Unicode text: it holds a lone surrogate at character {exc.start}; send UTF-8 text"
        ) from None
    return value


def _check_subject(value: str) -> str:
    return _check_id(value, "subject")


def _check_enrollment_id(value: str) -> str:
    return _check_id(value, "enrollment_id")


def _check_meta(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value, separators=(",", ":"))) > MAX_META_BYTES:
        raise ValueError(f"meta is over {MAX_META_BYTES} bytes as JSON")
    return value


SubjectId = Annotated[str, AfterValidator(_check_subject)]
EnrollmentId = Annotated[str, AfterValidator(_check_enrollment_id)]
Meta = Annotated[dict[str, Any], AfterValidator(_check_meta)]


class _GalleryField(StrictModel):
    gallery: str = Field(default=DEFAULT_GALLERY, description="letters, digits, _ . @ -; at most 64, no ':'")

    @field_validator("gallery")
    @classmethod
    def _gallery_name(cls, value: str) -> str:
        if not _GALLERY_NAME.match(value):
            raise ValueError("gallery names are 1-64 of A-Z a-z 0-9 _ . @ - (starting with a letter or digit)")
        return value


# --- verify targets ----------------------------------------------------------------------------------
class SubjectRef(_GalleryField):
    """``b`` of a verify job: compare ``a`` with the closest enrollment of an enrolled subject."""

    subject: SubjectId


class EmbeddingRef(StrictModel):
    """``b`` of a verify job: compare ``a`` with a given embedding (base64 of little-endian float32, e.g. an
    earlier embed result's ``embedding_b64``). It is L2-normalised before use."""

    embedding_b64: str = Field(max_length=65536)

    @field_validator("embedding_b64")
    @classmethod
    def _decodes(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("embedding_b64 is not valid base64") from None
        if not raw or len(raw) % 4:
            raise ValueError(f"embedding_b64 holds {len(raw)} bytes, not a whole number of float32 values")
        vec = np.frombuffer(raw, "<f4")
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise ValueError("embedding_b64 must be finite and not all zero")
        return value

    @property
    def vector(self) -> np.ndarray:
        """The embedding, float32, L2-normalised."""
        vec = np.frombuffer(base64.b64decode(self.embedding_b64), "<f4").astype(np.float32)
        return vec / np.float32(np.linalg.norm(vec.astype(np.float64)))


VerifyTarget = Union[ImageRef, SubjectRef, EmbeddingRef]


# --- requests --------------------------------------------------------------------------------------
class EnrollRequest(_GalleryField, RequestBase):
    """Embed ``image`` and store it under ``subject`` in ``gallery``.

    Idempotent by ``enrollment_id``: the same id again is a no-op (``created: false``); the same id for a
    different subject fails with ``enrollment_conflict``. Without an id the worker uses one derived from the
    subject and the embedding, so re-running the job (or enrolling the same image again) changes nothing.
    """

    kind: Literal["enroll"] = "enroll"
    image: ImageRef
    subject: SubjectId
    enrollment_id: EnrollmentId | None = None
    meta: Meta | None = Field(
        default=None, description=f"JSON object stored with the enrollment, at most {MAX_META_BYTES} bytes"
    )


class EnrollItem(StrictModel):
    """One image of an ``enroll_batch`` job (same fields and rules as :class:`EnrollRequest`)."""

    image: ImageRef
    subject: SubjectId
    enrollment_id: EnrollmentId | None = None
    meta: Meta | None = None


class EnrollBatchRequest(_GalleryField, RequestBase):
    """Many enrollments into one gallery in one job (bulk enrollment): one engine pass for all the images;
    each item is enrolled on its own, a bad image fails only its item."""

    kind: Literal["enroll_batch"] = "enroll_batch"
    items: list[EnrollItem] = Field(min_length=1, max_length=MAX_ENROLL_ITEMS)


class IdentifyRequest(_GalleryField, RequestBase):
    """Search ``gallery`` for the ``top_k`` subjects closest to the face in ``image`` (1:N), keeping only
    those within ``threshold`` (default: the worker's verify threshold)."""

    kind: Literal["identify"] = "identify"
    image: ImageRef
    top_k: int = Field(default=5, ge=1, le=100)
    threshold: float | None = Field(default=None, ge=0.0, le=2.0)


class GalleryVerifyRequest(RequestBase):
    """``verify`` with ``b`` widened: an image (pairwise verify, as
    :class:`producer.contract.requests.VerifyRequest`), an
    enrolled subject (:class:`SubjectRef`) or an embedding (:class:`EmbeddingRef`). Not a subclass of
    ``VerifyRequest``: code that takes ``b`` of a ``VerifyRequest`` for an image must never get a subject."""

    kind: Literal["verify"] = "verify"
    a: ImageRef
    b: VerifyTarget
    threshold: float | None = Field(default=None, ge=0.0, le=2.0)


class ForgetRequest(_GalleryField):
    """Delete a subject (every enrollment) or, with ``enrollment_id``, one enrollment. Idempotent: forgetting
    what is not there succeeds with ``removed: 0``."""

    kind: Literal["forget"] = "forget"
    subject: SubjectId
    enrollment_id: EnrollmentId | None = None
    ref: str | None = Field(default=None, max_length=1024)


def enrollment_id_for(request: EnrollRequest | EnrollItem) -> str:
    """The request's ``enrollment_id``, or one derived from the subject and the image reference (its bytes or
    its path), so a re-run job or the same image enrolled again for the same subject is the same enrollment."""
    if request.enrollment_id is not None:
        return request.enrollment_id
    digest = hashlib.sha256(
        request.subject.encode("utf-8")
        + b"\0"
        + (request.image.data_b64 or "path:" + (request.image.path or "")).encode()
    )
    return "e-" + digest.hexdigest()[:32]


GalleryRequest = Union[EnrollRequest, EnrollBatchRequest, IdentifyRequest, GalleryVerifyRequest, ForgetRequest]
_MODEL_FOR_FUNC: dict[str, type[GalleryRequest]] = {
    ENROLL_FUNC: EnrollRequest,
    ENROLL_BATCH_FUNC: EnrollBatchRequest,
    IDENTIFY_FUNC: IdentifyRequest,
    FORGET_FUNC: ForgetRequest,
    VERIFY_FUNC: GalleryVerifyRequest,
}
_FUNC_FOR_KIND = {model.model_fields["kind"].default: func for func, model in _MODEL_FOR_FUNC.items()}


def gallery_func_for(request: GalleryRequest) -> str:
    """The rq function path that runs ``request``."""
    return _FUNC_FOR_KIND[request.kind]


def parse_gallery_request(func_name: str | None, args: Any, kwargs: Any) -> GalleryRequest:
    """Validate an rq job of a gallery kind (or a verify job, with ``b`` widened); same rules and codes as
    :func:`producer.contract.wire.parse_request`."""
    model = _MODEL_FOR_FUNC.get(func_name or "")
    if model is None:
        raise JobFailure(
            ErrorCode.UNSUPPORTED_JOB,
            f"function {func_name!r} is not a gallery job; allowed: {sorted(_MODEL_FOR_FUNC)}",
        )
    return validate_payload(model, check_arguments(args, kwargs))


def images_for(request: Any) -> list[ImageRef]:
    """The images a job needs embedded, in the order :func:`complete` expects their embeddings: enroll and
    identify their ``image``; enroll_batch each item's; verify ``a`` (and ``b`` when ``b`` is an image);
    forget none."""
    if isinstance(request, (EnrollRequest, IdentifyRequest)):
        return [request.image]
    if isinstance(request, EnrollBatchRequest):
        return [it.image for it in request.items]
    if isinstance(request, GalleryVerifyRequest):
        return [request.a, request.b] if isinstance(request.b, ImageRef) else [request.a]
    if isinstance(request, ForgetRequest):
        return []
    raise JobFailure(ErrorCode.UNSUPPORTED_JOB, f"{type(request).__name__} is not a gallery job")


__all__ = [
    "GalleryRequest",
    "VerifyTarget",
    "EnrollBatchRequest",
    "EnrollItem",
    "MAX_ENROLL_ITEMS",
    "EmbeddingRef",
    "EnrollRequest",
    "ForgetRequest",
    "GalleryVerifyRequest",
    "IdentifyRequest",
    "SubjectRef",
    "enrollment_id_for",
    "images_for",
    "parse_gallery_request",
]
