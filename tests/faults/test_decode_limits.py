"""Hostile images against the decoder (issue 11, items 5, 8 and 12): decode-time bombs refused before any
decoding, memory bounded by a formula of the limits, malformed metadata and floating-point pixels handled
with typed errors. Every file is generated here."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from producer.contract.codes import ErrorCode, JobFailure
from tests.conftest import REPO
from tests.patience import patience
from worker.inference.decode import jpeg_header
from worker.inference.decode_checks import BYTES_PER_PIXEL
from worker.inference.jpeg import jpeg_scans
from worker.inference.preprocess import DecodeLimits, decode_image, preprocess

MiB = 1024 * 1024
# Work buffers of the sampled resize, Pillow's per-image state, allocator slack: the constant in the formulas.
SLACK = 48 * MiB


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def scan_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every scan of a JPEG: the SOS segment and its entropy-coded data."""
    out, i = [], 2
    while i < len(data) - 1:
        marker = data[i + 1]
        if marker == 0xD9:
            break
        j = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            while True:  # entropy-coded data runs to the next marker that is not a stuffed 00 or a restart
                j = data.index(b"\xff", j)
                if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                    j += 2
                    continue
                break
            out.append((i, j))
        i = j
    return out


def repeat_last_scan(data: bytes, times: int) -> bytes:
    """The decode-time bomb of issue 11 item 5: a progressive JPEG whose last scan is repeated."""
    start, end = scan_segments(data)[-1]
    return data[:end] + data[start:end] * times + data[end:]


@pytest.fixture(scope="module")
def progressive() -> bytes:
    data = encode(photo(1000, 1000), "JPEG", quality=90, progressive=True)  # ~1 MP, like the 244 KB file
    assert len(scan_segments(data)) == jpeg_scans(data) == 10
    return data


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


DEFAULT = DecodeLimits()


def refused(data: bytes, limits: DecodeLimits = DEFAULT, fn=preprocess) -> JobFailure:
    with pytest.raises(JobFailure) as info:
        fn(data, 112, limits) if fn is preprocess else fn(data, limits)
    return info.value


# --- item 5: decode-time bombs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["pillow", "tensorflow"])
def test_repeated_scan_bomb_is_refused_before_decoding(progressive, decoder):
    limits = DecodeLimits(jpeg_decoder=decoder)
    bomb = repeat_last_scan(progressive, 1000)  # 1,010 scans of 1 MP: tens of seconds of libjpeg time
    assert jpeg_scans(bomb) == 1010
    err = refused(bomb, limits)
    assert err.code is ErrorCode.IMAGE_TOO_LARGE and "more than 100 scans" in err.message and "baseline" in err.message
    # "Before decoding": refusing the 1,010-scan file costs less CPU than decoding a 30-scan one.
    mild = repeat_last_scan(progressive, 20)
    decode_cpu = cpu_seconds(lambda: preprocess(mild, 112, limits))
    refuse_cpu = min(cpu_seconds(lambda: refused(bomb, limits)) for _ in range(3))
    assert refuse_cpu < decode_cpu / 5, (refuse_cpu, decode_cpu)


def test_scan_limits_count_and_pixel_scan_budget(progressive):
    assert preprocess(repeat_last_scan(progressive, 80), 112).shape == (112, 112, 3)  # 90 scans of 1 MP: allowed
    err = refused(repeat_last_scan(progressive, 91))  # 101 scans: over max_jpeg_scans whatever the size
    assert err.code is ErrorCode.IMAGE_TOO_LARGE and "more than 100 scans" in err.message
    small = DecodeLimits(max_pixels=2_000_000, jpeg_scan_factor=6)  # budget 12 M pixel-scans
    assert preprocess(progressive, 112, small).shape == (112, 112, 3)  # 10 M
    err = refused(repeat_last_scan(progressive, 3), small)  # 13 M
    assert err.code is ErrorCode.IMAGE_TOO_LARGE and "more than 12 scans" in err.message


