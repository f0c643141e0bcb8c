"""The error vocabulary of the job contract: the stable codes a failed job (or a failed item of a
multi-item job) carries, and the ``{"code", "message"}`` record a failure is stored as.

Also :class:`JobFailure`, the exception worker code raises with a code. Imported by :mod:`producer.contract.wire` (which
re-exports these names) and :mod:`producer.contract.results`; it imports
nothing of the project, so neither needs the other to load.
"""

from __future__ import annotations

import base64
import binascii
import enum

from pydantic import BaseModel


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

    def __reduce__(self) -> tuple[type[JobFailure], tuple[ErrorCode, str]]:  # pickles with both arguments
        return (type(self), (self.code, self.message))

    def to_error(self) -> JobError:
        return JobError(code=self.code, message=self.message)


def inline_bytes(data_b64: str, limit: int) -> bytes:
    """Decode an inline image's base64; :class:`JobFailure` when it is not base64 or exceeds ``limit`` bytes."""
    if len(data_b64) > (limit * 4) // 3 + 4:
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"inline image is over the {limit}-byte limit")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise JobFailure(ErrorCode.INVALID_PAYLOAD, f"image data_b64 is not valid base64: {exc}") from None
    if len(data) > limit:
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"inline image has {len(data)} bytes, over the {limit}-byte limit")
    return data
