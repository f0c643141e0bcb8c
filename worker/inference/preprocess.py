"""Seed-exact preprocessing: decode, pad the short side symmetrically, TF.js bilinear resize.

The seed (ArcFaceTF) does ``cast float32 -> pad -> tf.image.resizeBilinear(img, [112, 112]) -> / 255``.
We follow its app's padding formula (``pad = floor((max(h, w) - side) / 2)`` on both sides, see
shared/seed/FINDINGS.md #3: the README's ``parseInt`` formula is buggy) and TF.js's resize kernel
(``alignCorners=false, halfPixelCenters=false``: source = dst * in / out, neighbours clamped to the edge).

Output pixels stay on the 0..255 scale; the engine applies the model's normalisation (/255 for ArcFace)
inside its compiled function.

How it is computed: the resize only ever reads 2 x size rows and 2 x size columns of the padded image, so
those samples are gathered straight from the ``uint8`` pixels (one ``take`` with an index table cached per
image geometry; padding samples are set to zero; EXIF orientation is folded into the table, so a rotated
photo is never copied) and the TF.js arithmetic (``top = tl + (tr - tl) * fx``, ``out = top + (bottom - top) *
fy``, in float64, then float32) runs on those samples alone. The result is bit-identical to interpolating a
float64 copy of the padded image, at a cost that does not depend on the photo's size; numpy releases the
GIL in every step that touches pixels, so preprocessing threads run in parallel. Grey images are
interpolated as one channel and expanded to RGB at the end. For photos of 2 MP and more only the sampled
rows are converted out of the decoder's image (see :mod:`worker.inference.decode` for decoding, its limits and the
memory it takes).

Deliberate deviations from the seed, documented in docs/model.md:
- decoding is Pillow's by default (JPEG pixels can differ from TensorFlow's INTEGER_FAST decoder by a few grey
  levels, FINDINGS #2; ``ARCFACE_JPEG_DECODER=tensorflow`` uses the seed's decoder), and EXIF orientation is
  applied (the seed ignores it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from producer.contract.codes import ErrorCode, JobFailure
from worker.inference.decode import Decoded, open_image, orient
from worker.inference.decode_checks import DEFAULT_LIMITS, DecodeLimits

if TYPE_CHECKING:
    from worker.inference.detect import Face


@dataclass
class PreparedImage:
    """One image on its way to the model: its input, or (with detection) the decoded image that waits for
    the batch's detector call, which then fills ``input`` and ``face``."""

    input: np.ndarray | None = None
    raw: np.ndarray | None = None
    face: Face | None = None
    ms: float = 0.0
    all_faces: bool = False  # faces="all": every face, not just the picked one
    extra: list[tuple[np.ndarray, Face]] | None = None  # the other faces' inputs (faces="all"), largest first
    release: Callable[[], None] | None = None  # ``input`` is a view of a preprocessing slot: free it once used


__all__ = [
    "PreparedImage",
    "as_rgb_array",
    "decode_image",
    "pad_and_resize",
    "preprocess",
    "seed_padding",
]

_STRIP_MIN_PIXELS = 2_000_000  # from this size on, only the sampled rows are converted out of the decoder
INDEX_CACHE_BYTES = 32 * 1024 * 1024  # gather index tables kept for the image geometries seen most recently
_INDEX_CACHE: OrderedDict[tuple[int | bool, ...], np.ndarray] = OrderedDict()
_INDEX_BYTES = 0
_INDEX_LOCK = threading.Lock()


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, WebP, GIF first frame, BMP) to RGB ``uint8`` HxWx3.

    EXIF orientation is applied; grey, palette, CMYK, RGBA and 16-bit images are converted to RGB
    (alpha is dropped, as TensorFlow's ``decode_image(channels=3)`` does). Raises :class:`JobFailure`
    with ``image_decode_error``, ``image_too_large`` or ``image_too_small``.
    """
    decoded = open_image(data, limits)
    return np.ascontiguousarray(_rgb(orient(decoded.array(), decoded.orientation)))


def as_rgb_array(image: np.ndarray) -> np.ndarray:
    """Accept an already-decoded array (HxW grey, HxWx1, HxWx3 or HxWx4, 0..255) as RGB HxWx3."""
    arr = _as_channels(image)
    return _rgb(arr) if arr.shape[2] == 1 else arr[:, :, :3]


def _as_channels(image: np.ndarray) -> np.ndarray:
    """An array image as HxWxC, C in (1, 3, 4), without copying; typed error otherwise."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise JobFailure(
            ErrorCode.INVALID_PAYLOAD, f"array image must be HxW, HxWx1, HxWx3 or HxWx4; got shape {arr.shape}"
        )
    if min(arr.shape[:2]) < 1:
        raise JobFailure(ErrorCode.IMAGE_TOO_SMALL, f"array image has shape {arr.shape}")
    return arr