def test_scans_in_metadata_do_not_count():
    # An EXIF thumbnail (or any APP/COM payload) holding FF DA bytes is skipped: only the main image's scans count.
    base = encode(photo(200, 300), "JPEG")
    junk = b"\xff\xda" * 500
    with_junk = base[:2] + b"\xff\xfe" + struct.pack(">H", len(junk) + 2) + junk + base[2:]
    header = jpeg_header(with_junk)
    assert header is not None and jpeg_scans(with_junk, header) == 1 and with_junk.count(b"\xff\xda") == 501
    np.testing.assert_array_equal(preprocess(with_junk, 112), preprocess(base, 112))


def test_a_decoder_that_runs_past_its_wall_clock_budget_fails_alone():
    data = encode(photo(300, 300), "PNG")
    err = refused(data, DecodeLimits(max_decode_s=0.0))
    assert err.code is ErrorCode.IMAGE_DECODE_ERROR and "still decoding after 0 s" in err.message
    assert preprocess(data, 112).shape == (112, 112, 3)  # the same file within the default budget


# --- item 8: memory ----------------------------------------------------------------------------------------------


def black_png(width: int, height: int, channels: int) -> bytes:
    """A valid all-black PNG written row by row (the 40 MP grey one is ~39 KB; nothing full-size in memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + width * channels)
    idat = b"".join([comp.compress(row) for _ in range(height)] + [comp.flush()])
    kind = {1: 0, 3: 2}[channels]
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, kind, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def peak_growth(path: Path, call: str) -> int:
    """Peak RSS growth (bytes) of a fresh interpreter running ``call`` on the image at ``path``."""
    code = textwrap.dedent(f"""
        import resource, numpy as np
        from worker.inference.preprocess import preprocess, decode_image
        data = open({str(path)!r}, "rb").read()
        preprocess(np.zeros((16, 16, 3), np.uint8), 112)  # imports and first-call state before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {call}
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.size > 0
        print((after - before) * 1024)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=patience(300))
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("channels", [1, 3])
def test_40_megapixel_png_is_accepted_at_the_limit_with_bounded_memory(tmp_path, channels):
    """The formula (README): preprocessing one image costs at most 4 B x max_pixels + 48 MiB of peak RSS (the
    decoder's image: 4 bytes per colour pixel, 1 per grey one; the resize reads only its ~224 sampled rows);
    decode_image (the detection path) adds the H x W x 3 uint8 array it returns (+1 B/px for grey)."""
    limits = DecodeLimits()
    width, height = 8000, 5000
    assert width * height == limits.max_pixels  # exactly at the default limit: accepted
    data = black_png(width, height, channels)
    if channels == 1:
        assert len(data) < 45_000  # the 39 KB file
    path = tmp_path / "black.png"
    path.write_bytes(data)
    grown = peak_growth(path, "preprocess(data, 112)")
    assert grown <= BYTES_PER_PIXEL * limits.max_pixels + SLACK, grown
    if channels == 1:
        assert grown <= width * height + SLACK, grown  # grey stays one byte a pixel
    grown = peak_growth(path, "decode_image(data)")
    assert grown <= BYTES_PER_PIXEL * limits.max_pixels + 4 * width * height + SLACK, grown
    # one row more is refused by the limit, before anything is decoded, whatever the format
    for over in (black_png(width, height + 1, channels), encode(Image.new("L", (width, height + 1)), "JPEG")):
        err = refused(over)
        assert err.code is ErrorCode.IMAGE_TOO_LARGE and "40008000 pixels, over the limit of 40000000" in err.message
    assert Image.MAX_IMAGE_PIXELS == limits.max_pixels  # Pillow's own limit follows ours


