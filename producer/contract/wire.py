"""Dispatch over every job kind: which function runs a request, the images a request needs, a stored job's
arguments and return value parsed back into the typed models, and the shared-root path rule both sides apply.

Wire format (what a non-Python producer writes; see docs/wire-format.md): an rq job hash whose ``data`` field is
the UTF-8 JSON array ``[func_name, null, [payload], {}]``, with ``func_name`` one of
:data:`~producer.contract.keys.ALLOWED_FUNCTIONS` and ``payload`` a request of :mod:`producer.contract.requests`
or :mod:`producer.contract.gallery` as JSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.gallery import GalleryRequest, gallery_func_for, images_for, parse_gallery_request
from producer.contract.gallery_results import parse_gallery_result
from producer.contract.keys import (
    ALLOWED_FUNCTIONS,
    EMBED_BATCH_FUNC,
    EMBED_FUNC,
    GALLERY_FUNCTIONS,
    VERIFY_BATCH_FUNC,
    VERIFY_FUNC,
)
from producer.contract.requests import (
    AnyRequest,
    EmbedBatchRequest,
    EmbedRequest,
    ImageRef,
    VerifyBatchRequest,
    VerifyRequest,
    check_arguments,
    validate_payload,
)
from producer.contract.results import (
    AnyResult,
    parse_embedding_result,
)


# --- the shared root ---------------------------------------------------------------------------------
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
        return parse_gallery_result(value)  # type: ignore[return-value]  # a gallery result (see producer.contract.gallery)
    return parse_embedding_result(value)