def seed_padding(height: int, width: int) -> tuple[int, int]:
    """(pad_h, pad_w) added on *both* sides: the seed app's ``floor((max(h, w) - side) / 2)``."""
    side = max(height, width)
    return (side - height) // 2, (side - width) // 2


@dataclass(frozen=True)
class _Axis:
    """TF.js bilinear samples along one axis of the padded image, mapped into the unpadded one."""

    pos: np.ndarray  # sampled positions: lo (and hi after it when any fraction is non-zero), clipped
    frac: np.ndarray | None  # (size,) float64 fractions; None when all are 0 (hi == lo, no interpolation)
    bad: np.ndarray  # indices into ``pos`` that fall into the zero padding


@lru_cache(maxsize=1024)
def _axis(n: int, pad: int, size: int) -> _Axis:
    padded = n + 2 * pad
    src = np.arange(size, dtype=np.float64) * (padded / size)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(padded - 1, np.ceil(src).astype(np.int64))
    interpolate = bool(frac.any())
    pos = (np.concatenate([lo, hi]) if interpolate else lo) - pad
    bad = np.flatnonzero((pos < 0) | (pos >= n))
    return _Axis(np.clip(pos, 0, n - 1), frac if interpolate else None, bad)


@dataclass
class _Plan:
    """Where every sample of one (stored height, width, size, orientation) comes from."""

    size: int
    rows: _Axis  # along the displayed (oriented) image's height
    cols: _Axis
    stored_row: np.ndarray  # (ny, nx) or broadcastable: stored row of each sample
    stored_col: np.ndarray
    row_ids: np.ndarray  # the distinct stored rows read, sorted
    identity: bool  # the samples are the image itself (size x size, no padding, no interpolation)
    key: tuple[int, int, int, int] = (0, 0, 0, 1)  # (height, width, size, orientation)
    _weights: dict[int, np.ndarray] = field(default_factory=dict)

    def index(self, width: int, c_src: int, c_out: int, strip: bool) -> np.ndarray:
        """Flat indices into a C-contiguous (rows, width, c_src) array, shaped (ny, nx * c_out); kept in a
        byte-bounded LRU cache (1.2 MB for a colour 112 px plan)."""
        key = (*self.key, width, c_src, c_out, strip)
        with _INDEX_LOCK:
            idx = _INDEX_CACHE.get(key)
            if idx is not None:
                _INDEX_CACHE.move_to_end(key)
                return idx
        row = np.searchsorted(self.row_ids, self.stored_row) if strip else self.stored_row
        pixel = row * width + self.stored_col
        idx = (pixel[:, :, None] * c_src + np.arange(c_out)).reshape(pixel.shape[0], -1).astype(np.intp)
        global _INDEX_BYTES
        with _INDEX_LOCK:
            if key not in _INDEX_CACHE:
                _INDEX_CACHE[key] = idx
                _INDEX_BYTES += idx.nbytes
                while _INDEX_BYTES > INDEX_CACHE_BYTES and len(_INDEX_CACHE) > 1:
                    _INDEX_BYTES -= _INDEX_CACHE.popitem(last=False)[1].nbytes
        return idx

    def fx(self, channels: int) -> np.ndarray:
        w = self._weights.get(channels)
        if w is None:
            assert self.cols.frac is not None
            w = self._weights[channels] = np.repeat(self.cols.frac, channels)
        return w


