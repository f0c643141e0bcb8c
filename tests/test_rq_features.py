"""rq features that keep working under the batching worker: dependents (``depends_on``), ``rq suspend`` /
``rq resume``, scheduled jobs (``enqueue_in``), and job callbacks, which it refuses to run (they name arbitrary
functions: the same rule as for the job function itself)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
from rq.job import Callback
from rq.worker import Worker

from producer.client.face_client import FaceClient
from producer.contract.keys import EMBED_FUNC
from producer.contract.requests import ImageRef
from producer.settings import ProducerSettings
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.workers import WorkerProcess


@pytest.fixture()
def served(worker_env, tmp_path):
    w = WorkerProcess(worker_env, tmp_path / "w.log")
    w.wait_ready()
    yield FaceClient(ProducerSettings()), w, worker_env
    w.stop()


def _request() -> dict:
    return {"kind": "embed", "image": ImageRef.inline(face_paths()[0].read_bytes()).model_dump(exclude_none=True)}


def test_a_dependent_job_runs_after_the_job_it_depends_on(served):
    client, _, _ = served
    first = client.queue.enqueue_call(EMBED_FUNC, args=(_request(),), result_ttl=600)
    second = client.queue.enqueue_call(EMBED_FUNC, args=(_request(),), result_ttl=600, depends_on=first)
    assert second.get_status() == "deferred"
    r1, r2 = client.result(first.id, timeout=patience(60)), client.result(second.id, timeout=patience(60))
    assert r1.embedding_b64 == r2.embedding_b64
    assert client.status(second.id) == "finished"


def test_rq_suspend_stops_taking_and_resume_continues(served):
    client, _, env = served
    rq = [sys.executable, "-m", "rq.cli"]
    subprocess.run([*rq, "suspend", "--url", env["ARCFACE_REDIS_URL"]], check=True, cwd=REPO, capture_output=True)
    try:
        deadline = time.monotonic() + patience(5)
        while Worker.all(queue=client.queue)[0].get_state() != "suspended":  # it saw the suspension
            assert time.monotonic() < deadline, "the worker never went suspended"
            time.sleep(0.05)
        job_id = client.embed(face_paths()[1])
        time.sleep(2.0)
        assert client.status(job_id) == "queued"
    finally:
        subprocess.run([*rq, "resume", "--url", env["ARCFACE_REDIS_URL"]], check=True, cwd=REPO, capture_output=True)
    assert client.result(job_id, timeout=patience(60)).dim == 512


def test_a_job_scheduled_with_enqueue_in_runs(served):
    client, _, _ = served
    job = client.queue.enqueue_in(timedelta(seconds=2), EMBED_FUNC, _request(), result_ttl=600)
    assert job.get_status() == "scheduled"
    started = time.monotonic()
    assert client.result(job.id, timeout=patience(60)).dim == 512
    assert time.monotonic() - started >= 1.0


def mark_callback(job, connection, *args) -> None:  # what a job's on_success / on_failure would run
    from pathlib import Path

    Path(job.meta["marker"]).write_text("ran")


def test_callbacks_are_never_run(served, tmp_path):
    client, _, _ = served
    marker = tmp_path / "callback-ran"
    hook = Callback("tests.test_rq_features.mark_callback")
    job = client.queue.enqueue_call(
        EMBED_FUNC, args=(_request(),), result_ttl=600, on_success=hook, on_failure=hook, meta={"marker": str(marker)}
    )
    assert client.result(job.id, timeout=patience(60)).dim == 512
    time.sleep(0.5)
    assert not marker.exists()
