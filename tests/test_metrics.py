"""Prometheus metrics: scraped from a real worker after real jobs, counters moved by the right amounts."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode
from producer.contract.errors import JobFailed
from producer.settings import ProducerSettings
from tests.conftest import face_paths
from tests.patience import patience
from tests.redis_server import free_port
from tests.workers import WorkerProcess


def scrape_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=patience(5)).read().decode()


def scrape(port: int) -> dict[str, float]:
    out = {}
    for line in scrape_text(port).splitlines():
        m = re.match(r"^(arcface_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m[1]] = float(m[2])
    return out


def _failed_then_scrape(
    client: FaceClient, worker: WorkerProcess, port: int, job_id: str, code: ErrorCode
) -> dict[str, float]:
    """Wait for a job that must fail with ``code``; then scrape once the worker has counted that failure and
    logged every batch it counted (it counts a job after writing its outcome, and logs a batch after counting it)."""
    with pytest.raises(JobFailed) as info:
        client.result(job_id, timeout=patience(30))
    assert info.value.error.code is code
    failed = f'code="{code.value}"'
    deadline = time.monotonic() + patience(5)
    while True:
        metrics = scrape(port)
        counted = any(k.startswith("arcface_jobs_total{") and failed in k for k in metrics)
        if counted and metrics.get("arcface_batch_images_count", 0) == len(worker.batches()):
            return metrics
        if time.monotonic() > deadline:
            return metrics  # the caller's assertions name what is missing
        time.sleep(0.05)


def test_metrics_count_jobs_batches_and_latencies(worker_env, tmp_path):
    port = free_port()
    client = FaceClient(ProducerSettings())
    worker = WorkerProcess(worker_env, tmp_path / "w.log", ARCFACE_METRICS_PORT=str(port), ARCFACE_MAX_BATCH_SIZE="16")
    try:
        worker.wait_ready()
        before = scrape(port)
        assert before["arcface_model_load_seconds"] > 0
        paths = face_paths()
        ids = client.embed_many(paths[:6]) + client.verify_many([(paths[0], paths[1]), (paths[2], paths[3])])
        bad = client.embed(b"definitely not an image")
        for j in ids:
            client.result(j, timeout=patience(120))
        after = _failed_then_scrape(client, worker, port, bad, ErrorCode.IMAGE_DECODE_ERROR)
        assert after['arcface_jobs_total{code="",kind="embed",outcome="finished"}'] == 6
        assert after['arcface_jobs_total{code="",kind="verify",outcome="finished"}'] == 2
        assert after['arcface_jobs_total{code="image_decode_error",kind="embed",outcome="failed"}'] == 1
        batches = after["arcface_batch_images_count"]
        assert batches == len(worker.batches()) >= 1
        assert after["arcface_batch_images_sum"] == sum(b["images"] for b in worker.batches()) == 6 + 4 + 1
        assert after["arcface_inference_seconds_count"] == batches and after["arcface_inference_seconds_sum"] > 0
        assert after["arcface_queue_wait_seconds_count"] == 9
        assert after["arcface_queue_depth"] == 0
        assert after["arcface_images_total"] == 6 + 4
        info = [k for k in after if k.startswith("arcface_worker_info{")]
        assert len(info) == 1 and 'model="arcface"' in info[0] and f'queue="{worker_env["ARCFACE_QUEUE"]}"' in info[0]
        hostile = client.queue.enqueue_call("os.system", args=("true",)).id
        final = _failed_then_scrape(client, worker, port, hostile, ErrorCode.UNSUPPORTED_JOB)
        assert (
            final['arcface_jobs_total{code="unsupported_job",kind="invalid",outcome="failed"}'] == 1
        )  # never counted as an embed
        assert final.get("process_resident_memory_bytes", 0) > 0 or "process_resident_memory_bytes" in scrape_text(port)
    finally:
        worker.stop()
