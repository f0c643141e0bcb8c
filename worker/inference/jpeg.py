"""JPEG without decoding (header and scans, read from the segments) and the two direct JPEG decoders: Pillow's C
decoder straight into numpy for plain JPEGs, and TensorFlow's (``jpeg_decoder="tensorflow"``). What the checks
bound and why is explained in :mod:`worker.inference.decode`, which re-exports these names."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from producer.contract.codes import ErrorCode, JobFailure
from worker.inference.decode_checks import BYTES_PER_PIXEL, DecodeLimits, check_memory, check_size

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Pillow's C decoder called directly (plain JPEGs); Pillow's own path is used if a release ever drops these.
FAST_JPEG = hasattr(Image.core, "map_buffer") and hasattr(Image.core, "jpeg_decoder")  # type: ignore[attr-defined]
_SEGMENT = struct.Struct(">BBH")  # a JPEG marker (FF xx) and the segment length after it


@dataclass(frozen=True)
class JpegHeader:
    """What the segments before a JPEG's first scan say."""

    width: int
    height: int
    components: int
    precision: int
    sof: int  # the frame marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    samples: float  # DCT samples per pixel (3 at 4:4:4, 1.5 at 4:2:0, 1 for grey)
    first_scan: int  # offset of the first SOS marker
    metadata: bool  # an APP1 segment (EXIF or XMP: the orientation may be set)

    @property
    def plain(self) -> bool:
        """8-bit grey or colour Huffman JPEG without EXIF/XMP: decoded without Pillow's Python header parser."""
        return (
            self.sof in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components in (1, 3) and not self.metadata
        )


def _jpeg_frame(seg: bytes, marker: int) -> tuple[int, int, int, int, int, float] | None:
    """(precision, height, width, components, marker, samples per pixel) of a frame header's body."""
    if len(seg) < 6:
        return None
    count = seg[5]
    factors = [(b >> 4, b & 15) for b in seg[7 : 6 + 3 * count : 3]]
    if len(factors) != count or not factors or any(h == 0 or v == 0 for h, v in factors):
        return None
    hmax, vmax = max(h for h, _ in factors), max(v for _, v in factors)
    samples = sum(h * v for h, v in factors) / (hmax * vmax)
    return seg[0], int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), count, marker, samples


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk a JPEG's segments by their lengths up to its first scan; ``None`` without a frame header and a scan."""
    n, i = len(data), 2
    frame: tuple[int, int, int, int, int, float] | None = None
    metadata = False
    segment = _SEGMENT.unpack_from
    while i + 4 <= n:
        ff, marker, length = segment(data, i)
        if ff != 0xFF:
            i = data.find(b"\xff", i)  # garbage before a marker: libjpeg skips it too
            if i < 0:
                return None
        elif marker == 0xDA:
            if frame is None:
                return None
            precision, height, width, count, sof, samples = frame
            return JpegHeader(width, height, count, precision, sof, samples, i, metadata)
        elif marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif marker in (0xD8, 0xD9):
            return None
        else:
            if marker in _JPEG_SOF and frame is None:
                frame = _jpeg_frame(data[i + 4 : i + 2 + length], marker)
                if frame is None:
                    return None
            elif marker == 0xE1:
                metadata = True
            i += 2 + length
    return None


def jpeg_scans(data: bytes, header: JpegHeader | None = None, stop: int | None = None) -> int:
    """How many scans (SOS segments) a JPEG's main image has, counted without decoding; with ``stop``, counting
    ends once that many are found (a bomb's thousands of scans are not all walked).

    Header segments are skipped (an EXIF thumbnail's scans do not count); from the first scan on, every ``FF DA``
    pair counts: entropy-coded data cannot hold one (a data ``FF`` is always followed by ``00`` or a restart
    marker), so this can over-count (e.g. an image appended after the end) but never under-count.
    """
    header = header or jpeg_header(data)
    start = header.first_scan if header else 0
    if stop is None:
        return data.count(b"\xff\xda", start)
    found, i = 0, start - 1
    while found < stop:
        i = data.find(b"\xff\xda", i + 1)
        if i < 0:
            break
        found += 1
    return found


