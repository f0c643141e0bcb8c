"""Seed-exact preprocessing: decode, pad the short side symmetrically, TF.js bilinear resize.

The seed (ArcFaceTF) does ``cast float32 -> pad -> tf.image.resizeBilinear(img, [112, 112]) -> / 255``.
We follow its app's padding formula (``pad = floor((max(h, w) - side) / 2)`` on both sides, see
shared/seed/FINDINGS.md #3: the README's ``parseInt`` formula is buggy) and TF.js's resize kernel
(``alignCorners=false, halfPixelCenters=false``: source = dst * in / out, neighbours clamped to the edge).

Output pixels stay on the 0..255 scale; the engine applies the model's normalisation (/255 for ArcFace)
inside its compiled function.

Deliberate deviations from the seed, documented in the README:
- decoding is Pillow's (JPEG pixels can differ from TensorFlow's INTEGER_FAST decoder by a few grey
  levels, FINDINGS #2), and EXIF orientation is applied (the seed ignores it);
- padding and resize are computed together on a *virtual* padded image, so a large photo is never
  copied into a padded buffer; the arithmetic is the same.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from producer.jobs import ErrorCode, JobFailure

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 8


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what an input image may be; violations fail the job with a typed error."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, WebP, BMP, GIF first frame, ...) to RGB ``uint8`` HxWx3.

    EXIF orientation is applied; grey, palette, CMYK, RGBA and 16-bit images are converted to RGB
    (alpha is dropped, as TensorFlow's ``decode_image(channels=3)`` does). Raises :class:`JobFailure`
    with ``image_decode_error``, ``image_too_large`` or ``image_too_small``.
    """
    if not data:
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img.width, img.height, limits)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except JobFailure:
        raise
    except Image.DecompressionBombError as exc:
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, f"not a recognised image format ({len(data)} bytes, starts {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, f"cannot decode image: {exc}") from None


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise JobFailure(ErrorCode.IMAGE_TOO_SMALL, f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels")


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: scale to 8 bits the way TensorFlow's PNG decoder does (value / 257).
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def as_rgb_array(image: np.ndarray) -> np.ndarray:
    """Accept an already-decoded array (HxW grey, HxWx1, HxWx3 or HxWx4, 0..255) as RGB HxWx3."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise JobFailure(ErrorCode.INVALID_PAYLOAD, f"array image must be HxW, HxWx1, HxWx3 or HxWx4; got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if min(arr.shape[:2]) < 1:
        raise JobFailure(ErrorCode.IMAGE_TOO_SMALL, f"array image has shape {arr.shape}")
    return arr


def seed_padding(height: int, width: int) -> tuple[int, int]:
    """(pad_h, pad_w) added on *both* sides: the seed app's ``floor((max(h, w) - side) / 2)``."""
    side = max(height, width)
    return (side - height) // 2, (side - width) // 2


def _axis_weights(in_size: int, out_size: int, pad: int, src_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TF.js bilinear source indices and fractions along one axis of the padded image, mapped back
    into the unpadded source. Returns (lo_idx, hi_idx, frac, lo_valid, hi_valid)."""
    scale = in_size / out_size
    src = np.arange(out_size, dtype=np.float64) * scale
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(in_size - 1, np.ceil(src).astype(np.int64))
    lo_s, hi_s = lo - pad, hi - pad  # positions in the unpadded image; outside = zero padding
    lo_ok = (lo_s >= 0) & (lo_s < src_size)
    hi_ok = (hi_s >= 0) & (hi_s < src_size)
    return np.clip(lo_s, 0, src_size - 1), np.clip(hi_s, 0, src_size - 1), frac, lo_ok, hi_ok


def pad_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Seed padding + TF.js bilinear resize of an RGB HxWx3 array to ``size`` x ``size``, float32 0..255."""
    h, w = image.shape[:2]
    pad_h, pad_w = seed_padding(h, w)
    ph, pw = h + 2 * pad_h, w + 2 * pad_w
    y0, y1, fy, y0ok, y1ok = _axis_weights(ph, size, pad_h, h)
    x0, x1, fx, x0ok, x1ok = _axis_weights(pw, size, pad_w, w)
    img = image.astype(np.float64, copy=False) if image.dtype != np.float64 else image

    def corner(yi: np.ndarray, yok: np.ndarray, xi: np.ndarray, xok: np.ndarray) -> np.ndarray:
        vals = img[yi[:, None], xi[None, :]]
        return vals * (yok[:, None] & xok[None, :])[:, :, None]

    top_left, top_right = corner(y0, y0ok, x0, x0ok), corner(y0, y0ok, x1, x1ok)
    bottom_left, bottom_right = corner(y1, y1ok, x0, x0ok), corner(y1, y1ok, x1, x1ok)
    fxb = fx[None, :, None]
    top = top_left + (top_right - top_left) * fxb
    bottom = bottom_left + (bottom_right - bottom_left) * fxb
    return (top + (bottom - top) * fy[:, None, None]).astype(np.float32)


def preprocess(image: bytes | np.ndarray, size: int, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded bytes or a decoded array -> the model's ``size`` x ``size`` x 3 float32 input (0..255)."""
    rgb = decode_image(image, limits) if isinstance(image, (bytes, bytearray, memoryview)) else as_rgb_array(image)
    return pad_and_resize(rgb, size)
