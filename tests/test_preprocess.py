"""Seed-exact preprocessing: decode, symmetric zero padding, TF.js bilinear resize; typed bad-input errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from producer.jobs import ErrorCode, JobFailure
from worker.preprocess import DecodeLimits, decode_image, pad_and_resize, preprocess, seed_padding


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


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w", [(7, 13), (13, 7), (116, 116), (29, 58), (150, 150), (61, 200), (3, 112)])
def test_padding_and_resize_match_tensorflow_kernel_and_tfjs_formula(h, w):
    rgb = random_rgb(h, w)
    ours = pad_and_resize(rgb, 112)
    assert ours.shape == (112, 112, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_seed_pipeline(rgb), atol=5e-3)  # TF computes in float32: ~1e-5 after /255
    ph, pw = seed_padding(h, w)
    padded = np.pad(rgb.astype(np.float64), [(ph, ph), (pw, pw), (0, 0)])
    np.testing.assert_allclose(ours, tfjs_bilinear_numpy(padded, 112), atol=1e-4)


def test_seed_padding_has_no_parseint_bug():
    # FINDINGS #3: the README's parseInt formula pads a 116-pixel side by 7; the app's formula by 0.
    assert seed_padding(116, 116) == (0, 0)
    assert seed_padding(100, 131) == (15, 0)  # odd difference: floor on both sides
    assert seed_padding(58, 29) == (0, 14)


def test_tiny_hand_made_image_exact_pixels():
    # 2x4 image -> padded to 4x4 (one zero row above and below) -> resized to 2x2: every source pixel
    # position is dst * 2, so the output samples padded rows 0, 2 and columns 0, 2 exactly.
    img = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    out = pad_and_resize(img, 2)
    expected = np.array([[[0, 0, 0], [0, 0, 0]], [img[1, 0], img[1, 2]]], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_grey_palette_and_rgba_images_become_rgb():
    grey = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(decode_image(png_bytes(Image.fromarray(grey, "L"))), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    assert np.array_equal(decode_image(png_bytes(Image.fromarray(rgba, "RGBA"))), rgba[:, :, :3])  # alpha dropped, like TF
    pal = Image.fromarray(random_rgb(20, 30)).convert("P")
    assert np.array_equal(decode_image(png_bytes(pal)), np.asarray(pal.convert("RGB")))


def test_exif_orientation_is_applied():
    rgb = random_rgb(10, 16, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(png_bytes(Image.fromarray(rgb), exif=exif.tobytes()))
    assert decoded.shape == (16, 10, 3)
    assert np.array_equal(decoded, np.rot90(rgb, k=-1))


def test_sixteen_bit_png_and_cmyk_jpeg_decode():
    wide = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160)
    out = decode_image(png_bytes(Image.fromarray(wide)))
    np.testing.assert_array_equal(out[:, :, 0], np.rint(wide / 257.0).astype(np.uint8))
    buf = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(buf, "JPEG", quality=95)
    rgb = decode_image(buf.getvalue())
    assert rgb.shape == (20, 20, 3) and rgb[10, 10, 1] < 40 and rgb[10, 10, 0] > 200  # magenta


def test_array_input_equals_encoded_input():
    rgb = random_rgb(40, 25, seed=4)
    np.testing.assert_array_equal(preprocess(rgb, 112), preprocess(png_bytes(Image.fromarray(rgb)), 112))
    np.testing.assert_array_equal(preprocess(rgb[:, :, 0], 112), preprocess(np.repeat(rgb[:, :, :1], 3, axis=2), 112))


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_rgb(64, 64)).save(buf, "JPEG")
    return buf.getvalue()[:300]


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", ErrorCode.IMAGE_DECODE_ERROR),
        (b"hello, this is text and not an image\n" * 3, ErrorCode.IMAGE_DECODE_ERROR),
        (_truncated_jpeg(), ErrorCode.IMAGE_DECODE_ERROR),
        (_png_header_only(20000, 20000), ErrorCode.IMAGE_TOO_LARGE),
        (png_bytes(Image.new("RGB", (1, 1))), ErrorCode.IMAGE_TOO_SMALL),
        (png_bytes(Image.new("RGB", (300, 300))), ErrorCode.IMAGE_TOO_LARGE),  # over the configured 50k limit
    ],
    ids=["zero-bytes", "text", "truncated-jpeg", "20000x20000-header", "1x1", "bomb-over-limit"],
)
def test_bad_input_raises_one_typed_error(data, code):
    with pytest.raises(JobFailure) as info:
        decode_image(data, DecodeLimits(max_pixels=50_000))
    assert info.value.code is code
    assert info.value.message
