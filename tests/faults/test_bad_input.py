"""Hostile and broken jobs, written straight into Redis (bypassing the producer's validation) and mixed
with good jobs: each bad one fails alone with its stable code, the good ones in the same batches succeed,
the worker stays up, and nothing is ever unpickled or run."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rq.registry import StartedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode
from producer.contract.errors import JobFailed
from producer.contract.keys import EMBED_FUNC, VERIFY_FUNC
from producer.settings import ProducerSettings
from tests.conftest import FACES, face_paths
from tests.patience import patience
from tests.workers import WorkerProcess


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png_bomb() -> bytes:
    """A real, fully valid 8000x8000 grey PNG of ~60 KB: 64 M pixels, over the worker's 40 M limit."""
    return encode(Image.new("L", (8000, 8000)), "PNG", optimize=False, compress_level=9)


def write_raw_job(conn, queue: str, data: bytes, job_id: str | None = None, extra: dict | None = None) -> str:
    """Write an rq job hash and queue entry by hand, as a non-Python or hostile producer would."""
    job_id = job_id or f"raw-{uuid.uuid4().hex}"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = {
        "data": data,
        "origin": queue,
        "status": "queued",
        "created_at": now,
        "enqueued_at": now,
        "description": "raw",
        "timeout": "180",
        "result_ttl": "600",
        "failure_ttl": "600",
        **(extra or {}),
    }
    conn.hset(f"rq:job:{job_id}", mapping=fields)
    conn.sadd("rq:queues", f"rq:queue:{queue}")
    conn.rpush(f"rq:queue:{queue}", job_id)
    return job_id


