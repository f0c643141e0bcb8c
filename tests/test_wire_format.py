"""The README's "Wire format" as a contract: jobs written with raw Redis commands exactly as the spec says (no
rq, no client library), served by a real ``arcface-worker``, results read raw from the result stream; and the
Node.js example producer (examples/node-producer), which follows the same spec, when ``node`` is installed."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.contract.keys import EMBED_FUNC, VERIFY_FUNC, model_info_key
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.workers import queue_env, ready_worker

RESULT_TTL, FAILURE_TTL = 777, 888
TYPES = {1: "successful", 2: "failed", 3: "stopped", 4: "retried", 5: "max_retries_exceeded"}


@pytest.fixture(scope="module")
def wire(arcface_h5, redis_server, tmp_path_factory):
    env = queue_env(
        redis_server.url,
        "wire",
        ARCFACE_MODEL_PATH=str(arcface_h5),
        ARCFACE_ALLOWED_BATCH_SIZES="1,4",
        ARCFACE_MAX_BATCH_SIZE="4",
        ARCFACE_RESULT_TTL=str(RESULT_TTL),
        ARCFACE_FAILURE_TTL=str(FAILURE_TTL),
        ARCFACE_THRESHOLD="0.61",
    )
    with ready_worker(env, tmp_path_factory.mktemp("wireworker") / "worker.log"):
        yield env, redis_server.client()


def rq_now() -> str:
    """The spec's timestamp: UTC, ``%Y-%m-%dT%H:%M:%S.%fZ``; written here with milliseconds (toISOString)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def write_job(
    r: redis.Redis, queue: str, func: str, request: dict, *, minimal: bool, compress: bool = False, **fields: str
) -> str:
    """Enqueue exactly as README "Wire format" says: HSET the job hash, RPUSH its id, SADD the queue key."""
    job_id = str(uuid.uuid4())
    data = json.dumps([func, None, [request], {}]).encode()
    mapping: dict[str, str | bytes] = {"data": zlib.compress(data) if compress else data}
    if not minimal:
        now = rq_now()
        mapping.update(
            {
                "status": "queued",
                "origin": queue,
                "created_at": now,
                "enqueued_at": now,
                "timeout": "180",
                "result_ttl": "600",
                "failure_ttl": "900",
                "description": "raw redis",
            }
        )
    mapping.update(fields)
    with r.pipeline() as pipe:  # MULTI ... EXEC
        pipe.hset(f"rq:job:{job_id}", mapping=mapping)
        pipe.rpush(f"rq:queue:{queue}", job_id)
        pipe.sadd("rq:queues", f"rq:queue:{queue}")
        pipe.execute()
    return job_id


def read_outcome(r: redis.Redis, job_id: str, timeout: float = patience(120)) -> tuple[str, dict]:
    """XREAD BLOCK on rq:results:<id> until a final entry; returns (type name, decoded entry)."""
    deadline, last = time.monotonic() + timeout, "0-0"
    while time.monotonic() < deadline:
        reply = r.xread({f"rq:results:{job_id}": last}, block=2000)
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                f = {k.decode(): v.decode() for k, v in fields.items()}
                kind = TYPES[int(f["type"])]
                if kind == "retried":
                    continue
                if "return_value" in f:
                    f["return_value"] = json.loads(base64.b64decode(f["return_value"]))  # one base64 layer over JSON
                if "exc_string" in f:
                    f["exc_string"] = zlib.decompress(base64.b64decode(f["exc_string"])).decode()  # base64 over zlib
                return kind, f
    raise AssertionError(f"no result for {job_id} in {timeout}s")


def inline(path: Path) -> dict:
    return {"data_b64": base64.b64encode(path.read_bytes()).decode()}


