"""Image inputs of the producer: whatever a caller passes as an image, turned into the contract's
:class:`~producer.contract.requests.ImageRef` (inline bytes, or a path under the shared root), checked before it is
sent.

:class:`~producer.client.FaceClient` uses :func:`image_ref`; everything it raises is an
:class:`~producer.contract.errors.InputError` whose ``code`` is the one a worker would have failed the job with.
"""

from __future__ import annotations

import io
import os
import stat
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
        what = "not a regular file" if target.exists() else "no such file"
        raise InputError(ErrorCode.PATH_NOT_ALLOWED, f"{rel}: {what} under the shared root {root}")
    return ImageRef(path=rel)


def image_bytes(image: ImageInput, max_inline_bytes: int) -> bytes:
    """The encoded bytes of an image input (a regular file's bytes, at most ``max_inline_bytes``; or a PNG of an
    array or a PIL image)."""
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


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once instead of waiting for a writer
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_BINARY", 0)
)
_CHUNK = 1 << 20


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in the words ``ls`` would use."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _file_bytes(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them, read from one descriptor.

    A FIFO, a device (``/dev/zero``), a socket or a directory is refused before anything is read (the file is
    opened non-blocking, so a FIFO without a writer cannot hang the call); a file larger than ``limit``, or one
    that grows past it while it is read, is refused with ``image_too_large`` after at most ``limit + 1`` bytes."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise InputError(ErrorCode.INVALID_PAYLOAD, f"{path}: {exc.strerror or exc}") from None
    try:
        mode, size = _fstat(fd, path)
        if not stat.S_ISREG(mode):
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"{path}: {_file_kind(mode)}, not a regular file; give an image file"
            )
        if size > limit:
            raise InputError(ErrorCode.IMAGE_TOO_LARGE, f"{path}: {size} bytes, over the {limit}-byte inline limit")
        return _read_at_most(fd, path, limit)
    finally:
        os.close(fd)


def _fstat(fd: int, path: Path) -> tuple[int, int]:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise InputError(ErrorCode.INVALID_PAYLOAD, f"{path}: {exc.strerror or exc}") from None
    return st.st_mode, st.st_size


def _read_at_most(fd: int, path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd``; ``image_too_large`` as soon as byte ``limit + 1`` arrives."""
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InputError(
                    ErrorCode.IMAGE_TOO_LARGE, f"{path}: grew past the {limit}-byte inline limit while it was read"
                )
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
