"""Deployment files: compose.yaml validates against the compose-spec schema; the Dockerfile's promises.

Docker itself does not run on these machines, so the image is not built here (see README)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_compose_file_validates_against_the_compose_spec_schema():
    exe = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(REPO / "compose.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_declares_redis_aof_healthchecks_replicas_gpu_and_profiles():
    text = (REPO / "compose.yaml").read_text()
    assert "--appendonly" in text and "redis-cli" in text
    assert re.search(r"deploy:\n\s+replicas: \d+", text)
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    for profile in ("gpu", "dashboard", "tools"):
        assert f'profiles: ["{profile}"]' in text


def test_dockerfile_is_multi_stage_non_root_with_a_heartbeat_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3
    assert re.search(r"^USER arcface$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*arcface-worker-health", text, re.M)
    assert "ARG TF_EXTRAS" in text and "ARG WEIGHTS_URL" in text


def test_healthcheck_passes_while_the_worker_heartbeats_and_fails_after_it_dies(worker_env, tmp_path):
    import os
    import time

    from tests.workers import WorkerProcess

    worker = WorkerProcess(worker_env, tmp_path / "w.log")
    env = {**os.environ, **worker_env}
    health = [sys.executable, "-c", "from worker.cli import health; health()", "--max-age", "5"]
    try:
        worker.wait_ready()
        ok = subprocess.run(health, env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        worker.kill()  # SIGKILL: no deregistration, the heartbeat just stops
        time.sleep(6)
        dead = subprocess.run(health, env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert dead.returncode == 1 and "unhealthy" in dead.stdout
    finally:
        worker.stop()
