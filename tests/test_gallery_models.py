"""A gallery belongs to the model it was first enrolled with: through real ``arcface-worker`` processes of two
models (another ARCFACE_MODEL_NAME and another ARCFACE_INPUT_SCALE, the same 512-d weights), every change
through the other model's worker is refused and the gallery is left as it was. And names that are not valid
Unicode text (a lone surrogate) are refused by the contract on both sides, never an internal_error."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from producer.client import gallery as gc
from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode
from producer.contract.errors import InputError, JobFailed
from producer.contract.keys import ENROLL_FUNC, FORGET_FUNC
from producer.settings import ProducerSettings
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.workers import OTHER_MODEL_ENV, WorkerProcess


@pytest.fixture()
def two_models(worker_env, tmp_path):
    """Worker ``a`` serves the default model (``arcface``) on queue ``<q>-a``; worker ``b`` another model
    (``arcface-b``) on ``<q>-b``; one Redis, so one set of galleries. Yields their clients."""
    started: list[WorkerProcess] = []
    clients: list[FaceClient] = []
    for name, extra in (("a", {}), ("b", OTHER_MODEL_ENV)):
        env = {**worker_env, "ARCFACE_QUEUE": f"{worker_env['ARCFACE_QUEUE']}-{name}", **extra}
        started.append(WorkerProcess(env, tmp_path / f"{name}.log"))
        clients.append(FaceClient(ProducerSettings(queue=env["ARCFACE_QUEUE"])))
    try:
        for w in started:
            w.wait_ready()
        yield clients
    finally:
        for w in started:
            w.stop()


def _refused(client: FaceClient, job_id: str) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        client.result(job_id, timeout=patience(120))
    return info.value


def test_forget_and_enroll_through_a_worker_of_another_model_are_refused(two_models):
    a, b = two_models
    gallery = f"g{time.time_ns()}"
    paths = face_paths()
    assert a.result(gc.enroll(a, "alice", paths[0], gallery, enrollment_id="alice-1"), timeout=patience(120)).created

    mismatch = (
        f"gallery {gallery!r} holds arcface embeddings (512-d); this worker serves arcface-b (512-d): "
        "send the job to a arcface worker's queue"
    )
    for job_id in (gc.forget(b, "alice", gallery), gc.forget(b, "alice", gallery, enrollment_id="alice-1")):
        failed = _refused(b, job_id)
        assert failed.code is ErrorCode.GALLERY_MODEL_MISMATCH and failed.error.message == mismatch
    for job_id in (
        gc.enroll(b, "bob", paths[5], gallery),
        gc.enroll_many(b, [("bob", paths[5]), ("carol", paths[10])], gallery),
    ):
        assert _refused(b, job_id).code is ErrorCode.GALLERY_MODEL_MISMATCH

    listed = {g.name: g for g in a.galleries()}[gallery]  # nothing changed
    assert (listed.model, listed.subjects, listed.enrollments) == ("arcface", 1, 1)
    assert a.result(gc.forget(a, "alice", gallery), timeout=patience(120)).removed == 1  # its own model's worker may


def test_a_lone_surrogate_in_a_name_is_refused_by_the_producer_and_by_the_worker(two_models, worker_env):
    a, _ = two_models
    image = face_paths()[0]
    with pytest.raises(InputError) as info:
        gc.enroll(a, "al\ud800ice", image, "staff")
    assert info.value.code is ErrorCode.INVALID_PAYLOAD
    assert info.value.message.startswith("subject: Value error, subject is not valid Unicode text: it holds a lone")
    with pytest.raises(InputError):
        gc.forget(a, "alice", "staff", enrollment_id="e\udcff")

    # A command-line argument that is not UTF-8 arrives as a lone surrogate: exit 2, one line.
    env = {**os.environ, **worker_env, "ARCFACE_QUEUE": a.settings.queue}
    cmd = [sys.executable, "-m", "producer.cli", "enroll", os.fsencode("al") + b"\xff" + b"ice", str(image)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=patience(120))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "subject is not valid Unicode text: it holds a lone surrogate at character 2" in proc.stderr

    # A hand-written job (a producer that skips the contract) gets a typed refusal from the worker.
    ref = a.image_ref(image)
    hand_written = [
        (ENROLL_FUNC, {"kind": "enroll", "image": ref.model_dump(exclude_none=True), "subject": "al\ud800ice"}),
        (FORGET_FUNC, {"kind": "forget", "subject": "\ud800"}),
        (FORGET_FUNC, {"kind": "forget", "subject": "alice", "enrollment_id": "e\ud800"}),
    ]
    for func, payload in hand_written:
        job_id = a.queue.enqueue_call(func, args=(payload,), description="hand-written").id
        failed = _refused(a, job_id)
        assert failed.code is ErrorCode.INVALID_PAYLOAD, failed.error
        assert "is not valid Unicode text: it holds a lone surrogate" in failed.error.message
