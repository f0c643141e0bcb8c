"""The keyword options every enqueueing call takes (:class:`JobOptions`), and :func:`build`, which makes a
contract model from keyword fields and turns pydantic's refusal into an :class:`~producer.contract.errors.InputError`.

Used by :class:`~producer.client.FaceClient` and :mod:`producer.client.gallery`; ``producer.client``
re-exports :class:`JobOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

from pydantic import BaseModel, ValidationError

from producer.contract.codes import ErrorCode
from producer.contract.errors import InputError

M = TypeVar("M", bound=BaseModel)


class JobOptions(TypedDict, total=False):
    """The keyword options every enqueueing call takes; all optional."""

    model: str | None  # the model the job needs: a worker serving another fails it with ``unknown_model``
    detect: str | None  # "none" / "blazeface": overrides the worker's ARCFACE_DETECT for this job
    ref: str | None  # a client reference (up to 1024 characters), echoed in the result
    as_path: bool  # send a path image as a path under the shared root (ARCFACE_SHARED_ROOT), not its bytes
    job_id: str | None  # enqueue under this id (1-128 letters, digits, '_' or '-'); default: a new one


@dataclass(frozen=True)
class Options:
    """:class:`JobOptions` with their defaults (an unknown keyword is a ``TypeError``, as for any call)."""

    model: str | None = None
    detect: str | None = None
    ref: str | None = None
    as_path: bool = False
    job_id: str | None = None

    def request_fields(self) -> dict[str, Any]:
        """The fields every request model of the contract has."""
        return {"model": self.model, "detect": self.detect, "ref": self.ref}


def build(model_class: type[M], /, **fields: Any) -> M:
    """A contract model, or :class:`InputError` (``invalid_payload``) naming the first field that is wrong."""
    try:
        return model_class(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise InputError(
            ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']} (got {first.get('input')!r:.80})"
        ) from None
