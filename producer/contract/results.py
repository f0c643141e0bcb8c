"""The typed results of the job contract: what a worker stores as a job's return value (JSON through
:class:`~producer.contract.rqjob.JSONSerializer`) and
:func:`producer.contract.wire.parse_result` reads back, with the embedding encodings.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, Union

import numpy as np
from pydantic import BaseModel, Field

from producer.contract.codes import ErrorCode


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


PRECISION_DOC = (
    "the arithmetic the model computed in: float32, bfloat16 or float16 (last on the wire; null from older workers "
    "and gallery jobs)"
)


class ResultBase(BaseModel):
    """What every embedding job's result carries besides its answer (these fields come first on the wire)."""

    kind: str
    model: str = Field(description="the model that computed it")
    ref: str | None = Field(default=None, description="the request's ref, echoed back")
    timing: Timing = Field(default_factory=Timing)


class _Embedding:
    """The ``embedding`` of a model with an ``embedding_b64`` field (a mixin with no fields: field order, which is
    the JSON's key order, stays the model's own)."""

    if TYPE_CHECKING:  # declared for the type checker only: pydantic would make it a field of the mixin, first
        embedding_b64: str

    @property
    def embedding(self) -> np.ndarray:
        """The embedding as a float32 numpy vector."""
        return decode_embedding(self.embedding_b64)


class FaceEmbedding(_Embedding, BaseModel):
    """One detected face of an image and its embedding (``faces: "all"``)."""

    box: list[float]
    keypoints: list[list[float]] = Field(default_factory=list)
    score: float
    embedding_b64: str


class EmbedResult(_Embedding, ResultBase):
    kind: Literal["embed"] = "embed"
    embedding_b64: str = Field(description="L2-normalised embedding, base64 of little-endian float32")
    dim: int
    face: dict[str, Any] | None = Field(default=None, description="with detection: box [x1,y1,x2,y2], keypoints, score")
    faces: list[FaceEmbedding] | None = Field(
        default=None, description="with faces='all': every face, largest first (the first is `face`)"
    )
    precision: str | None = Field(default=None, description=PRECISION_DOC)


class VerifyResult(ResultBase):
    kind: Literal["verify"] = "verify"
    distance: float = Field(description="cosine distance 1 - a.b of the L2-normalised embeddings")
    threshold: float
    similar: bool = Field(description="distance <= threshold")
    face_a: dict[str, Any] | None = None
    face_b: dict[str, Any] | None = None
    precision: str | None = Field(default=None, description=PRECISION_DOC)


class ItemError(BaseModel):
    """Why one item (image or pair) of a multi-item job failed; the other items are unaffected."""

    index: int
    code: ErrorCode
    message: str


def encode_matrix(rows: np.ndarray) -> str:
    """Base64 of an N x D little-endian float32 matrix, row-major."""
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f4").tobytes()).decode("ascii")


class EmbedBatchResult(ResultBase):
    kind: Literal["embed_batch"] = "embed_batch"
    count: int = Field(description="number of images in the job (rows of the matrix)")
    dim: int
    embeddings_b64: str = Field(
        description="count x dim little-endian float32, row-major; rows of failed items are zero"
    )
    errors: list[ItemError] = Field(default_factory=list, description="one entry per failed image, by index")
    faces: list[dict[str, Any] | None] | None = Field(
        default=None, description="with detection: the face used for each image"
    )
    precision: str | None = Field(default=None, description=PRECISION_DOC)

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


R = TypeVar("R")
E = TypeVar("E", bound=ItemError)


class ItemsResult(ResultBase, Generic[R, E]):
    """A multi-item job's result: one entry per item, null where the item failed and ``errors`` says why."""

    count: int
    results: list[R | None] = Field(description="one per item, in order; null where the item failed (see errors)")
    errors: list[E] = Field(default_factory=list, description="one entry per failed item, by item index")


class VerifyBatchResult(ItemsResult[PairResult, ItemError]):
    kind: Literal["verify_batch"] = "verify_batch"
    threshold: float
    precision: str | None = Field(default=None, description=PRECISION_DOC)


AnyResult = Union[EmbedResult, VerifyResult, EmbedBatchResult, VerifyBatchResult]
_RESULT_FOR_KIND: dict[str, type[AnyResult]] = {
    m.model_fields["kind"].default: m for m in (EmbedResult, VerifyResult, EmbedBatchResult, VerifyBatchResult)
}


def parse_embedding_result(value: Any) -> AnyResult:
    """Turn a stored rq return value of an embedding job back into its typed result (any kind:
    :func:`producer.contract.wire.parse_result`)."""
    if not isinstance(value, dict) or value.get("kind") not in _RESULT_FOR_KIND:
        raise ValueError(f"not an ArcFace job result: {str(value)[:80]!r}")
    return _RESULT_FOR_KIND[value["kind"]].model_validate(value)