@lru_cache(maxsize=256)
def _plan(height: int, width: int, size: int, orientation: int = 1) -> _Plan:
    transposed = orientation >= 5
    dh, dw = (width, height) if transposed else (height, width)
    pad_h, pad_w = seed_padding(dh, dw)
    rows, cols = _axis(dh, pad_h, size), _axis(dw, pad_w, size)
    flips = {5: 1, 6: 2, 7: 3, 8: 4}.get(orientation, orientation)
    u = dh - 1 - rows.pos if flips in (3, 4) else rows.pos  # row of the (maybe transposed) stored image
    v = dw - 1 - cols.pos if flips in (2, 3) else cols.pos
    grid = (u.size, v.size)
    by_row, by_col = np.broadcast_to(u[:, None], grid), np.broadcast_to(v[None, :], grid)
    stored_row, stored_col = (by_col, by_row) if transposed else (by_row, by_col)  # transposed: T[u, v] = A[v, u]
    identity = orientation == 1 and height == width == size
    key = (height, width, size, orientation)
    return _Plan(size, rows, cols, stored_row, stored_col, np.unique(stored_row), identity, key)


def _interpolate(samples: np.ndarray, plan: _Plan, channels: int) -> np.ndarray:
    """TF.js bilinear on gathered samples (ny, nx * channels) -> (size, size, channels) float32."""
    s, sc = plan.size, plan.size * channels
    if plan.rows.bad.size:
        samples[plan.rows.bad] = 0
    if plan.cols.bad.size:
        samples.reshape(samples.shape[0], -1, channels)[:, plan.cols.bad] = 0
    exact = samples.dtype == np.uint8  # differences of uint8 are exact in int16; anything else in float64
    if not exact:
        samples = samples.astype(np.float64)
    h = samples
    if plan.cols.frac is not None:  # top/bottom = left + (right - left) * fx, every sampled row at once
        left = samples[:, :sc]
        diff = np.subtract(samples[:, sc:], left, dtype=np.int16) if exact else samples[:, sc:] - left
        h = np.multiply(diff, plan.fx(channels), dtype=np.float64)
        h += left
    if plan.rows.frac is not None:  # out = top + (bottom - top) * fy
        top = h[:s]
        diff = np.subtract(h[s:], top, dtype=np.int16) if h.dtype == np.uint8 else h[s:] - top
        out = np.multiply(diff, plan.rows.frac[:, None], dtype=np.float64)
        out += top
        h = out
    return h.astype(np.float32).reshape(s, s, channels)


def _rgb(image: np.ndarray) -> np.ndarray:
    """HxWx1 -> HxWx3 (a new C-contiguous array; three plane copies are twice as fast as ``np.repeat``),
    HxWxC (C >= 3) unchanged."""
    if image.shape[2] != 1:
        return image
    out = np.empty((*image.shape[:2], 3), image.dtype)
    grey = image[:, :, 0]
    out[:, :, 0] = grey
    out[:, :, 1] = grey
    out[:, :, 2] = grey
    return out


def _resize(pixels: np.ndarray, plan: _Plan, strip: bool = False, stored_width: int | None = None) -> np.ndarray:
    """Samples of stored ``pixels`` (H, W, C_src; with ``strip`` only ``plan.row_ids``) -> RGB float32."""
    c_src = pixels.shape[2]
    c_out = 1 if c_src == 1 else 3
    if plan.identity and not strip:
        out = pixels[:, :, :c_out].astype(np.float32)
    else:
        if not pixels.flags.c_contiguous:
            pixels = np.ascontiguousarray(pixels)
        idx = plan.index(stored_width or pixels.shape[1], c_src, c_out, strip)
        out = _interpolate(pixels.reshape(-1).take(idx), plan, c_out)
    return _rgb(out)


def pad_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Seed padding + TF.js bilinear resize of an HxWx3 (or HxW, HxWx1, HxWx4) array to ``size`` x ``size``,
    float32 0..255. Any dtype; ``uint8`` takes the exact integer fast path."""
    arr = _as_channels(image)
    return _resize(arr, _plan(arr.shape[0], arr.shape[1], size))


def _preprocess_decoded(decoded: Decoded, size: int) -> np.ndarray:
    plan = _plan(decoded.height, decoded.width, size, decoded.orientation)
    large = decoded.width * decoded.height >= _STRIP_MIN_PIXELS and plan.row_ids.size * 2 < decoded.height
    if decoded.image is not None and large:
        return _resize(decoded.rows(plan.row_ids, rgbx=True), plan, strip=True, stored_width=decoded.width)
    return _resize(decoded.array(rgbx=True), plan)


def preprocess(image: bytes | np.ndarray, size: int, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded bytes or a decoded array -> the model's ``size`` x ``size`` x 3 float32 input (0..255)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _preprocess_decoded(open_image(image, limits), size)
    return pad_and_resize(image, size)