def check_registry(r: redis.Redis, queue: str, job_id: str, registry: str, ttl: int) -> None:
    """Where ``rq info`` / rq-dashboard look: the queue's registry, the job's origin and status, and the TTLs."""
    from rq import Queue

    from producer.contract.rqjob import JSONSerializer

    q = Queue(queue, connection=r, serializer=JSONSerializer)
    reg = q.finished_job_registry if registry == "finished" else q.failed_job_registry
    assert job_id in reg.get_job_ids(), (registry, job_id)
    assert r.zscore(f"rq:{registry}:{queue}", job_id) is not None
    job = r.hgetall(f"rq:job:{job_id}")
    assert job[b"origin"].decode() == queue and job[b"status"].decode() == registry
    assert ttl - 15 <= r.ttl(f"rq:job:{job_id}") <= ttl
    assert ttl - 15 <= r.ttl(f"rq:results:{job_id}") <= ttl


def test_full_spec_jobs_embed_verify_and_fail_with_their_code(wire):
    env, r = wire
    queue = env["ARCFACE_QUEUE"]
    a, b = face_paths()[0], face_paths()[1]
    embed_id = write_job(r, queue, EMBED_FUNC, {"kind": "embed", "image": inline(a), "ref": "raw-1"}, minimal=False)
    verify_id = write_job(
        r,
        queue,
        VERIFY_FUNC,
        {"kind": "verify", "a": inline(a), "b": inline(b), "threshold": 0.5},
        minimal=False,
        compress=True,
    )
    bad_id = write_job(
        r,
        queue,
        EMBED_FUNC,
        {"kind": "embed", "image": {"data_b64": base64.b64encode(b"not an image").decode()}},
        minimal=False,
    )
    kind, entry = read_outcome(r, embed_id)
    assert kind == "successful"
    result = entry["return_value"]
    assert (result["kind"], result["dim"], result["ref"]) == ("embed", 512, "raw-1")
    vec = np.frombuffer(base64.b64decode(result["embedding_b64"]), dtype="<f4")
    assert vec.shape == (512,) and abs(float(vec @ vec) - 1.0) < 1e-4
    kind, entry = read_outcome(r, verify_id)
    assert (
        kind == "successful" and entry["return_value"]["kind"] == "verify" and entry["return_value"]["threshold"] == 0.5
    )
    kind, entry = read_outcome(r, bad_id)
    assert kind == "failed" and "[image_decode_error]" in entry["exc_string"]
    assert json.loads(r.hget(f"rq:job:{bad_id}", "meta"))["error"]["code"] == "image_decode_error"
    check_registry(r, queue, embed_id, "finished", 600)  # the job's own result_ttl field wins
    check_registry(r, queue, bad_id, "failed", 900)


def test_minimal_jobs_get_safe_defaults_queue_status_and_ttls(wire):
    """Only the required fields: ``data``, the RPUSH and the SADD. The worker fills origin (the queue it popped
    from), status and enqueued_at, and keeps the outcome RESULT_TTL / FAILURE_TTL seconds."""
    env, r = wire
    queue = env["ARCFACE_QUEUE"]
    ok_id = write_job(r, queue, EMBED_FUNC, {"kind": "embed", "image": inline(face_paths()[2])}, minimal=True)
    bad_id = write_job(r, queue, EMBED_FUNC, {"kind": "embed", "image": {"data_b64": "AAAA"}}, minimal=True)
    assert read_outcome(r, ok_id)[0] == "successful"
    assert read_outcome(r, bad_id)[0] == "failed"
    check_registry(r, queue, ok_id, "finished", RESULT_TTL)
    check_registry(r, queue, bad_id, "failed", FAILURE_TTL)


def test_worker_publishes_its_model(wire):
    env, r = wire
    info = json.loads(r.get(model_info_key(env["ARCFACE_QUEUE"])))
    assert (info["model"], info["dim"], info["threshold"], info["input_size"], info["detect"]) == (
        "arcface",
        512,
        0.61,
        112,
        "none",
    )
    datetime.strptime(info["started_at"], "%Y-%m-%dT%H:%M:%S.%fZ")


