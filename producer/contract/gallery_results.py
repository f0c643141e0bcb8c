"""The typed results and errors of the gallery jobs (what :func:`parse_gallery_result` reads back from rq's
result stream, what a failed gallery job stores) and the listing records (:class:`GalleryInfo`, :class:`SubjectInfo`).

:mod:`producer.contract.gallery` re-exports every name.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, Field

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.errors import JobNotFound
from producer.contract.results import ItemError, ItemsResult, ResultBase, VerifyResult

if TYPE_CHECKING:
    from producer.client.face_client import FaceClient


class GalleryErrorCode(str, enum.Enum):
    """Error codes of the gallery jobs (to be merged into :class:`producer.contract.codes.ErrorCode`)."""

    UNKNOWN_GALLERY = "unknown_gallery"
    UNKNOWN_SUBJECT = "unknown_subject"
    GALLERY_MODEL_MISMATCH = "gallery_model_mismatch"
    ENROLLMENT_CONFLICT = "enrollment_conflict"


AnyErrorCode = Union[ErrorCode, GalleryErrorCode]


def error_code(value: str) -> ErrorCode:
    """The contract's member for ``value``: :class:`ErrorCode` holds the gallery codes too."""
    return ErrorCode(value)


class GalleryJobError(BaseModel):
    """A failure's stored form (``job.meta['error']``), accepting the gallery codes too."""

    code: AnyErrorCode
    message: str


class GalleryFailure(JobFailure):
    """A :class:`JobFailure` whose code may be a gallery code; stores as ``{"code", "message"}`` like any other."""

    def __init__(self, code: AnyErrorCode | str, message: str) -> None:
        super().__init__(error_code(code.value if isinstance(code, enum.Enum) else code), message)


class EnrollResult(ResultBase):
    kind: Literal["enroll"] = "enroll"
    gallery: str
    subject: str
    enrollment_id: str
    created: bool = Field(description="false when this enrollment id was already stored (nothing changed)")
    subject_enrollments: int = Field(description="the subject's enrollments after this job")
    dim: int
    face: dict[str, Any] | None = None


class Enrolled(BaseModel):
    """One stored item of an ``enroll_batch`` job."""

    subject: str
    enrollment_id: str
    created: bool
    subject_enrollments: int


class GalleryItemError(ItemError):
    """Why one item of a multi-item gallery job failed (by index); the other items are unaffected."""

    code: AnyErrorCode  # type: ignore[assignment]  # widened: gallery codes too


class EnrollBatchResult(ItemsResult[Enrolled, GalleryItemError]):
    kind: Literal["enroll_batch"] = "enroll_batch"
    gallery: str
    dim: int
    faces: list[dict[str, Any] | None] | None = None


class Match(BaseModel):
    """One subject an identify job found within its threshold."""

    subject: str
    distance: float = Field(description="cosine distance to the subject's closest enrollment")
    enrollment_id: str = Field(description="that closest enrollment")


class IdentifyResult(ResultBase):
    """An identify job's answer: the closest subjects of the gallery (1:N)."""

    kind: Literal["identify"] = "identify"
    gallery: str
    matches: list[Match] = Field(description="at most top_k subjects within the threshold, closest first")
    top_k: int
    threshold: float
    searched: int = Field(description="enrollments searched")
    face: dict[str, Any] | None = None


class ForgetResult(BaseModel):
    """What a forget job removed (a subject, or one of its enrollments)."""

    kind: Literal["forget"] = "forget"
    gallery: str
    subject: str
    enrollment_id: str | None = None
    removed: int = Field(description="enrollments deleted (0: there was nothing to delete)")
    subject_enrollments: int = Field(description="the subject's enrollments left")
    ref: str | None = None


class VerifySubjectResult(VerifyResult):
    """A verify result against an enrolled subject: the distance to the subject's closest enrollment."""

    subject: str
    gallery: str
    enrollment_id: str = Field(description="the subject's closest enrollment")
    enrollments: int = Field(description="the subject's enrollments compared")


GalleryResult = Union[EnrollResult, EnrollBatchResult, IdentifyResult, VerifySubjectResult, VerifyResult, ForgetResult]


def parse_gallery_result(value: Any) -> GalleryResult:
    """Turn a stored rq return value of a gallery job (or a verify job) back into its typed result."""
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "enroll":
        return EnrollResult.model_validate(value)
    if kind == "enroll_batch":
        return EnrollBatchResult.model_validate(value)
    if kind == "identify":
        return IdentifyResult.model_validate(value)
    if kind == "forget":
        return ForgetResult.model_validate(value)
    if kind == "verify":
        return (VerifySubjectResult if "subject" in value else VerifyResult).model_validate(value)
    raise ValueError(f"not a gallery job result: {str(value)[:80]!r}")


# --- listing (read from Redis, no job) ---------------------------------------------------------------
class GalleryInfo(BaseModel):
    """A gallery as stored: its binding and counts."""

    name: str
    model: str
    dim: int
    created_at: float
    subjects: int
    enrollments: int


class SubjectInfo(BaseModel):
    subject: str
    enrollments: int


# --- reading a result back -----------------------------------------------------------------------------
_GALLERY_RESULTS = (EnrollResult, EnrollBatchResult, IdentifyResult, VerifyResult, ForgetResult)


def result(client: FaceClient, job_id: str, timeout: float | None = None) -> GalleryResult:
    """Block until a gallery job (or a verify job) finishes and return its typed result: :meth:`FaceClient.result
    <producer.client.FaceClient.result>` (same errors; :class:`~producer.contract.errors.JobFailed`'s ``code`` may be a
    gallery code), and :class:`~producer.contract.errors.JobNotFound` for a job of another kind."""
    res = client.result(job_id, timeout)
    if not isinstance(res, _GALLERY_RESULTS):
        raise JobNotFound(job_id, f"job {job_id} finished with a value that is not a gallery or verify result")
    return res