def test_decoders_that_need_more_memory_per_pixel_are_limited_accordingly():
    limits = DecodeLimits(max_pixels=1_000_000)  # 4 MB per image
    img = photo(700, 700)  # 0.49 MP
    assert preprocess(encode(img, "JPEG"), 112, limits).shape == (112, 112, 3)  # baseline: 4 B/px
    err = refused(encode(img, "JPEG", progressive=True, subsampling=0), limits)  # 4 + 2 x 3 samples = 10 B/px
    assert err.code is ErrorCode.IMAGE_TOO_LARGE and "10 bytes per pixel" in err.message
    assert "400000 pixels" in err.message
    smaller = encode(photo(600, 600), "JPEG", progressive=True, subsampling=0)  # 0.36 MP x 10 B: within the 4 MB
    assert preprocess(smaller, 112, limits).shape == (112, 112, 3)
    err = refused(encode(photo(500, 500), "WEBP"), limits)  # 18 B/px: at most 222,222 pixels here
    assert err.code is ErrorCode.IMAGE_TOO_LARGE and "18 bytes per pixel" in err.message
    assert preprocess(encode(photo(400, 400), "WEBP"), 112, limits).shape == (112, 112, 3)


# --- item 12: malformed EXIF, floating-point pixels, unsupported variants --------------------------------------


def jpeg_with_app1(img: Image.Image, payload: bytes) -> bytes:
    data = encode(img, "JPEG", quality=95)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def test_exif_that_makes_pillows_exif_transpose_raise_still_orients_the_image():
    # Orientation 6 plus a FLOAT-typed ResolutionUnit: Pillow reads it, but exif_transpose raises (struct.error)
    # when it writes the EXIF back. Only the orientation is read here, so the image decodes, rotated.
    entries = [struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0), struct.pack("<HHIf", 0x0128, 11, 1, 1.5)]
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + b"".join(entries) + b"\0\0\0\0"
    img = photo(40, 64)
    data = jpeg_with_app1(img, exif)
    with pytest.raises(struct.error):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    plain = decode_image(encode(img, "JPEG", quality=95))
    decoded = decode_image(data)
    assert decoded.shape == (64, 40, 3)
    np.testing.assert_array_equal(decoded, np.rot90(plain, k=-1))


def test_exif_that_cannot_be_parsed_counts_as_no_orientation():
    img = photo(30, 50)
    info = PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n      10\nnot hex at all, zz\n")  # ImageMagick-style EXIF, broken
    data = encode(img, "PNG", pnginfo=info)
    with pytest.raises(ValueError):
        Image.open(io.BytesIO(data)).getexif()
    np.testing.assert_array_equal(decode_image(data), np.asarray(img))
    orientation_9 = struct.pack("<IHHHIHH", 8, 1, 0x0112, 3, 1, 9, 0)
    garbage = [
        b"Exif\x00\x00XX*\x00\x08\x00\x00\x00",
        b"Exif\x00\x00II*\x00" + struct.pack("<I", 10_000),
        b"Exif\x00\x00II*\x00" + orientation_9 + b"\0\0\0\0",
    ]
    plain = decode_image(encode(img, "JPEG", quality=95))
    for payload in garbage:
        np.testing.assert_array_equal(decode_image(jpeg_with_app1(img, payload)), plain)


def test_floating_point_tiff_is_refused_not_embedded_as_black():
    values = np.random.default_rng(0).random((40, 40)).astype(np.float32)  # 0..1, as float TIFFs usually hold
    data = encode(Image.frombytes("F", (40, 40), values.tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    err = refused(data)
    assert err.code is ErrorCode.IMAGE_DECODE_ERROR and "TIFF images are not accepted" in err.message
    err = refused(data, DecodeLimits(formats=("TIFF",)))
    assert err.code is ErrorCode.IMAGE_DECODE_ERROR and "floating-point images are not supported" in err.message
    err = refused(data, DecodeLimits(formats=("TIFF",)), fn=decode_image)
    assert "floating-point" in err.message


def test_run_length_encoded_bmp_is_refused():
    width, height = 16, 8
    rle = b"".join(bytes([width, 7]) + b"\x00\x00" for _ in range(height)) + b"\x00\x01"  # runs, ends of lines
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)  # compression 1 = RLE8
    data = b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + info + palette + rle
    assert Image.open(io.BytesIO(data)).info.get("compression") == 1
    err = refused(data)
    assert err.code is ErrorCode.IMAGE_DECODE_ERROR and "run-length-encoded BMP" in err.message
