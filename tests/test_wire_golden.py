"""The wire format does not drift: every job kind, enqueued by the client and served by a real worker, writes the
same bytes as the recorded golden file (tests/data/wire-golden.json).

Compared byte for byte: each job hash's ``data`` (the JSON payload) and every field rq and the producers read
(``origin``, ``description``, ``timeout``, TTLs, ``status``, ``meta``), the field names of the job hash and of its
result-stream entry, a failure's ``exc_string`` text and typed error. Values that differ from run to run by
nature are replaced by a placeholder that keeps their type (ids, times, worker names, timings, embeddings and
distances of the randomly initialised test model), so key order, names, types, codes and lengths still count.

To record the file again on purpose: ``ARCFACE_WIRE_GOLDEN_WRITE=1 ./dev test tests/test_wire_golden.py``.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.client import FaceClient
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.workers import queue_env, ready_worker

GOLDEN = REPO / "tests" / "data" / "wire-golden.json"
VOLATILE_HASH_FIELDS = {
    "created_at",
    "enqueued_at",
    "started_at",
    "ended_at",
    "last_heartbeat",
    "worker_name",
    "arcface_execution",
}
VOLATILE_ENTRY_FIELDS = {"worker_name", "execution_id", "execution_started_at", "execution_ended_at", "created_at"}
VOLATILE_VALUE_KEYS = {"timing", "enrollment_id", "enrolled_at", "created_at"}


def _shape(value: Any) -> Any:
    """``value`` with run-dependent numbers and ids replaced by their type (structure and key order kept)."""
    if isinstance(value, dict):
        return {k: (_placeholder(v) if k in VOLATILE_VALUE_KEYS else _shape(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, float):
        return "<float>"
    if isinstance(value, str) and len(value) > 64:  # base64 embeddings and matrices
        return f"<str:{len(value)}>"
    return value


def _placeholder(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _placeholder(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "b64:" + base64.b64encode(raw).decode("ascii")


def _maybe_decompressed(raw: bytes) -> bytes:
    try:
        return zlib.decompress(raw)
    except zlib.error:
        return raw


def _job_hash(fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(fields):
        name = key.decode()
        if name in VOLATILE_HASH_FIELDS:
            out[name] = "<volatile>"
        elif name == "data":
            out[name] = _shape(json.loads(_maybe_decompressed(fields[key])))
        elif name in ("meta",):
            out[name] = _shape(json.loads(fields[key]))
        elif name == "exc_info":
            out[name] = _text(_maybe_decompressed(fields[key]))
        else:
            out[name] = _text(fields[key])
    return out


def _entry(fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in fields.items():
        name = key.decode()
        if name in VOLATILE_ENTRY_FIELDS:
            out[name] = "<volatile>"
        elif name == "return_value":
            out[name] = _shape(json.loads(base64.b64decode(raw)))
        elif name == "exc_string":
            out[name] = zlib.decompress(base64.b64decode(raw)).decode()
        elif name == "error":
            out[name] = json.loads(raw)
        else:
            out[name] = _text(raw)
    return out


def _jobs(client: FaceClient) -> dict[str, str]:
    """One job of every kind, in a fixed order; returns kind -> job id."""
    faces = face_paths()
    amy, amy2, bob = faces[0], faces[1], faces[5]
    ids = {
        "embed": client.embed(amy, ref="r-1"),
        "embed_failed": client.embed(b"not an image"),
        "verify": client.verify(amy, amy2),
        "embed_batch": client.embed_batch([amy, bob]),
        "verify_batch": client.verify_batch([(amy, amy2), (amy, bob)]),
    }
    ids["enroll"] = client.enroll("amy", amy, gallery="golden")
    client.result(ids["enroll"], timeout=patience(120))
    vector = np.ones(512, np.float32) / np.sqrt(512)
    ids["identify"] = client.identify(amy2, gallery="golden", top_k=2)
    ids["verify_subject"] = client.verify_subject(amy2, "amy", gallery="golden")
    ids["verify_embedding"] = _gallery_module().verify(client, amy2, _gallery_module().Embedding(vector))
    for job_id in list(ids.values()):
        try:
            client.result(job_id, timeout=patience(120))
        except Exception:  # noqa: BLE001 - a failed job is part of what is recorded
            pass
    ids["forget"] = client.forget("amy", gallery="golden")
    client.result(ids["forget"], timeout=patience(120))
    return ids


def _gallery_module() -> Any:
    import importlib

    return importlib.import_module("producer.client.gallery")


@pytest.fixture(scope="module")
def recorded(arcface_h5, redis_server, tmp_path_factory) -> dict[str, Any]:
    env = queue_env(
        redis_server.url,
        "golden",
        ARCFACE_MODEL_PATH=str(arcface_h5),
        ARCFACE_ALLOWED_BATCH_SIZES="1,4",
        ARCFACE_MAX_BATCH_SIZE="4",
        ARCFACE_THRESHOLD="0.61",
    )
    with ready_worker(env, tmp_path_factory.mktemp("golden") / "worker.log") as worker:
        client = worker.client()
        ids = _jobs(client)
        r = redis_server.client()
        out: dict[str, Any] = {}
        for kind, job_id in ids.items():
            entries = r.xrange(f"rq:results:{job_id}")
            out[kind] = {
                "job": _job_hash(r.hgetall(f"rq:job:{job_id}")),
                "results": [_entry(fields) for _, fields in entries],
            }
    for record in out.values():  # the queue name is random per run
        record["job"]["origin"] = "<queue>"
    return out


def test_every_job_kind_writes_the_recorded_wire_bytes(recorded: dict[str, Any]) -> None:
    if os.environ.get("ARCFACE_WIRE_GOLDEN_WRITE"):
        GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
    golden = json.loads(Path(GOLDEN).read_text())
    assert list(recorded) == list(golden)
    for kind in golden:
        assert recorded[kind] == golden[kind], kind
