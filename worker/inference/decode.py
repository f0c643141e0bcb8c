"""Image decoding that hostile input cannot turn into a hang, a memory bomb or an untyped error.

Accepted formats (``DecodeLimits.formats``; sniffed from the first bytes before any decoder runs):

- **JPEG** (baseline, progressive, grey, CMYK/YCCK; of an MPO file, the first image), decoded by libjpeg-turbo
  through Pillow, or by TensorFlow's decoder with ``jpeg_decoder="tensorflow"`` (its default INTEGER_FAST IDCT
  gives the seed's exact pixels, shared/seed/FINDINGS.md #2).
- **PNG** (of an APNG, the first frame), **WebP** and **GIF** (first frame), uncompressed **BMP**.
- Refused with ``image_decode_error`` naming what is accepted: everything else Pillow could open. TIFF is left out
  on purpose (dozens of codecs, tiled and floating-point variants, libtiff's long CVE history; no face pipeline
  sends it); ``DecodeLimits.formats`` can add it, and every check below still applies. Run-length-encoded BMP is
  refused too: Pillow decodes it in pure Python, two bytes at a time.

Budgets, all checked *before* the pixels are decoded (JPEG and WebP headers are read by worker.inference.jpeg and
worker.inference.decode_checks, the others by Pillow's header parser, which allocates no pixels):

- **Pixels**: width x height <= ``max_pixels`` (``image_too_large``), both sides >= ``min_side``
  (``image_too_small``). Pillow's own ``MAX_IMAGE_PIXELS`` is set to the same limit, so no Pillow path allows more.
- **Memory**: an image may cost at most 4 bytes x ``max_pixels`` to decode (what a colour image at the pixel limit
  takes in Pillow, which keeps 4 bytes per colour pixel and 1 per grey one). Two decoders need more per pixel, so
  their limit in pixels is lower (``image_too_large``, with the figures): a JPEG with more than one scan
  (progressive) keeps every DCT coefficient, 2 bytes per sample, 7 bytes per pixel at 4:2:0, 10 at 4:4:4 (so a
  progressive 4:2:0 JPEG may have at most 4/7 of ``max_pixels``); WebP decodes through three full-size buffers,
  18 bytes per pixel (at most 2/9 of ``max_pixels``: 8.9 MP at the default 40 MP).
- **Time**: a JPEG costs about one pass over the image per scan, so a progressive JPEG whose scans are repeated
  (a 250 KB file asking for 30 s of CPU) is refused when it has more than ``max_jpeg_scans`` scans or more than
  ``jpeg_scan_factor x max_pixels`` pixels x scans (an ordinary progressive JPEG has 6 to 10 scans); the scans
  are counted without decoding. Every other decoder's time is linear in the pixels and the input bytes, both
  bounded. As a last line against slow paths nobody has thought of, each read the decoder makes checks a
  wall-clock budget (``max_decode_s``; ``image_decode_error``).

Pixels: EXIF orientation is applied (the seed ignores it). Only the orientation tag is read; EXIF that cannot be
parsed, or an orientation outside 1..8, counts as "no orientation" (as browsers treat it), never as a failed
job, and nothing is re-serialised (Pillow's ``exif_transpose`` raises on some malformed blocks when it writes
the EXIF back). Grey, bilevel and 16-bit grey images stay one channel (16 bits -> ``(v + 128) // 257``, i.e.
``round(v / 257)``); palette, CMYK and other colour modes become RGB; alpha is dropped, as TensorFlow's
``decode_image(channels=3)`` does. Floating-point images (Pillow mode ``F``, e.g. a float TIFF holding 0..1) are
refused: cast to 8 bits they would silently become a black square.

Memory after decoding: 8-bit grey and colour JPEGs without EXIF (the usual face crop) are decoded by Pillow's C
decoder straight into a numpy array, skipping Pillow's Python header parser; other images stay in Pillow's image,
from which :meth:`Decoded.rows` converts only the rows asked for and :meth:`Decoded.array` the whole image, in
bands of about 4 MiB, into one ``uint8`` array. Nothing here makes a float copy of an image.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from producer.contract.codes import ErrorCode, JobFailure
from worker.inference.decode_checks import (
    DEFAULT_LIMITS,
    DecodeLimits,
    check_size,
    webp_size,
)
from worker.inference.decode_checks import check_format as _sniff
from worker.inference.decode_checks import check_webp as _check_webp
from worker.inference.jpeg import FAST_JPEG as _FAST_JPEG
from worker.inference.jpeg import check_jpeg as _check_jpeg
from worker.inference.jpeg import decode_plain_jpeg as _decode_plain_jpeg
from worker.inference.jpeg import decode_tensorflow as _decode_tensorflow
from worker.inference.jpeg import jpeg_header

__all__ = [
    "Decoded",
    "open_image",
    "orient",
]

# Images over the limit are refused by our own check with a clear message; Pillow's warning for sizes between
# its limit and twice it would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# PNG text chunks (zTXt/iTXt) may inflate to 64 MiB in all by default; only EXIF/XMP orientation is read from
# them here, so bound what a hostile PNG can make Pillow allocate while its header is parsed.
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 4 * 1024 * 1024)

_GREY_16 = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}
# (v + 128) // 257 == rint(v * 255 / 65535) for every 16-bit v (no ties: v / 257 is never k + 1/2).
_LUT_16 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)
_BAND_BYTES = 4 * 1024 * 1024
_METADATA = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")  # where Pillow's getexif() looks


class _DecodeTimeout(Exception):
    pass


class _Input(io.BytesIO):
    """The encoded bytes as a file. Headers are parsed at C speed; :func:`_arm` then makes every further read
    (the decoder pulling input, whichever of Pillow's objects holds this file) check the decode deadline."""


def _arm(fp: _Input, deadline: float) -> None:
    plain = io.BytesIO.read

    def read(size: int | None = -1) -> bytes:
        if time.monotonic() > deadline:
            raise _DecodeTimeout
        return plain(fp, size)

    fp.read = read  # type: ignore[method-assign]  # an instance attribute wins over the C method


# --- decoded images -------------------------------------------------------------------------------------------


def _orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation 1..8; 1 when absent, out of range or unreadable (malformed EXIF)."""
    if not hasattr(img, "tag_v2") and not any(key in img.info for key in _METADATA):
        return 1
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - metadata that cannot be parsed means "no orientation", never a failed job
        return 1
    return value if 1 <= value <= 8 else 1


@dataclass
class Decoded:
    """A decoded image in its stored orientation, not yet converted to a numpy array.

    ``orientation`` (EXIF 1..8) says how the stored pixels map to the displayed image; ``channels`` is 1 for grey
    sources (expanded to RGB only at the end of preprocessing) and 3 otherwise.
    """

    width: int  # stored (before orientation)
    height: int
    channels: int
    orientation: int = 1
    image: Image.Image | None = None
    pixels: np.ndarray | None = None  # decoded straight to numpy (plain JPEG, TensorFlow): H x W x (1, 3 or 4) uint8
    _i_scale: int = field(default=65535, repr=False)

    def array(self, rgbx: bool = False) -> np.ndarray:
        """All stored rows as ``uint8`` (H, W, C); with ``rgbx`` a colour image may come back as (H, W, 4) whose 4th
        channel is to be ignored (cheaper to get out of Pillow)."""
        if self.pixels is not None:
            return self.pixels if rgbx or self.pixels.shape[2] != 4 else self.pixels[:, :, :3]
        img = self.image
        assert img is not None
        step = max(1, _BAND_BYTES // (self.width * 4))
        if self.height <= step:
            return self._convert(img, rgbx)
        first = self._convert(img.crop((0, 0, self.width, step)), rgbx)
        out = np.empty((self.height, self.width, first.shape[2]), np.uint8)
        out[:step] = first
        for top in range(step, self.height, step):
            bottom = min(self.height, top + step)
            out[top:bottom] = self._convert(img.crop((0, top, self.width, bottom)), rgbx)
        return out

    def rows(self, indices: np.ndarray, rgbx: bool = False) -> np.ndarray:
        """Only the stored rows ``indices`` (sorted, unique), as ``uint8`` (len(indices), W, C)."""
        if self.pixels is not None:
            rows = self.pixels[indices]
            return rows if rgbx or rows.shape[2] != 4 else rows[:, :, :3]
        img = self.image
        assert img is not None
        runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1)  # consecutive rows are cropped at once
        parts = [self._convert(img.crop((0, int(run[0]), self.width, int(run[-1]) + 1)), rgbx) for run in runs]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _convert(self, band: Image.Image, rgbx: bool) -> np.ndarray:
        """One band of the image (same mode) -> uint8 (h, W, C)."""
        mode, (w, h) = band.mode, band.size
        if mode in ("L", "1"):
            return np.frombuffer(_raw_bytes(band, "L", 1), np.uint8).reshape(h, w, 1)
        if mode in ("RGB", "RGBA", "RGBX"):
            if rgbx:
                rawmode = "RGBA" if mode == "RGBA" else "RGBX"
                return np.frombuffer(_raw_bytes(band, rawmode, 4), np.uint8).reshape(h, w, 4)
            return np.frombuffer(_raw_bytes(band, "RGB", 3), np.uint8).reshape(h, w, 3)
        if mode in _GREY_16:
            return _LUT_16[np.frombuffer(_raw_bytes(band, mode, 2), _GREY_16[mode]).reshape(h, w, 1)]
        if mode == "I":  # 32-bit grey: 8-bit values as they are, 16-bit values like I;16 (as before)
            wide = np.frombuffer(_raw_bytes(band, "I", 4), np.int32).reshape(h, w, 1)
            if self._i_scale == 255:
                return np.clip(wide, 0, 255).astype(np.uint8)
            return np.clip((wide.astype(np.int64) + 128) // 257, 0, 255).astype(np.uint8)
        if mode == "LA":
            return np.frombuffer(_raw_bytes(band.convert("L"), "L", 1), np.uint8).reshape(h, w, 1)
        return np.frombuffer(_raw_bytes(band.convert("RGB"), "RGB", 3), np.uint8).reshape(h, w, 3)


def _raw_bytes(img: Image.Image, rawmode: str, bytes_per_pixel: int) -> bytes:
    """``img.tobytes("raw", rawmode)`` in one encoder call. ``tobytes`` encodes in 64 KiB pieces and joins them,
    which costs 30x more for a 250x250 RGB image (224 us instead of 7)."""
    size = img.width * img.height * bytes_per_pixel
    try:
        encoder = Image._getencoder(img.mode, "raw", (rawmode,))
        encoder.setimage(img.im, (0, 0, *img.size))
        _, status, data = encoder.encode(max(size, 1))
    except (AttributeError, TypeError):  # Pillow's internals moved: the public way
        return img.tobytes("raw", rawmode)
    return data if status == 1 and len(data) == size else img.tobytes("raw", rawmode)


def _is_float(mode: str) -> bool:
    return mode == "F" or mode.startswith("F;")


def _check_opened(img: Image.Image, fmt: str, limits: DecodeLimits) -> None:
    """What Pillow's header parser tells, checked before any pixel is decoded."""
    check_size(img.width, img.height, limits)
    if fmt == "WEBP":
        _check_webp(img.width, img.height, limits)
    if _is_float(img.mode):
        raise JobFailure(
            ErrorCode.IMAGE_DECODE_ERROR, "floating-point images are not supported; send 8- or 16-bit integer pixels"
        )
    if fmt == "BMP" and img.info.get("compression") in (1, 2):
        raise JobFailure(
            ErrorCode.IMAGE_DECODE_ERROR,
            "run-length-encoded BMP is not supported; send an uncompressed BMP, a PNG or a JPEG",
        )


def _decode(data: bytes, fmt: str, limits: DecodeLimits, deadline: float) -> Decoded:
    header = None
    if fmt == "JPEG":
        header = jpeg_header(data)
        if header is None:
            raise JobFailure(
                ErrorCode.IMAGE_DECODE_ERROR, f"not a decodable JPEG ({len(data)} bytes): no frame header before a scan"
            )
        _check_jpeg(data, header, limits)
        width, height = header.width, header.height
        if header.plain and _FAST_JPEG:  # the common face crop: no Python header parsing at all
            if limits.jpeg_decoder == "tensorflow":
                return Decoded(width, height, 3, pixels=_decode_tensorflow(data, width, height))
            return Decoded(width, height, header.components, pixels=_decode_plain_jpeg(data, header))
    elif fmt == "WEBP" and (size := webp_size(data)) is not None:  # Pillow allocates the canvas when opening
        _check_webp(*size, limits)
    fp = _Input(data)
    img = Image.open(fp, formats=[fmt])
    _check_opened(img, fmt, limits)
    width, height = img.size
    if header is not None and limits.jpeg_decoder == "tensorflow":
        return Decoded(width, height, 3, _orientation(img), pixels=_decode_tensorflow(data, width, height))
    _arm(fp, deadline)
    img.load()
    if img.size != (width, height) or _is_float(img.mode):
        raise JobFailure(
            ErrorCode.IMAGE_DECODE_ERROR,
            f"{fmt} decoded to {img.width}x{img.height} {img.mode}, not the {width}x{height} its header says",
        )
    grey = img.mode in ("L", "1", "LA", "I") or img.mode in _GREY_16
    decoded = Decoded(width, height, 1 if grey else 3, _orientation(img), image=img)
    if img.mode == "I":
        decoded._i_scale = 65535 if img.getextrema()[1] > 255 else 255  # type: ignore[operator]
    return decoded


def open_image(data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS) -> Decoded:
    """Check and decode encoded image bytes (see the module docstring); raises :class:`JobFailure` with
    ``image_decode_error``, ``image_too_large`` or ``image_too_small``."""
    if not data:
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "image is empty (0 bytes)")
    data = data if isinstance(data, bytes) else bytes(data)
    fmt = _sniff(data, limits)
    deadline = time.monotonic() + limits.max_decode_s
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow refuses twice this when opening; check_size refuses more
    try:
        return _decode(data, fmt, limits, deadline)
    except JobFailure:
        raise
    except _DecodeTimeout:
        message = f"{fmt} image ({len(data)} bytes) still decoding after {limits.max_decode_s:g} s; send a smaller one"
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, message) from None
    except Image.DecompressionBombError:
        message = f"image has over twice the limit of {limits.max_pixels} pixels"
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, message) from None
    except UnidentifiedImageError:
        message = f"cannot read this {fmt} image ({len(data)} bytes): its header is invalid"
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, message) from None
    except MemoryError:
        message = f"not enough memory to decode this {fmt} image ({len(data)} bytes)"
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, message) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        message = f"cannot decode {fmt} image: {type(exc).__name__}: {exc}"
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, message) from None


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """The displayed image for stored pixels (H, W, ...) and an EXIF orientation, as a view (no copy)."""
    if orientation >= 5:
        array = array.swapaxes(0, 1)  # T[y, x] = A[x, y]; 5..8 are 1..4 applied to T
        orientation -= 4
    if orientation in (2, 3):
        array = array[:, ::-1]
    if orientation in (3, 4):
        array = array[::-1]
    return array
