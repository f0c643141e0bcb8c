"""The job contract on real Redis and the real plain-rq path (rq's SimpleWorker running worker.jobs.*)."""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import FinishedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode
from producer.contract.errors import InputError, JobFailed, JobNotFound, ResultTimeout
from producer.contract.keys import EMBED_FUNC, VERIFY_FUNC
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.settings import ProducerSettings
from tests.conftest import FACES, face_paths
from tests.patience import patience


@pytest.fixture()
def client(worker_env) -> FaceClient:
    return FaceClient(ProducerSettings())


def run_plain_rq_worker(client: FaceClient) -> None:
    """rq's own SimpleWorker, in this process, until the queue is empty."""
    worker = SimpleWorker([client.queue], connection=client.connection, serializer=JSONSerializer, job_class=SafeJob)
    worker.work(burst=True)


@pytest.fixture(autouse=True)
def _stop_plain_runtime(monkeypatch):
    """The plain-rq path loads a runtime per process (worker.jobs.runtime), with a gallery follower thread: stop it
    after each test, before monkeypatch drops the runtime, so no thread outlives its test's Redis."""
    yield
    import sys

    runtime = getattr(sys.modules.get("worker.jobs"), "_runtime", None)
    if runtime is not None and runtime.gallery is not None:
        runtime.gallery.stop()


def test_enqueued_job_is_a_plain_rq_job_with_our_function_serializer_and_ttls(client):
    job_id = client.embed(face_paths()[0], ref="user-42")
    raw = client.connection.hgetall(f"rq:job:{job_id}")
    func, instance, args, kwargs = json.loads(
        zlib.decompress(raw[b"data"])
    )  # zlib-compressed JSON (rq compresses), not pickle
    assert (func, instance, kwargs) == (EMBED_FUNC, None, {})
    assert set(args[0]) == {"kind", "image", "ref"} and args[0]["ref"] == "user-42"
    job = Job.fetch(job_id, connection=client.connection, serializer=JSONSerializer)
    s = client.settings
    assert (job.func_name, job.timeout, job.result_ttl, job.failure_ttl, job.retries_left) == (
        EMBED_FUNC,
        s.job_timeout,
        s.result_ttl,
        s.failure_ttl,
        s.retries,
    )
    assert job.get_status() == "queued" and client.status(job_id) == "queued"
    assert job_id in Queue(s.queue, connection=client.connection).job_ids
    assert len(job.description) < 40  # the image is not copied into rq's description


def test_plain_rq_worker_runs_embed_and_verify_with_engine_equal_results(client, engine):
    paths = face_paths()
    embed_id = client.embed(paths[0], ref="r1")
    verify_id = client.verify(paths[0], paths[1], threshold=0.5)
    array_id = client.embed(np.asarray(Image.open(paths[2])))
    run_plain_rq_worker(client)
    direct = engine.embed_images([p.read_bytes() for p in paths[:3]])
    embedded = client.result(embed_id, timeout=patience(5))
    assert (embedded.dim, embedded.model, embedded.ref, embedded.timing.batch_size) == (512, "arcface", "r1", 1)
    np.testing.assert_allclose(embedded.embedding, direct[0], atol=1e-5)
    np.testing.assert_allclose(client.result(array_id, timeout=patience(5)).embedding, direct[2], atol=1e-5)
    verified = client.result(verify_id, timeout=patience(5))
    expected = 1.0 - float(direct[0] @ direct[1])
    assert verified.distance == pytest.approx(expected, abs=1e-5)
    assert (verified.threshold, verified.similar) == (0.5, expected <= 0.5)
    job = Job.fetch(verify_id, connection=client.connection, serializer=JSONSerializer)
    assert job.get_status() == "finished" and client.status(verify_id) == "finished"
    assert set(FinishedJobRegistry(queue=client.queue).get_job_ids()) == {embed_id, verify_id, array_id}


def test_result_waits_without_polling_and_times_out(client):
    job_id = client.embed(face_paths()[0])
    start = time.monotonic()
    with pytest.raises(ResultTimeout, match="status queued"):
        client.result(job_id, timeout=0.5)
    assert 0.45 <= time.monotonic() - start < patience(3)
    with pytest.raises(JobNotFound):
        client.result("no-such-job", timeout=0.1)


