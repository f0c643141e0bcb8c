"""The container images, built and run with podman (Docker does not run on these machines; podman runs the same
Dockerfile). Base images cannot be pulled here, so a python:3.11-slim stand-in is made with debootstrap (Debian
bookworm, Python 3.11) once per machine and passed as ``PYTHON_IMAGE``: docker/images.py, the recipe ``./dev image``
uses too.

Built: the CPU worker (with stand-in weights baked in through ``WEIGHTS_URL``, served by the test), the producer
and the dashboard images. Run: the worker container with exactly the environment compose gives the ``worker``
service on a fresh host (``${VAR:-}`` resolved with no host variables, an empty ./models mounted over /models),
jobs pushed from the producer container with the ``producer`` service's environment, the health check inside,
metrics, SIGTERM; the dashboard showing a job. Redis is the test's own redis-server on a loopback address of
its own at port 6379, so compose's ``redis://redis:6379/0`` resolves to it through ``--add-host``.

Skipped, with the reason, only where podman cannot run (not installed: .ci/run installs it with apt when it can).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.compose_env import service_environment
from tests.conftest import assert_close_to_float32, embedding_tolerance
from tests.container_images import IMAGES, PODMAN, TIMINGS, ULIMITS, run
from tests.container_support import (
    container_logs,
    env_args,
    free_port,
    port_free,
    run_producer,
    shared_dirs,
    wait_for_event,
)
from tests.patience import patience

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.container_images", "tests.container_support"]  # fixtures: images, redis_6379, reference_engine


def test_worker_container_with_the_compose_environment_serves_the_producer_container_and_stops_cleanly(
    images, redis_6379, reference_engine, tmp_path
):
    data, models = shared_dirs(tmp_path)
    env = service_environment("worker")  # what compose passes on a fresh host: ARCFACE_MODEL_PATH is empty
    assert env["ARCFACE_MODEL_PATH"] == ""
    # the image serves metrics on 9100; on this shared host network another port when 9100 is taken
    metrics_port = 9100 if port_free(9100) else free_port()
    extra = [] if metrics_port == 9100 else ["-e", f"ARCFACE_METRICS_PORT={metrics_port}"]
    name = f"arcface-test-worker-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    mounts = ["-v", f"{models}:/models:ro", "-v", f"{data}:/data:ro"]
    run(
        [*PODMAN, "run", "-d", "--name", name, "--network=host", "--add-host", f"redis:{redis_6379.host}"]
        + [*ULIMITS, *env_args(env), *extra, *mounts, IMAGES["worker"]]
    )
    try:
        loaded = wait_for_event(name, "model_loaded", patience(240))
        assert loaded["source"] == "/opt/arcface/cache/arcface_weights.h5"  # the baked weights, no mount, no download
        wait_for_event(name, "worker_started", patience(240))
        TIMINGS["worker container start to worker_started, s"] = round(time.monotonic() - started, 1)
        check_embed_and_verify(redis_6379.host, data, reference_engine)
        check_health_and_metrics(name, metrics_port)
        check_clean_stop(name, redis_6379.host)
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)


def check_embed_and_verify(redis_host: str, data: Path, reference_engine) -> None:
    """Jobs from the producer container: an embedding and two distances equal to the reference engine's."""
    embed = run_producer(redis_host, data, "embed", "/data/amy1.png", "--wait")
    got = np.asarray(embed["result"]["embedding"], dtype=np.float32)
    ref = reference_engine.embed_images([(data / n).read_bytes() for n in ("amy1.png", "amy2.png", "sheldon1.png")])
    precision = embed["result"].get("precision")  # the compose environment leaves precision at auto
    assert embed["status"] == "finished"
    assert_close_to_float32(got, ref[0], precision)
    same = run_producer(redis_host, data, "verify", "/data/amy1.png", "/data/amy2.png", "--wait")
    other = run_producer(
        redis_host, data, "verify", "/data/amy1.png", "/data/sheldon1.png", "--path", "--wait"
    )  # read from /data
    tolerance = embedding_tolerance(precision)
    assert abs(same["result"]["distance"] - (1.0 - float(ref[0] @ ref[1]))) < tolerance
    assert abs(other["result"]["distance"] - (1.0 - float(ref[0] @ ref[2]))) < tolerance


