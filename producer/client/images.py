"""Image inputs of the producer: whatever a caller passes as an image, turned into the contract's
:class:`~producer.contract.requests.ImageRef` (inline bytes, or a path under the shared root), checked before it is
sent.

:class:`~producer.client.FaceClient` uses :func:`image_ref`; everything it raises is an
:class:`~producer.contract.errors.InputError` whose ``code`` is the one a worker would have failed the job with.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.errors import InputError
from producer.contract.requests import ImageRef
from producer.contract.wire import resolve_shared_path

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

#: What an ``image`` argument accepts: encoded bytes, a file path, a PIL image (``Any`` here: Pillow stays
#: an optional import), a numpy array (HxW or HxWxC, 0..255) or a ready :class:`ImageRef`.
ImageInput = Union[bytes, bytearray, str, os.PathLike[str], ImageRef, np.ndarray[Any, Any], Any]


def image_ref(image: ImageInput, max_inline_bytes: int, shared_root: Path | None, as_path: bool = False) -> ImageRef:
    """Turn any accepted image input into an :class:`ImageRef`: a path relative to ``shared_root`` (with
    ``as_path=True`` and a path input), else the encoded bytes inline, at most ``max_inline_bytes``."""
    if isinstance(image, ImageRef):
        return image
    if isinstance(image, (str, os.PathLike)) and as_path:
        return shared_path_ref(str(image), shared_root)
    data = image_bytes(image, max_inline_bytes)
    if not data:
        raise InputError(ErrorCode.IMAGE_DECODE_ERROR, "image is empty (0 bytes)")
    if len(data) > max_inline_bytes:
        raise InputError(
            ErrorCode.IMAGE_TOO_LARGE, f"image has {len(data)} bytes, over the {max_inline_bytes}-byte inline limit"
        )
    return ImageRef.inline(data)


def shared_path_ref(path: str, root: Path | None) -> ImageRef:
    """A path image: relative to ``root`` (an absolute path inside ``root`` is made relative), refused with
    ``path_not_allowed`` unless it names an existing file under ``root``."""
    rel = path
    if root is not None and os.path.isabs(rel) and Path(rel).resolve().is_relative_to(Path(root).resolve()):
        rel = str(Path(rel).resolve().relative_to(Path(root).resolve()))
    try:
        target = resolve_shared_path(root, rel)
    except JobFailure as exc:
        raise InputError(exc.code, exc.message) from None
    if not target.is_file():
        raise InputError(ErrorCode.PATH_NOT_ALLOWED, f"{rel}: no such file under the shared root {root}")
    return ImageRef(path=rel)


def image_bytes(image: ImageInput, max_inline_bytes: int) -> bytes:
    """The encoded bytes of an image input (a file's bytes, or a PNG of an array or a PIL image)."""
    if isinstance(image, (str, os.PathLike)):
        return _file_bytes(Path(image), max_inline_bytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        try:
            return _png(_array_image(image))
        except (TypeError, ValueError, OSError) as exc:
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"numpy image of shape {image.shape} and dtype {image.dtype}: {exc}"
            ) from None
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing Pillow to ask
        try:
            return _png(cast("PILImage", image))
        except (TypeError, ValueError, OSError) as exc:
            raise InputError(ErrorCode.INVALID_PAYLOAD, f"PIL image cannot be encoded: {exc}") from None
    raise InputError(ErrorCode.INVALID_PAYLOAD, f"unsupported image type {type(image).__name__}")


def _file_bytes(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputError(ErrorCode.IMAGE_TOO_LARGE, f"{path}: {size} bytes, over the {limit}-byte inline limit")
        return path.read_bytes()
    except OSError as exc:
        raise InputError(ErrorCode.INVALID_PAYLOAD, f"{path}: {exc.strerror or exc}") from None


def _array_image(arr: np.ndarray[Any, Any]) -> PILImage:
    from PIL import Image

    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)


def _png(image: PILImage) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
