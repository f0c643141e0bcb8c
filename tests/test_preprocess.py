"""Seed-exact preprocessing: decode, symmetric zero padding, TF.js bilinear resize; typed bad-input errors.

The sampled implementation (worker.inference.preprocess) is held bit for bit to the previous one, kept in
tests/preprocess_reference.py as ``reference_preprocess``: a float64 copy of the whole image and four full corner
gathers, the arithmetic written out the way TF.js's kernel does it."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from producer.contract.codes import ErrorCode, JobFailure
from tests.conftest import FACES, REPO, face_paths
from tests.patience import patience
from tests.preprocess_reference import (
    assert_same,
    encode,
    photo,
    png_bytes,
    png_header_only,
    random_rgb,
    reference_decode,
    reference_pad_and_resize,
    reference_preprocess,
    reference_seed_pipeline,
    tfjs_bilinear_numpy,
    truncated_jpeg,
)
from worker.inference.decode import Decoded, jpeg_header, open_image, orient
from worker.inference.preprocess import (
    DecodeLimits,
    as_rgb_array,
    decode_image,
    pad_and_resize,
    preprocess,
    seed_padding,
)

# --- exactness against the previous implementation ----------------------------------------------------------


@pytest.mark.parametrize("size", [112, 97, 160])
def test_all_shared_faces_equal_the_previous_implementation(size):
    paths = face_paths() + sorted((FACES / "group").glob("*.jpg")) + [FACES / "white.png"]
    assert len(paths) == 46
    for path in paths:
        data = path.read_bytes()
        assert_same(preprocess(data, size), reference_preprocess(data, size))
        if size == 112:
            assert_same(decode_image(data), reference_decode(data))


ODD_SHAPES = [
    (1, 50),
    (50, 1),
    (1, 1),
    (2, 4),
    (4, 2),
    (113, 7),
    (7, 113),
    (3000, 200),
    (200, 3000),
    (7, 13),
    (116, 116),
    (112, 112),
    (224, 224),
    (111, 113),
    (250, 250),
    (480, 640),
]


@pytest.mark.parametrize("h,w", ODD_SHAPES)
def test_odd_shapes_grey_and_rgba_arrays_equal_the_previous_implementation(h, w):
    rgb = random_rgb(h, w, seed=h * 7 + w)
    for size in (112, 5, 1):
        ref = reference_pad_and_resize(rgb, size)
        assert_same(pad_and_resize(rgb, size), ref)
        assert_same(preprocess(rgb, size), ref)
        rgba = np.concatenate([rgb, np.full((h, w, 1), 77, np.uint8)], axis=2)
        assert_same(preprocess(rgba, size), ref)  # alpha dropped
        grey = rgb[:, :, 1]
        assert_same(preprocess(grey, size), reference_pad_and_resize(np.repeat(grey[:, :, None], 3, axis=2), size))
        wide = rgb.astype(np.float32) * 0.37  # any dtype: the float64 path
        assert_same(pad_and_resize(wide, size), reference_pad_and_resize(wide, size))


LOOSE = DecodeLimits(min_side=1)  # the odd shapes include sides under the default minimum of 8


@pytest.mark.parametrize("h,w", [(2, 4), (113, 7), (3000, 200), (7, 13), (150, 150), (61, 200)])
def test_encoded_modes_equal_the_previous_implementation(h, w):
    rgb = random_rgb(h, w, seed=h + w)
    grey16 = np.random.default_rng(h).integers(0, 65536, (h, w)).astype(np.uint16)
    pngs = {
        "rgb": Image.fromarray(rgb),
        "grey": Image.fromarray(rgb[:, :, 0]),
        "rgba": Image.fromarray(np.concatenate([rgb, rgb[:, :, :1]], axis=2)),
        "grey+alpha": Image.frombytes("LA", (w, h), rgb[:, :, :2].tobytes()),
        "palette": Image.fromarray(rgb).convert("P"),
        "bilevel": Image.fromarray(rgb[:, :, 0]).convert("1"),
        "16-bit grey": Image.fromarray(grey16),
    }
    encoded = {f"{name} png": png_bytes(img) for name, img in pngs.items()}
    encoded |= {f"{name} bmp": encode(pngs[name], "BMP") for name in ("rgb", "grey", "palette", "bilevel")}
    encoded |= {f"{name} gif": encode(pngs[name], "GIF") for name in ("rgb", "grey", "palette")}
    encoded |= {f"{name} webp": encode(pngs[name], "WEBP", lossless=True) for name in ("rgb", "rgba")}
    if min(h, w) >= 8:
        for kw in ({}, {"progressive": True}, {"subsampling": 0}, {"quality": 40, "optimize": True}):
            for mode in ("RGB", "L", "CMYK"):
                encoded[f"{mode} jpeg {kw}"] = encode(photo(h, w).convert(mode), "JPEG", **kw)
    for data in encoded.values():
        assert_same(decode_image(data, LOOSE), reference_decode(data))
        assert_same(preprocess(data, 112, LOOSE), reference_preprocess(data, 112))


def test_32_bit_and_16_bit_tiff_grey_equal_the_previous_implementation():
    # Pillow reads 32-bit integer grey ("I") from TIFF only; TIFF is off by default, so enable it here.
    tiff = DecodeLimits(formats=("TIFF",))
    wide = np.random.default_rng(5).integers(0, 65536, (40, 30)).astype(np.int32)
    for values in (wide, wide // 257, wide - 30000):  # 16-bit range, 8-bit range (kept as is), negatives (clipped)
        data = encode(Image.frombytes("I", (30, 40), values.astype("<i4").tobytes()), "TIFF")
        assert Image.open(io.BytesIO(data)).mode == "I"
        assert_same(decode_image(data, tiff), reference_decode(data))
        assert_same(preprocess(data, 112, tiff), reference_preprocess(data, 112))
    data = encode(Image.fromarray(wide.astype(np.uint16)), "TIFF")
    assert_same(preprocess(data, 112, tiff), reference_preprocess(data, 112))


def test_large_photo_reads_only_the_sampled_rows_and_equals_the_previous_implementation():
    # 2.4 MP and more: only the ~224 rows the resize reads are converted out of the decoder (Decoded.rows).
    for img in (photo(1600, 1500), photo(1500, 1700).convert("L")):
        data = png_bytes(img)
        assert_same(preprocess(data, 112), reference_preprocess(data, 112))
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(photo(1800, 1400), "JPEG", exif=exif.tobytes(), quality=92)
    assert_same(preprocess(data, 112), reference_preprocess(data, 112))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation):
    rgb = random_rgb(10, 16, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = exif.tobytes()
    for data in (png_bytes(Image.fromarray(rgb), exif=tagged), encode(photo(30, 52), "JPEG", exif=tagged)):
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert_same(decode_image(data), expected)
        for size in (112, 9):
            assert_same(preprocess(data, size), reference_preprocess(data, size))
    stored = np.arange(6 * 4).reshape(6, 4)
    assert orient(stored, orientation).shape == ((4, 6) if orientation >= 5 else (6, 4))


def test_fast_jpeg_path_equals_pillows_own_decoding():
    """Plain JPEGs skip Pillow's Python header parser and decode straight into numpy
    (worker.inference.jpeg.decode_plain_jpeg); the pixels must be those of Image.open().load() for every variant the
    fast path takes, and the slow path takes the rest."""
    variants = {
        "baseline 4:2:0": encode(photo(67, 91), "JPEG", quality=85),
        "4:4:4": encode(photo(67, 91), "JPEG", subsampling=0, quality=95),
        "4:2:2": encode(photo(67, 91), "JPEG", subsampling=1),
        "progressive": encode(photo(120, 80), "JPEG", progressive=True),
        "optimised": encode(photo(64, 64), "JPEG", optimize=True),
        "grey": encode(photo(50, 70).convert("L"), "JPEG"),
        "grey progressive": encode(photo(50, 70).convert("L"), "JPEG", progressive=True),
        "restart markers": encode(photo(96, 96), "JPEG", restart_marker_blocks=2),
        "icc + comment": encode(photo(40, 40), "JPEG", icc_profile=b"\0" * 300, comment=b"hello"),
    }
    for name, data in variants.items():
        header = jpeg_header(data)
        assert header is not None and header.plain, name
        decoded = open_image(data)
        expected = Image.open(io.BytesIO(data))
        expected.load()
        assert decoded.image is None and decoded.pixels is not None  # decoded straight into numpy
        assert decoded.pixels.shape[2] == (1 if expected.mode == "L" else 4)
        if expected.mode == "RGB":
            assert (decoded.pixels[:, :, 3] == 255).all()
        assert decoded.array().tobytes() == expected.tobytes(), name
    exif = Image.Exif()
    exif[0x0112] = 1
    with_exif = encode(photo(40, 40), "JPEG", exif=exif.tobytes())
    cmyk = encode(photo(40, 40).convert("CMYK"), "JPEG")
    assert not jpeg_header(with_exif).plain and not jpeg_header(cmyk).plain  # Pillow's full path


# --- the seed's arithmetic, independently --------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(7, 13), (13, 7), (116, 116), (29, 58), (150, 150), (61, 200), (3, 112)])
def test_padding_and_resize_match_tensorflow_kernel_and_tfjs_formula(h, w):
    rgb = random_rgb(h, w)
    ours = pad_and_resize(rgb, 112)
    assert ours.shape == (112, 112, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_seed_pipeline(rgb), atol=5e-3)  # TF computes in float32
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


# --- decoding --------------------------------------------------------------------------------------------------


def test_grey_palette_and_rgba_images_become_rgb():
    grey = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(decode_image(png_bytes(Image.fromarray(grey, "L"))), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    assert np.array_equal(decode_image(png_bytes(Image.fromarray(rgba, "RGBA"))), rgba[:, :, :3])  # alpha dropped
    pal = Image.fromarray(random_rgb(20, 30)).convert("P")
    assert np.array_equal(decode_image(png_bytes(pal)), np.asarray(pal.convert("RGB")))
    assert as_rgb_array(grey).shape == (20, 30, 3) and as_rgb_array(rgba).shape == (20, 30, 3)


def test_exif_orientation_is_applied():
    rgb = random_rgb(10, 16, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(png_bytes(Image.fromarray(rgb), exif=exif.tobytes()))
    assert decoded.shape == (16, 10, 3)
    assert np.array_equal(decoded, np.rot90(rgb, k=-1))


def test_sixteen_bit_png_and_cmyk_jpeg_decode():
    wide = np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160
    out = decode_image(png_bytes(Image.fromarray(wide)))
    np.testing.assert_array_equal(out[:, :, 0], np.rint(wide / 257.0).astype(np.uint8))
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # the 16 -> 8 bit table, all values
    expected = np.rint(every * (255.0 / 65535.0)).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(png_bytes(Image.fromarray(every)))[:, :, 2], expected)
    buf = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(buf, "JPEG", quality=95)
    rgb = decode_image(buf.getvalue())
    assert rgb.shape == (20, 20, 3) and rgb[10, 10, 1] < 40 and rgb[10, 10, 0] > 200  # magenta


def test_array_input_equals_encoded_input():
    rgb = random_rgb(40, 25, seed=4)
    np.testing.assert_array_equal(preprocess(rgb, 112), preprocess(png_bytes(Image.fromarray(rgb)), 112))
    np.testing.assert_array_equal(preprocess(rgb[:, :, 0], 112), preprocess(np.repeat(rgb[:, :, :1], 3, axis=2), 112))


def test_tensorflow_jpeg_decoder_gives_tensorflows_exact_pixels():
    import tensorflow as tf

    limits = DecodeLimits(jpeg_decoder="tensorflow")
    jpegs = [p.read_bytes() for p in sorted((FACES / "group").glob("*.jpg"))] + [
        encode(photo(90, 70), "JPEG", progressive=True),
        encode(photo(90, 70).convert("L"), "JPEG"),
        encode(photo(90, 70).convert("CMYK"), "JPEG"),
    ]
    for data in jpegs:
        expected = tf.io.decode_jpeg(data, channels=3).numpy()  # the seed's decoder with its defaults (INTEGER_FAST)
        assert_same(decode_image(data, limits), expected)
        assert_same(preprocess(data, 112, limits), reference_pad_and_resize(expected, 112))
    pillow = decode_image(jpegs[0]).astype(int)
    tf_pixels = tf.io.decode_jpeg(jpegs[0], channels=3).numpy()
    assert 0 < np.abs(pillow - tf_pixels).max() <= 20  # the two IDCTs differ (FINDINGS #2)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(photo(40, 64), "JPEG", exif=exif.tobytes())
    expected = np.ascontiguousarray(np.rot90(tf.io.decode_jpeg(rotated, channels=3).numpy(), k=-1))
    assert_same(decode_image(rotated, limits), expected)
    png = png_bytes(Image.fromarray(random_rgb(30, 30)))
    assert_same(decode_image(png, limits), decode_image(png))  # PNGs decode identically everywhere


def test_importing_preprocessing_loads_neither_tensorflow_nor_rq_nor_redis():
    code = (
        "import sys, worker.inference.preprocess, worker.inference.decode, worker.inference.files\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'rq', 'redis'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=patience(120), check=True
    )
    assert out.stdout.strip() == "[]"


def test_limits_come_from_the_worker_settings(monkeypatch):
    from worker.settings import WorkerSettings

    monkeypatch.setenv("ARCFACE_JPEG_DECODER", "tensorflow")
    monkeypatch.setenv("ARCFACE_MAX_IMAGE_PIXELS", "1000000")
    monkeypatch.setenv("ARCFACE_MIN_IMAGE_SIDE", "16")
    limits = DecodeLimits.from_settings(WorkerSettings())
    assert (limits.jpeg_decoder, limits.max_pixels, limits.min_side) == ("tensorflow", 1_000_000, 16)
    assert DecodeLimits().jpeg_decoder == "pillow"


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", ErrorCode.IMAGE_DECODE_ERROR),
        (b"hello, this is text and not an image\n" * 3, ErrorCode.IMAGE_DECODE_ERROR),
        (truncated_jpeg(), ErrorCode.IMAGE_DECODE_ERROR),
        (truncated_jpeg(2000), ErrorCode.IMAGE_DECODE_ERROR),
        (png_header_only(20000, 20000), ErrorCode.IMAGE_TOO_LARGE),
        (png_header_only(40, 40), ErrorCode.IMAGE_DECODE_ERROR),
        (png_bytes(Image.new("RGB", (1, 1))), ErrorCode.IMAGE_TOO_SMALL),
        (png_bytes(Image.new("RGB", (300, 300))), ErrorCode.IMAGE_TOO_LARGE),  # over the configured 50k limit
        (encode(Image.new("RGB", (300, 300)), "JPEG"), ErrorCode.IMAGE_TOO_LARGE),
        (encode(Image.new("RGB", (300, 300)), "WEBP"), ErrorCode.IMAGE_TOO_LARGE),
        (encode(Image.new("RGB", (40, 40)), "TIFF"), ErrorCode.IMAGE_DECODE_ERROR),  # not an accepted format
        (encode(Image.new("RGB", (40, 40)), "ICO"), ErrorCode.IMAGE_DECODE_ERROR),
        (b"\xff\xd8\xff\xe0" + b"\0" * 100, ErrorCode.IMAGE_DECODE_ERROR),  # JPEG magic, no frame
    ],
    ids=[
        "zero-bytes",
        "text",
        "truncated-jpeg-header",
        "truncated-jpeg-data",
        "20000x20000-header",
        "broken-png-data",
        "1x1",
        "bomb-over-limit",
        "jpeg-over-limit",
        "webp-over-limit",
        "tiff",
        "ico",
        "jpeg-without-frame",
    ],
)
def test_bad_input_raises_one_typed_error(data, code):
    with pytest.raises(JobFailure) as info:
        preprocess(data, 112, DecodeLimits(max_pixels=50_000))
    assert info.value.code is code
    assert info.value.message
    with pytest.raises(JobFailure) as info:
        decode_image(data, DecodeLimits(max_pixels=50_000))
    assert info.value.code is code


def test_refused_formats_name_what_is_accepted_and_never_echo_bytes():
    tiff = encode(Image.new("RGB", (40, 40)), "TIFF")
    with pytest.raises(JobFailure) as info:
        decode_image(tiff)
    assert "TIFF images are not accepted" in info.value.message and "JPEG, PNG" in info.value.message
    with pytest.raises(JobFailure) as info:
        decode_image(b"SECRET-TOKEN-0123456789 is not an image")
    assert "SECRET" not in info.value.message
    assert decode_image(tiff, DecodeLimits(formats=("TIFF",))).shape == (40, 40, 3)


def test_decoded_rows_and_array_agree():
    img = photo(300, 200)
    decoded = open_image(png_bytes(img))
    assert isinstance(decoded, Decoded) and decoded.channels == 3
    full = decoded.array()
    rows = np.array([0, 1, 2, 57, 58, 299])
    np.testing.assert_array_equal(decoded.rows(rows), full[rows])
    np.testing.assert_array_equal(decoded.rows(rows, rgbx=True)[:, :, :3], full[rows])