def check_health_and_metrics(name: str, metrics_port: int) -> None:
    """The health check inside the container passes, the image kept its HEALTHCHECK, metrics are served."""
    health = run([*PODMAN, "exec", name, "arcface-worker-health"], check=False)
    assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout + health.stderr
    config = json.loads(
        run([*PODMAN, "image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGES["worker"]]).stdout
    )
    assert config["Test"][-1] == "arcface-worker-health"  # the image's HEALTHCHECK survived the build
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=patience(10)).read().decode()
    assert "arcface_jobs_total{" in metrics


def check_clean_stop(name: str, redis_host: str) -> None:
    """SIGTERM: exit 0, no job left started, the worker unregistered, JSON-only output ending in worker_stopped."""
    from rq.registry import StartedJobRegistry
    from rq.worker import Worker

    from producer.contract.rqjob import JSONSerializer

    run([*PODMAN, "kill", "--signal", "TERM", name])
    assert run([*PODMAN, "wait", name], timeout=patience(90)).stdout.strip() == "0"
    connection = redis.Redis(host=redis_host, port=6379)
    assert StartedJobRegistry("arcface", connection=connection, serializer=JSONSerializer).get_job_ids() == []
    assert Worker.all(connection=connection) == []
    lines = container_logs(name)
    assert all(isinstance(json.loads(line), dict) for line in lines), lines  # the container's output: JSON only
    assert json.loads(lines[-1])["event"] == "worker_stopped"


def test_producer_image_has_no_tensorflow_and_runs_as_a_non_root_user(images):
    probe = run(
        [
            *PODMAN,
            "run",
            "--rm",
            *ULIMITS,
            "--entrypoint",
            "python",
            IMAGES["producer"],
            "-c",
            "import importlib.util, os; print(importlib.util.find_spec('tensorflow') is None, os.getuid())",
        ]
    )
    assert probe.stdout.split() == ["True", "10001"]
    assert "arcface-producer" in run([*PODMAN, "run", "--rm", *ULIMITS, IMAGES["producer"]]).stdout  # default: --help
    assert images["producer"] < images["worker"] / 4


def test_dashboard_image_shows_a_job_with_the_json_serializer(images, redis_6379, tmp_path):
    data, _ = shared_dirs(tmp_path)
    job_id = run_producer(redis_6379.host, data, "embed", "/data/amy1.png", ARCFACE_QUEUE="dashboard-test")[
        "job_id"
    ]  # no worker: queued
    port = free_port()
    name = f"arcface-test-dashboard-{uuid.uuid4().hex[:8]}"
    env = service_environment("dashboard")  # compose's, plus this test's port; loopback only on the shared host network
    run(
        [
            *PODMAN,
            "run",
            "-d",
            "--name",
            name,
            "--network=host",
            "--add-host",
            f"redis:{redis_6379.host}",
            *ULIMITS,
            *env_args(env),
            "-e",
            f"RQ_DASHBOARD_PORT={port}",
            "-e",
            "RQ_DASHBOARD_BIND=127.0.0.1",
            IMAGES["dashboard"],
        ]
    )
    try:
        deadline = time.monotonic() + patience(60)
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/0/view/job/{job_id}", timeout=patience(10))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("dashboard not answering:\n" + "\n".join(container_logs(name)[-30:])) from None
                time.sleep(0.5)
        assert page.status == 200
        data = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/0/data/job/{job_id}.json", timeout=patience(10)).read()
        )
        assert data["id"] == job_id and data["status"] == "queued"
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
