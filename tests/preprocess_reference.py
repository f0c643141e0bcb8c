"""The reference tests/test_preprocess.py holds worker.inference.preprocess to: the previous implementation (a float64
copy of the whole image and four full corner gathers, the arithmetic written out the way TF.js's kernel does it), the
seed's steps through TensorFlow's own kernel, TF.js's kernel loop by loop; and the helpers making test images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

# --- the previous implementation, the reference the new one must equal ---------------------------------------


def reference_decode(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _reference_axis(in_size: int, out_size: int, pad: int, src_size: int):
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(in_size - 1, np.ceil(src).astype(np.int64))
    lo_s, hi_s = lo - pad, hi - pad
    lo_ok, hi_ok = (lo_s >= 0) & (lo_s < src_size), (hi_s >= 0) & (hi_s < src_size)
    return np.clip(lo_s, 0, src_size - 1), np.clip(hi_s, 0, src_size - 1), frac, lo_ok, hi_ok


def reference_pad_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    pad_h, pad_w = (max(h, w) - h) // 2, (max(h, w) - w) // 2
    y0, y1, fy, y0ok, y1ok = _reference_axis(h + 2 * pad_h, size, pad_h, h)
    x0, x1, fx, x0ok, x1ok = _reference_axis(w + 2 * pad_w, size, pad_w, w)
    img = image.astype(np.float64)

    def corner(yi, yok, xi, xok):
        return img[yi[:, None], xi[None, :]] * (yok[:, None] & xok[None, :])[:, :, None]

    tl, tr = corner(y0, y0ok, x0, x0ok), corner(y0, y0ok, x1, x1ok)
    bl, br = corner(y1, y1ok, x0, x0ok), corner(y1, y1ok, x1, x1ok)
    top = tl + (tr - tl) * fx[None, :, None]
    bottom = bl + (br - bl) * fx[None, :, None]
    return (top + (bottom - top) * fy[:, None, None]).astype(np.float32)


def reference_preprocess(data: bytes, size: int = 112) -> np.ndarray:
    return reference_pad_and_resize(reference_decode(data), size)


def reference_seed_pipeline(rgb: np.ndarray, size: int = 112) -> np.ndarray:
    """The seed's steps, done independently with TensorFlow's own kernel: explicit tf.pad with the seed
    app's padding, then TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), which is the
    kernel TF.js's resizeBilinear mirrors (shared/seed/FINDINGS.md #4)."""
    import tensorflow as tf

    h, w = rgb.shape[:2]
    m = max(h, w)
    ph, pw = int((m - h) / 2), int((m - w) / 2)
    padded = tf.pad(tf.cast(rgb, tf.float32), [[ph, ph], [pw, pw], [0, 0]])
    out = tf.compat.v1.image.resize_bilinear(padded[None], [size, size], align_corners=False, half_pixel_centers=False)
    return out[0].numpy()


def tfjs_bilinear_numpy(img: np.ndarray, size: int) -> np.ndarray:
    """TF.js's CPU kernel written out loop by loop (tfjs-backend-cpu ResizeBilinear, defaults)."""
    h, w, c = img.shape
    out = np.zeros((size, size, c), np.float64)
    for r in range(size):
        src_r = (h / size) * r
        r0, r1 = int(np.floor(src_r)), min(h - 1, int(np.ceil(src_r)))
        fr = src_r - r0
        for col in range(size):
            src_c = (w / size) * col
            c0, c1 = int(np.floor(src_c)), min(w - 1, int(np.ceil(src_c)))
            fc = src_c - c0
            top = img[r0, c0] + (img[r0, c1] - img[r0, c0]) * fc
            bottom = img[r1, c0] + (img[r1, c1] - img[r1, c0]) * fc
            out[r, col] = top + (bottom - top) * fr
    return out


# --- helpers ----------------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    return encode(img, "PNG", **kw)


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth random content (JPEG-friendly, unlike noise)."""
    small = Image.fromarray(random_rgb(max(2, h // 8), max(2, w // 8), seed))
    return small.resize((w, h), Image.Resampling.BILINEAR)


def assert_same(new: np.ndarray, ref: np.ndarray) -> None:
    assert new.shape == ref.shape and new.dtype == ref.dtype
    assert new.flags.c_contiguous
    np.testing.assert_array_equal(new, ref)  # bit for bit: stronger than the 1e-6 the issue asks


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def truncated_jpeg(keep: int = 300) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_rgb(64, 64)).save(buf, "JPEG")
    return buf.getvalue()[:keep]