def test_rq_cli_worker_serves_the_queue_and_result_blocks_until_it_finishes(client, worker_env):
    """The README's plain-rq command: `rq worker` with our serializer and job class, a separate process."""
    import os
    import subprocess
    import sys

    job_id = client.embed(face_paths()[0])
    cmd = [
        sys.executable,
        "-m",
        "rq.cli",
        "worker",
        "--burst",
        "--url",
        worker_env["ARCFACE_REDIS_URL"],
        "--worker-class",
        "rq.worker.SimpleWorker",
        "--job-class",
        "producer.contract.rqjob.SafeJob",
        "--serializer",
        "producer.contract.rqjob.JSONSerializer",
        worker_env["ARCFACE_QUEUE"],
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **worker_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        result = client.result(job_id, timeout=patience(120))  # model load included
    finally:
        out = proc.communicate(timeout=patience(60))[0].decode()
    assert result.dim == 512 and result.timing.batch_size == 1, out
    assert proc.returncode == 0, out


def _hand_written_job(client: FaceClient, func: str, payload, **kw) -> str:
    """Enqueue bypassing the client's validation, as a hostile or buggy producer would."""
    job = client.queue.enqueue_call(func, args=(payload,), description="hand-written", **kw)
    return job.id


@pytest.mark.parametrize(
    "func,payload,code",
    [
        (EMBED_FUNC, {"kind": "embed", "image": {"data_b64": "bm90IGFuIGltYWdl"}}, ErrorCode.IMAGE_DECODE_ERROR),
        (EMBED_FUNC, {"kind": "embed", "image": {"data_b64": "%%%not base64%%%"}}, ErrorCode.INVALID_PAYLOAD),
        (EMBED_FUNC, {"kind": "embed", "image": {"path": "../etc/passwd"}}, ErrorCode.PATH_NOT_ALLOWED),
        (EMBED_FUNC, {"kind": "embed", "image": {"path": "/etc/passwd"}}, ErrorCode.PATH_NOT_ALLOWED),
        (EMBED_FUNC, {"kind": "embed", "image": {"data_b64": "AAAA"}, "surprise": 1}, ErrorCode.INVALID_PAYLOAD),
        (EMBED_FUNC, {"kind": "embed"}, ErrorCode.INVALID_PAYLOAD),
        (VERIFY_FUNC, {"kind": "verify", "a": {"data_b64": "AAAA"}, "b": 7}, ErrorCode.INVALID_PAYLOAD),
        (EMBED_FUNC, {"kind": "embed", "image": {"data_b64": "AAAA"}, "model": "other"}, ErrorCode.UNKNOWN_MODEL),
        ("os.system", "touch /tmp/arcface-pwned", ErrorCode.UNSUPPORTED_JOB),
    ],
    ids=[
        "undecodable",
        "bad-base64",
        "dotdot-path",
        "absolute-path",
        "extra-field",
        "missing-field",
        "wrong-type",
        "unknown-model",
        "os.system",
    ],
)
def test_refused_jobs_fail_with_their_code_through_rq(client, func, payload, code, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCFACE_SHARED_ROOT", str(FACES))
    import worker.jobs

    monkeypatch.setattr(worker.jobs, "_runtime", None)  # pick up this test's settings
    job_id = _hand_written_job(client, func, payload)
    run_plain_rq_worker(client)
    with pytest.raises(JobFailed) as info:
        client.result(job_id, timeout=patience(5))
    assert info.value.error.code is code, info.value
    assert client.status(job_id) == "failed"


def test_client_refuses_bad_input_before_enqueueing(client, tmp_path, monkeypatch):
    with pytest.raises(InputError) as info:
        client.embed(tmp_path / "missing.png")
    assert info.value.code is ErrorCode.INVALID_PAYLOAD
    small = FaceClient(client.settings.model_copy(update={"max_inline_bytes": 100}), client.connection)
    with pytest.raises(InputError) as info:
        small.embed(face_paths()[0])
    assert info.value.code is ErrorCode.IMAGE_TOO_LARGE
    rooted = FaceClient(client.settings.model_copy(update={"shared_root": FACES}), client.connection)
    outside = tmp_path / "outside.png"
    outside.write_bytes(face_paths()[0].read_bytes())
    link = tmp_path / "root"
    link.mkdir()
    (link / "escape.png").symlink_to(outside)
    linked = FaceClient(client.settings.model_copy(update={"shared_root": link}), client.connection)
    for bad_client, path in (
        (rooted, "../faces/amy/amy1.png"),
        (rooted, str(outside)),
        (linked, "escape.png"),
        (client, "amy/amy1.png"),
    ):
        with pytest.raises(InputError) as info:
            bad_client.embed(path, as_path=True)
        assert info.value.code is ErrorCode.PATH_NOT_ALLOWED
    assert len(client.queue) == 0


def test_path_images_run_from_the_shared_root(client, engine, monkeypatch):
    monkeypatch.setenv("ARCFACE_SHARED_ROOT", str(FACES))
    import worker.jobs

    monkeypatch.setattr(worker.jobs, "_runtime", None)
    rooted = FaceClient(client.settings.model_copy(update={"shared_root": FACES}), client.connection)
    job_id = rooted.embed("amy/amy1.png", as_path=True)
    by_absolute = rooted.embed(str(FACES / "amy" / "amy1.png"), as_path=True)  # inside the root: sent relative
    run_plain_rq_worker(rooted)
    expected = engine.embed_images([(FACES / "amy" / "amy1.png").read_bytes()])[0]
    for jid in (job_id, by_absolute):
        np.testing.assert_allclose(rooted.result(jid, timeout=patience(5)).embedding, expected, atol=1e-5)


def test_many_helpers_enqueue_in_one_round_trip(client):
    paths = face_paths()[:6]
    before = client.connection.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
    ids = client.embed_many(paths)
    pair_ids = client.verify_many([(paths[0], paths[1]), (paths[2], paths[3])])
    after = client.connection.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
    assert len(ids) == 6 and len(pair_ids) == 2 and len(set(ids + pair_ids)) == 8
    assert after - before == 2  # one MULTI/EXEC per call
    assert client.queue.job_ids[-8:] == ids + pair_ids