def call(func: str, payload) -> bytes:
    return json.dumps([func, None, [payload], {}]).encode()


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def env(worker_env, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "amy1.png").write_bytes((FACES / "amy" / "amy1.png").read_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes((FACES / "raj" / "raj1.png").read_bytes())
    (root / "escape.png").symlink_to(outside)
    return {**worker_env, "ARCFACE_SHARED_ROOT": str(root), "ARCFACE_MAX_INLINE_BYTES": str(200_000)}


def embed_call(data: bytes) -> bytes:
    return call(EMBED_FUNC, {"kind": "embed", "image": {"data_b64": b64(data)}})


def bad_images(rng: np.random.Generator, jpeg: bytes) -> dict[str, tuple[bytes, ErrorCode]]:
    """Well-formed jobs whose image bytes are broken, too large or too small, with the code each must fail with."""
    embed = embed_call
    return {
        "zero bytes": (embed(b""), ErrorCode.IMAGE_DECODE_ERROR),
        "random bytes": (embed(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()), ErrorCode.IMAGE_DECODE_ERROR),
        "text": (embed(b"GIF? no: just a line of text\n" * 10), ErrorCode.IMAGE_DECODE_ERROR),
        "truncated jpeg": (embed(jpeg[: len(jpeg) // 3]), ErrorCode.IMAGE_DECODE_ERROR),
        "png bomb": (embed(png_bomb()), ErrorCode.IMAGE_TOO_LARGE),
        "1x1": (embed(encode(Image.new("RGB", (1, 1)), "PNG")), ErrorCode.IMAGE_TOO_SMALL),
        "20000x20000 header": (embed(png_header(20000, 20000)), ErrorCode.IMAGE_TOO_LARGE),
    }


def bad_payloads(tmp_path: Path, marker: Path, jpeg: bytes) -> dict[str, tuple[bytes, ErrorCode]]:
    """Malformed or hostile job data (payload, function, pickle, paths), with the code each must fail with."""
    return {
        "bad base64": (
            call(EMBED_FUNC, {"kind": "embed", "image": {"data_b64": "@@not*base64@@"}}),
            ErrorCode.INVALID_PAYLOAD,
        ),
        "missing field": (
            call(VERIFY_FUNC, {"kind": "verify", "a": {"data_b64": b64(jpeg)}}),
            ErrorCode.INVALID_PAYLOAD,
        ),
        "extra field": (
            call(EMBED_FUNC, {"kind": "embed", "image": {"data_b64": b64(jpeg)}, "exec": "rm -rf /"}),
            ErrorCode.INVALID_PAYLOAD,
        ),
        "wrong type": (
            call(EMBED_FUNC, {"kind": "embed", "image": ["not", "an", "object"]}),
            ErrorCode.INVALID_PAYLOAD,
        ),
        "args not an object": (
            json.dumps([EMBED_FUNC, None, ["just a string"], {}]).encode(),
            ErrorCode.INVALID_PAYLOAD,
        ),
        "unknown function": (
            json.dumps(["os.system", None, [f"touch {marker}"], {}]).encode(),
            ErrorCode.UNSUPPORTED_JOB,
        ),
        "pickle data": (
            zlib.compress(pickle.dumps((EMBED_FUNC, None, (Evil(marker),), {}))),
            ErrorCode.INVALID_PAYLOAD,
        ),
        "dotdot path": (
            call(EMBED_FUNC, {"kind": "embed", "image": {"path": "../secret.png"}}),
            ErrorCode.PATH_NOT_ALLOWED,
        ),
        "absolute path": (
            call(EMBED_FUNC, {"kind": "embed", "image": {"path": str(tmp_path / "secret.png")}}),
            ErrorCode.PATH_NOT_ALLOWED,
        ),
        "symlink out": (
            call(EMBED_FUNC, {"kind": "embed", "image": {"path": "escape.png"}}),
            ErrorCode.PATH_NOT_ALLOWED,
        ),
    }


def bad_inputs(
    tmp_path: Path, marker: Path, rng: np.random.Generator, jpeg: bytes
) -> dict[str, tuple[bytes, ErrorCode]]:
    """Every kind of bad job data, with the code it must fail with."""
    return {
        **bad_images(rng, jpeg),
        **bad_payloads(tmp_path, marker, jpeg),
        "too large inline": (
            embed_call(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
    }


def odd_but_valid_inputs(gif_frames: list[Image.Image]) -> dict[str, bytes]:
    """Unusual images that must embed: CMYK JPEG, 16-bit PNG, animated GIF."""
    return {
        "cmyk jpeg": encode(Image.open(face_paths()[1]).convert("CMYK"), "JPEG", quality=95),
        "16-bit png": encode(
            Image.fromarray((np.asarray(Image.open(face_paths()[2]).convert("L"), np.uint16) * 257)), "PNG"
        ),
        "animated gif": encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], loop=0),
    }


def enqueue_inputs(conn, q: str, bad: dict, odd_but_valid: dict, good_faces: list[Path], jpeg: bytes, marker: Path):
    """Write every job by hand, each bad one followed by a good one (so bad and good share batches), then a good
    job with a pickle in its meta, the odd-but-valid images and a job reading an allowed shared path. Returns
    (ids by name, [(good job id, its image path)], pickled-meta job id, shared-path job id)."""
    ids: dict[str, str] = {}
    good: list[tuple[str, Path]] = []
    for i, (name, (data, _)) in enumerate(bad.items()):
        ids[name] = write_raw_job(conn, q, data)
        p = good_faces[i % len(good_faces)]
        good.append((write_raw_job(conn, q, embed_call(p.read_bytes())), p))  # interleaved: bad ones share batches
    pickled_meta = write_raw_job(conn, q, embed_call(jpeg), extra={"meta": zlib.compress(pickle.dumps(Evil(marker)))})
    for name, data in odd_but_valid.items():
        ids[name] = write_raw_job(conn, q, embed_call(data))
    path_ok = write_raw_job(conn, q, call(EMBED_FUNC, {"kind": "embed", "image": {"path": "amy1.png"}}))
    return ids, good, pickled_meta, path_ok


def test_every_kind_of_bad_input_fails_alone_and_odd_but_valid_images_work(env, tmp_path, engine):
    client = FaceClient(ProducerSettings(redis_url=env["ARCFACE_REDIS_URL"], queue=env["ARCFACE_QUEUE"]))
    conn, q = client.connection, env["ARCFACE_QUEUE"]
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(0)
    jpeg = encode(Image.open(face_paths()[0]).convert("RGB"), "JPEG", quality=90)
    gif_frames = [Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).convert("P") for _ in range(3)]
    good_faces = face_paths()[:8]
    bad = bad_inputs(tmp_path, marker, rng, jpeg)
    odd_but_valid = odd_but_valid_inputs(gif_frames)
    ids, good, pickled_meta, path_ok = enqueue_inputs(conn, q, bad, odd_but_valid, good_faces, jpeg, marker)

    worker = WorkerProcess(env, tmp_path / "worker.log", "--burst", ARCFACE_MAX_BATCH_SIZE="16")
    assert worker.wait(patience(300)) == 0, worker.log_path.read_text()[-3000:]

    for name, (_, code) in bad.items():
        with pytest.raises(JobFailed) as info:
            client.result(ids[name], timeout=patience(5))
        assert info.value.error.code is code, f"{name}: {info.value}"
        assert client.status(ids[name]) == "failed"
    # A pickle smuggled into the job's meta is kept as opaque bytes by the JSON serializer (rq stores it
    # as {"unserialized": ...}); the job's own data is valid, so it runs, and the pickle is never loaded.
    assert client.result(pickled_meta, timeout=patience(5)).dim == 512
    direct = dict(zip(good_faces, engine.embed_images([p.read_bytes() for p in good_faces]), strict=True))
    for jid, p in good:
        np.testing.assert_allclose(client.result(jid, timeout=patience(5)).embedding, direct[p], atol=1e-5)
    for name in odd_but_valid:
        assert client.result(ids[name], timeout=patience(5)).dim == 512, name
    np.testing.assert_allclose(
        client.result(path_ok, timeout=patience(5)).embedding,
        engine.embed_images([(FACES / "amy" / "amy1.png").read_bytes()])[0],
        atol=1e-5,
    )
    assert not marker.exists(), "a pickle was unpickled or a foreign function ran"
    assert StartedJobRegistry(q, connection=conn).count == 0
    batches = worker.batches()
    assert any(b["failed"] and b["jobs"] > b["failed"] for b in batches)  # bad and good shared a batch