# --- the Node.js example -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_producer(tmp_path_factory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the Node.js example producer is not run")
    where = tmp_path_factory.mktemp("node") / "node-producer"
    shutil.copytree(
        REPO / "examples" / "node-producer", where, ignore=shutil.ignore_patterns("node_modules", "package-lock.json")
    )
    try:
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=patience(300),
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install of the redis client timed out (no package registry reachable?)")
    if proc.returncode != 0:
        pytest.skip(
            f"npm install of the redis client failed (no package registry reachable?): {proc.stderr.strip()[-300:]}"
        )
    return where


def run_node(where: Path, env: dict, *args: str) -> dict:
    import os

    proc = subprocess.run(
        ["node", "producer.mjs", *args],
        cwd=where,
        env={**os.environ, **env, "ARCFACE_WAIT_TIMEOUT": "120"},
        capture_output=True,
        text=True,
        timeout=patience(180),
    )
    assert proc.returncode in (0, 1), (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def test_node_producer_follows_the_spec(wire, node_producer):
    from producer.client.face_client import FaceClient
    from producer.settings import ProducerSettings

    env, r = wire
    queue = env["ARCFACE_QUEUE"]
    a, b = face_paths()[3], face_paths()[4]
    full = run_node(node_producer, env, "embed", str(a))
    minimal = run_node(node_producer, env, "embed", str(a), "--minimal")
    pair = run_node(node_producer, env, "verify", str(a), str(b), "--threshold", "0.6")
    assert full["status"] == minimal["status"] == pair["status"] == "finished", (full, minimal, pair)
    # the same numbers as the Python client gets from the same worker
    client = FaceClient(ProducerSettings(redis_url=env["ARCFACE_REDIS_URL"], queue=queue))
    expected = client.result_embed(client.embed(a), timeout=patience(120)).embedding
    for body in (full, minimal):
        got = np.frombuffer(base64.b64decode(body["result"]["embedding_b64"]), dtype="<f4")
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert pair["result"]["threshold"] == 0.6 and pair["result"]["similar"] == (pair["result"]["distance"] <= 0.6)
    check_registry(r, queue, full["job_id"], "finished", 3600)  # producer.mjs writes result_ttl 3600
    check_registry(r, queue, minimal["job_id"], "finished", RESULT_TTL)
    bad = tempfile_bytes(b"definitely not an image")
    failed = run_node(node_producer, env, "embed", str(bad))
    assert failed["status"] == "failed" and failed["error"]["code"] == "image_decode_error"


def tempfile_bytes(data: bytes) -> Path:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".png", delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


# --- the Node.js example's exit codes and default Redis: arcface-producer's ----------------------------------
def node_exit(where: Path, env: dict[str, str], *args: str, timeout: float = patience(30)) -> tuple[int, str, float]:
    """Run the Node producer with only ``env``'s ARCFACE_* settings: (exit code, stderr, seconds taken)."""
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith(("ARCFACE_", "XDG_"))}
    start = time.monotonic()
    proc = subprocess.run(
        ["node", "producer.mjs", *args],
        cwd=where,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stderr.strip(), time.monotonic() - start


def test_node_producer_exits_4_at_once_when_redis_is_down(node_producer):
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    code, err, took = node_exit(node_producer, {"ARCFACE_REDIS_URL": url}, "embed", str(face_paths()[0]))
    assert (code, err) == (4, f"arcface-node-producer: cannot reach Redis at {url}: connect ECONNREFUSED {url[8:-2]}")
    assert took < 5


def test_node_producer_exits_4_when_redis_never_answers(node_producer):
    import socket

    with socket.socket() as silent:  # accepts connections (the kernel does), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        code, err, took = node_exit(node_producer, {"ARCFACE_REDIS_URL": url}, "embed", str(face_paths()[0]))
    assert (code, err) == (4, f"arcface-node-producer: cannot reach Redis at {url}: no answer within 5s")
    assert 5 <= took < 10


def test_node_producer_exits_4_with_the_auth_error_for_a_wrong_or_missing_password(node_producer, tmp_path):
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", "--requirepass", "s3cret-pw", password="s3cret-pw").start()
    try:
        face = str(face_paths()[0])
        wrong = f"redis://:wrong-pw@127.0.0.1:{server.port}/0"
        code, err, _ = node_exit(node_producer, {"ARCFACE_REDIS_URL": wrong}, "embed", face)
        assert (code, err) == (
            4,
            f"arcface-node-producer: cannot reach Redis at redis://:***@127.0.0.1:{server.port}/0: "
            "WRONGPASS invalid username-password pair or user is disabled.",
        )
        code, err, _ = node_exit(node_producer, {"ARCFACE_REDIS_URL": server.url}, "embed", face)
        assert (code, err) == (
            4,
            f"arcface-node-producer: cannot reach Redis at {server.url}: NOAUTH Authentication required.",
        )
        assert server.client().keys("*") == []
    finally:
        server.stop()


def test_node_producer_exits_2_for_an_unreadable_image_and_enqueues_nothing(node_producer, redis_server, tmp_path):
    queue = f"node-{uuid.uuid4().hex[:8]}"
    env = {"ARCFACE_REDIS_URL": redis_server.url, "ARCFACE_QUEUE": queue}
    missing = str(tmp_path / "nope.png")
    assert node_exit(node_producer, env, "embed", missing)[:2] == (
        2,
        f"arcface-node-producer: {missing}: No such file or directory",
    )
    assert node_exit(node_producer, env, "verify", str(face_paths()[0]), missing)[:2] == (
        2,
        f"arcface-node-producer: image b: {missing}: No such file or directory",
    )
    assert node_exit(node_producer, env, "embed", str(tmp_path))[:2] == (
        2,
        f"arcface-node-producer: {tmp_path}: Is a directory",
    )
    assert redis_server.client().llen(f"rq:queue:{queue}") == 0


def _python_default_socket(env: dict[str, str]) -> str:
    """Where arcface-producer looks for Redis with ARCFACE_REDIS_URL unset, under ``env``."""
    import os
    import sys

    code = (
        "from producer.redisconn import EmbeddedRedis; from producer.settings import ProducerSettings;"
        "print(EmbeddedRedis(ProducerSettings().data_dir).socket)"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ARCFACE_", "XDG_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**full, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_node_producer_defaults_to_the_embedded_redis_that_arcface_producer_uses(node_producer, tmp_path):
    from tests.redis_server import RedisServer

    face = str(face_paths()[0])
    for env in (
        {"HOME": str(tmp_path / "home")},
        {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg")},
        {"ARCFACE_DATA_DIR": str(tmp_path / "data")},
    ):
        socket_path = _python_default_socket(env)
        assert node_exit(node_producer, env, "embed", face)[:2] == (
            4,
            f"arcface-node-producer: cannot reach Redis at the embedded Redis at {socket_path}: it is not running "
            "(no socket there); arcface-producer or arcface-worker start it on this machine, or set ARCFACE_REDIS_URL",
        )
    # with the embedded Redis running there, the job lands in it (no worker: the wait times out, exit 3)
    data = tmp_path / "data"
    server = RedisServer(data / "redis", "--unixsocket", str(data / "redis" / "redis.sock")).start()
    try:
        queue = f"node-{uuid.uuid4().hex[:8]}"
        env = {"ARCFACE_DATA_DIR": str(data), "ARCFACE_QUEUE": queue, "ARCFACE_WAIT_TIMEOUT": "0.2"}
        assert node_exit(node_producer, env, "embed", face)[:2] == (3, "")
        assert server.client().llen(f"rq:queue:{queue}") == 1
    finally:
        server.stop()
    assert node_exit(node_producer, {"ARCFACE_EMBEDDED_REDIS": "false"}, "embed", face)[:2] == (
        2,
        "arcface-node-producer: ARCFACE_REDIS_URL is required when ARCFACE_EMBEDDED_REDIS=false",
    )
