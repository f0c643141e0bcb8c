"""Pieces the benches share: their command-line options, the plain rq ``SimpleWorker`` the end-to-end benches
(e2e, plumbing) compare against, and the span of a set of jobs from rq's own timestamps. Not a bench itself."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from producer.client.face_client import FaceClient

ROOT = Path(__file__).resolve().parents[1]


def options(**defaults: float | str) -> argparse.Namespace:
    """The bench's command line: each keyword is an option (``max_batch_size=32``: ``--max-batch-size``, an int)
    of its default's type."""
    ap = argparse.ArgumentParser()
    for name, default in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return ap.parse_args()


def run_plain_rq_worker(url: str, queue: str) -> None:
    """Run ``rq worker --burst`` (rq's ``SimpleWorker``, our job class and serializer) on ``queue`` until it is
    empty; the ``ARCFACE_*`` settings come from this process's environment."""
    cmd = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", url]
    cmd += ["--worker-class", "rq.worker.SimpleWorker", "--job-class", "producer.contract.rqjob.SafeJob"]
    cmd += ["--serializer", "producer.contract.rqjob.JSONSerializer", queue]
    env = {**os.environ, "ARCFACE_QUEUE": queue, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def job_span_s(client: FaceClient, ids: list[str]) -> float:
    """Seconds from the first job's start to the last job's end, from rq's own timestamps."""
    jobs = client.queue.job_class.fetch_many(ids, connection=client.connection, serializer=client.queue.serializer)
    return (max(j.ended_at for j in jobs) - min(j.started_at for j in jobs)).total_seconds()
