"""What an input image is checked against before any pixel is decoded: the limits (:class:`DecodeLimits`), the
format its first bytes announce, its size and the memory its decoder would need. The budgets are explained in
:mod:`worker.inference.decode`, which re-exports every name here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.defaults import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
BYTES_PER_PIXEL = 4  # the decode memory budget is this x max_pixels
WEBP_BYTES_PER_PIXEL = 18  # measured: libwebp's canvas, the frame Pillow copies out, Pillow's image

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
    (b"ftyp", 4, "HEIF/AVIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"8BPS", 0, "PSD"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"%PDF", 0, "PDF"),
    (b"<svg", 0, "SVG"),
)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what an input image may be and cost; violations fail the job with a typed error.

    ``max_pixels``/``min_side``: width x height and shortest side (``image_too_large``/``image_too_small``); the
    decode memory budget is ``4 * max_pixels`` bytes. ``formats``: Pillow format names accepted.
    ``max_jpeg_scans``/``jpeg_scan_factor``: a JPEG may have at most that many scans and at most
    ``jpeg_scan_factor * max_pixels`` pixels x scans. ``max_decode_s``: wall-clock budget, checked whenever the
    decoder reads input. ``jpeg_decoder``: ``pillow`` (libjpeg-turbo, accurate IDCT) or ``tensorflow`` (the seed's).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_jpeg_scans: int = 100
    jpeg_scan_factor: float = 12.0
    max_decode_s: float = 30.0
    jpeg_decoder: Literal["pillow", "tensorflow"] = "pillow"

    @classmethod
    def from_settings(cls, settings: Any) -> DecodeLimits:
        """The limits a :class:`~worker.settings.WorkerSettings` configures (``ARCFACE_MAX_IMAGE_PIXELS``,
        ``ARCFACE_MIN_IMAGE_SIDE``, ``ARCFACE_JPEG_DECODER``, ``ARCFACE_DECODE_TIMEOUT_S``)."""
        kw: dict[str, Any] = {"max_pixels": settings.max_image_pixels, "min_side": settings.min_image_side}
        if getattr(settings, "jpeg_decoder", None):
            kw["jpeg_decoder"] = settings.jpeg_decoder
        if getattr(settings, "decode_timeout_s", None):
            kw["max_decode_s"] = float(settings.decode_timeout_s)
        return cls(**kw)

    @property
    def memory_budget(self) -> int:
        """Bytes one image may cost to decode."""
        return BYTES_PER_PIXEL * self.max_pixels


DEFAULT_LIMITS = DecodeLimits()


def sniff_format(data: bytes) -> str | None:
    """The image format the first bytes announce (``JPEG``, ``PNG``, ...), or ``None``."""
    head = bytes(data[:16])
    for magic, at, name in _MAGIC:
        if head[at : at + len(magic)] == magic and (name != "WEBP" or head[:4] == b"RIFF"):
            return name
    return None


def check_size(width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse a width x height outside ``limits`` (``image_too_large`` / ``image_too_small``)."""
    if width * height > limits.max_pixels:
        raise JobFailure(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
        )
    if min(width, height) < limits.min_side:
        raise JobFailure(
            ErrorCode.IMAGE_TOO_SMALL,
            f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels",
        )


def check_memory(
    what: str, width: int, height: int, bytes_per_pixel: float, why: str, hint: str, limits: DecodeLimits
) -> None:
    need = width * height * bytes_per_pixel
    budget = limits.memory_budget
    if need > budget:
        raise JobFailure(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{what} of {width}x{height} needs about {need / 1e6:.0f} MB to decode ({bytes_per_pixel:g} bytes per "
            f"pixel: {why}), over the {budget / 1e6:.0f} MB one image may use ({BYTES_PER_PIXEL} bytes x the "
            f"{limits.max_pixels}-pixel limit); {hint} or at most {int(budget // bytes_per_pixel)} pixels",
        )


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a WebP's canvas from its first chunk, or ``None`` when it is not one of VP8/VP8L/VP8X."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def check_format(data: bytes, limits: DecodeLimits) -> str:
    accepted = ", ".join(limits.formats)
    fmt = sniff_format(data)
    if fmt is None:
        raise JobFailure(
            ErrorCode.IMAGE_DECODE_ERROR, f"not a recognised image format ({len(data)} bytes); send one of {accepted}"
        )
    if fmt not in limits.formats:
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, f"{fmt} images are not accepted; send one of {accepted}")
    return fmt


def check_webp(width: int, height: int, limits: DecodeLimits) -> None:
    check_size(width, height, limits)
    check_memory(
        "a WebP image",
        width,
        height,
        WEBP_BYTES_PER_PIXEL,
        "libwebp's canvas, its frame and Pillow's image",
        "send it as PNG or JPEG",
        limits,
    )