def check_jpeg(data: bytes, header: JpegHeader, limits: DecodeLimits) -> None:
    check_size(header.width, header.height, limits)
    budget = limits.jpeg_scan_factor * limits.max_pixels
    allowed = min(limits.max_jpeg_scans, int(budget // (header.width * header.height)))
    scans = jpeg_scans(data, header, stop=allowed + 1)
    if scans > allowed:
        raise JobFailure(
            ErrorCode.IMAGE_TOO_LARGE,
            f"JPEG is {header.width}x{header.height} with more than {allowed} scans: decoding costs about one pass "
            f"over the image per scan, and at most {limits.max_jpeg_scans} scans and {budget:.3g} pixels x scans are "
            "allowed (an ordinary progressive JPEG has under 12); re-encode it, e.g. as a baseline JPEG",
        )
    image = 1 if header.components == 1 and limits.jpeg_decoder == "pillow" else BYTES_PER_PIXEL
    if scans > 1:
        check_memory(
            "a progressive (multi-scan) JPEG",
            header.width,
            header.height,
            image + 2 * header.samples,
            "the decoder keeps every DCT coefficient of a multi-scan JPEG",
            "send it as a baseline JPEG",
            limits,
        )


def decode_plain_jpeg(data: bytes, header: JpegHeader) -> np.ndarray:
    """libjpeg-turbo through Pillow's C decoder, as ``Image.open(...).load()`` runs it for such a file, but
    without the Python header parser (a third of a 112 px crop's cost, all of it holding the GIL) and writing
    straight into a numpy array: (H, W, 1) for grey, (H, W, 4) RGB + a padding byte for colour (Pillow's own
    layout), so no copy out of Pillow follows. Errors as Pillow's."""
    width, height = header.width, header.height
    grey = header.components == 1
    pixels = np.empty((height, width, 1 if grey else 4), np.uint8)
    mode, rawmode = ("L", "L") if grey else ("RGBX", "RGB")
    core = Image.core.map_buffer(pixels, (width, height), "raw", 0, (mode, 0, 1))  # type: ignore[attr-defined]
    decoder = Image.core.jpeg_decoder(mode, rawmode, "")  # type: ignore[attr-defined]
    try:
        decoder.setimage(core, (0, 0, width, height))
        consumed, err = decoder.decode(data)
    finally:
        decoder.cleanup()
    if err < 0:
        raise OSError(f"decoder error {err}")
    if consumed >= 0:  # the decoder wants more input than there is
        raise OSError("image file is truncated")
    return pixels


def decode_tensorflow(data: bytes, width: int, height: int) -> np.ndarray:
    """TensorFlow's JPEG decoder with its defaults (INTEGER_FAST IDCT: the seed's pixels), 3 channels, read as
    a view of the tensor (no copy). TensorFlow is imported here, only by workers that choose this decoder."""
    import tensorflow as tf  # noqa: PLC0415

    try:
        tensor = tf.io.decode_jpeg(data, channels=3)
    except tf.errors.OpError as exc:
        first = (exc.message or type(exc).__name__).splitlines()[0]
        raise JobFailure(ErrorCode.IMAGE_DECODE_ERROR, f"cannot decode JPEG: {first}") from None
    pixels = tensor._numpy() if hasattr(tensor, "_numpy") else tensor.numpy()  # _numpy: a view, .numpy(): a copy
    if pixels.shape[:2] != (height, width):
        raise JobFailure(
            ErrorCode.IMAGE_DECODE_ERROR,
            f"JPEG decoded to {pixels.shape[1]}x{pixels.shape[0]}, not the {width}x{height} of its header",
        )
    return pixels
