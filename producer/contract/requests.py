"""The requests of the embedding jobs (embed, verify, embed_batch, verify_batch) and what every request model shares:
strict JSON types, image references, the fields every embedding request carries, and the validation both sides
run. The gallery requests build on these in :mod:`producer.contract.gallery`; :mod:`producer.contract.wire`
dispatches over both.
"""

from __future__ import annotations

import base64
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from producer.contract.codes import ErrorCode, JobFailure, inline_bytes

# Hard ceiling of the contract; workers enforce their own (ARCFACE_MAX_IMAGES_PER_JOB, default 256).
MAX_IMAGES_PER_JOB = 4096


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
