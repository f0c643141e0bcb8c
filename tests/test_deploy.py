"""Deployment files and operations without containers: compose.yaml against the compose-spec schema and as compose
resolves it on a fresh host, empty settings, the healthcheck, and logs (JSON-only output, console key order).
The images themselves are built and run in tests/test_container.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, assert_close_to_float32
from tests.patience import patience


def test_compose_file_validates_against_the_compose_spec_schema():
    exe = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(REPO / "compose.yaml")],
        capture_output=True,
        text=True,
    )
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
        ok = subprocess.run(health, env=env, capture_output=True, text=True, cwd=REPO, timeout=patience(60))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        worker.kill()  # SIGKILL: no deregistration, the heartbeat just stops
        time.sleep(6)
        dead = subprocess.run(health, env=env, capture_output=True, text=True, cwd=REPO, timeout=patience(60))
        assert dead.returncode == 1 and "unhealthy" in dead.stdout
    finally:
        worker.stop()


def test_healthcheck_fails_while_preprocessing_is_stuck_and_passes_once_it_moves(worker_env, tmp_path):
    # A worker whose preprocessing had stopped (one child's 4-byte frame header had wedged the collector) kept
    # heartbeating: the health check said healthy while every image timed out. The worker now publishes a stall
    # with its heartbeat. Here its one child is stopped with a 60 s decode timeout and a 1 s stall limit.
    import os
    import signal
    import time

    from tests.conftest import face_paths
    from tests.workers import WorkerProcess

    settings = {
        "ARCFACE_PREPROCESS_PROCESSES": "1",
        "ARCFACE_DECODE_TIMEOUT_S": "60",
        "ARCFACE_PREPROCESS_STALL_S": "1",
    }
    worker = WorkerProcess(worker_env, tmp_path / "w.log", **settings)
    env = {**os.environ, **worker_env}
    health = [sys.executable, "-c", "from worker.cli import health; health()"]

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(health, env=env, capture_output=True, text=True, cwd=REPO, timeout=patience(60))

    def until(wanted: int, what: str) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + patience(30)
        while (out := check()).returncode != wanted:
            assert time.monotonic() < deadline, f"the health check was not {what} within 30s: {out.stdout}"
            time.sleep(0.2)
        return out

    try:
        worker.wait_ready()
        until(0, "healthy")
        children = [
            int(pid)
            for task in Path(f"/proc/{worker.proc.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        assert len(children) == 1, children
        os.kill(children[0], signal.SIGSTOP)
        try:
            job = worker.client().embed(face_paths()[0].read_bytes())
            stuck = until(1, "unhealthy")
        finally:
            os.kill(children[0], signal.SIGCONT)
        assert re.fullmatch(
            r"unhealthy: worker \S+: no preprocessing progress for \d+s with 1 images waiting\n", stuck.stdout
        )
        assert until(0, "healthy again").stdout.startswith("healthy: heartbeat")
        assert worker.client().result(job, timeout=patience(60)).embedding.shape == (512,)
    finally:
        worker.stop()


# --- settings: an empty ARCFACE_* variable is unset ------------------------------------------------------------
def _env_without_arcface(**extra: str) -> dict[str, str]:
    import os

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_") and k != "TF_CPP_MIN_LOG_LEVEL"},
        **extra,
    }


def test_empty_arcface_variables_mean_unset(monkeypatch, tmp_path):
    from worker.settings import WorkerSettings

    monkeypatch.chdir(tmp_path)  # no .env
    (tmp_path / ".env").write_text("ARCFACE_QUEUE=\n")
    for name in (
        "MODEL_PATH",
        "METRICS_PORT",
        "ALLOWED_BATCH_SIZES",
        "LOG_LEVEL",
        "REDIS_URL",
        "SHARED_ROOT",
        "DETECT",
        "MAX_BATCH_SIZE",
        "INPUT_MEAN",
        "MODEL_SHA256",
        "PRECISION",
    ):
        monkeypatch.setenv(f"ARCFACE_{name}", "")
    s = WorkerSettings()
    defaults = WorkerSettings.model_fields
    assert s.model_path is None and s.metrics_port is None and s.redis_url is None and s.shared_root is None
    assert s.allowed_batch_sizes == defaults["allowed_batch_sizes"].default
    assert (s.log_level, s.detect, s.precision, s.queue) == ("INFO", "none", "auto", "arcface")
    assert s.max_batch_size == defaults["max_batch_size"].default


def test_compose_worker_environment_on_a_fresh_host_gives_default_settings(monkeypatch, tmp_path):
    """Exactly the environment compose gives the worker service with no host variables and no .env."""
    from tests.compose_env import service_environment
    from worker.settings import WorkerSettings

    env = service_environment("worker")
    assert env == {
        "ARCFACE_REDIS_URL": "redis://redis:6379/0",
        "ARCFACE_MODEL_PATH": "",
        "ARCFACE_SHARED_ROOT": "/data",
    }
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("ARCFACE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = WorkerSettings()
    assert s.model_path is None  # -> the download cache, where an image's baked weights are
    assert s.redis_url_value() == "redis://redis:6379/0" and str(s.shared_root) == "/data"
    assert service_environment("worker", {"ARCFACE_MODEL_PATH": "/models/w.h5"})["ARCFACE_MODEL_PATH"] == "/models/w.h5"


def test_compose_file_pins_the_dashboard_image_to_loopback_and_builds_every_image_from_the_dockerfile():
    from tests.compose_env import load_compose

    services = load_compose()["services"]
    dash = services["dashboard"]
    assert dash["ports"] == ["127.0.0.1:9181:9181"] and dash["build"]["target"] == "dashboard"
    assert "command" not in dash and "pip" not in str(dash)  # nothing installed at start
    assert (
        services["producer"]["build"]["target"] == "producer"
        and services["producer"]["image"] != services["worker"]["image"]
    )
    assert (
        services["worker"]["expose"] == ["9100"] and services["gpu-worker"]["build"]["args"]["TF_EXTRAS"] == "and-cuda"
    )
    dockerfile = (REPO / "Dockerfile").read_text()
    assert (
        "-c /opt/build/constraints.txt" in dockerfile
        and "rq-dashboard" in (REPO / "docker" / "constraints.txt").read_text()
    )
    assert (
        len(re.findall(r"\btensorflow\b", re.sub(r"#.*", "", dockerfile))) == 1
    )  # TensorFlow installed by one pip call
    from producer.contract.defaults import DEFAULT_WEIGHTS_URL

    assert f"/opt/arcface/cache/{Path(DEFAULT_WEIGHTS_URL).name}" in dockerfile  # baked = the download cache's file


# --- logs ----------------------------------------------------------------------------------------------------
class _Proc:
    """A subprocess with stdout and stderr in separate files (nothing merged, nothing added to its environment)."""

    def __init__(self, args: list[str], env: dict[str, str], tmp_path: Path, name: str) -> None:
        self.out, self.err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        self._files = [self.out.open("w"), self.err.open("w")]
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self._files[0], stderr=self._files[1])

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() + self.err.read_text().splitlines()

    def events(self) -> list[dict]:
        import json

        found = []
        for line in self.lines():
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
        return found

    def wait_for(self, event: str, timeout: float, after: int = 0) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [e for e in self.events()[after:] if e.get("event") == event]
            if hits:
                return hits[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {event}:\n" + "\n".join(self.lines()[-30:]))
            time.sleep(0.2)
        raise AssertionError(f"no {event} within {timeout}s:\n" + "\n".join(self.lines()[-30:]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(patience(10))
        for f in self._files:
            f.close()


def _worker(env: dict[str, str], tmp_path: Path, name: str = "worker") -> _Proc:
    return _Proc([sys.executable, "-m", "worker.cli"], env, tmp_path, name)


def test_worker_with_empty_model_path_serves_with_the_default_weights_from_the_download_cache(
    arcface_h5, redis_server, queue_name, engine, tmp_path
):
    import shutil
    import signal

    from producer.client.face_client import FaceClient
    from producer.contract.defaults import DEFAULT_WEIGHTS_URL
    from producer.settings import ProducerSettings
    from tests.conftest import FACES

    cache = tmp_path / "cache"
    cached = cache / Path(DEFAULT_WEIGHTS_URL).name
    cache.mkdir()
    shutil.copyfile(arcface_h5, cached)  # stand-in weights written by save_deepface_h5 (conftest)
    env = _env_without_arcface(
        ARCFACE_REDIS_URL=redis_server.url,
        ARCFACE_QUEUE=queue_name,
        ARCFACE_MODEL_PATH="",
        ARCFACE_MODEL_SHA256="",
        ARCFACE_METRICS_PORT="",
        ARCFACE_DETECT="",
        ARCFACE_CACHE_DIR=str(cache),
        ARCFACE_ALLOWED_BATCH_SIZES="1,4",
        ARCFACE_LOG_FORMAT="json",
    )
    worker = _worker(env, tmp_path)
    try:
        loaded = worker.wait_for("model_loaded", patience(180))
        assert loaded["source"] == str(cached)
        worker.wait_for("worker_started", patience(120))
        client = FaceClient(ProducerSettings(redis_url=redis_server.url, queue=queue_name))
        image = FACES / "amy" / "amy1.png"
        served = client.result_embed(client.embed(image), timeout=patience(60))
        expected = engine.embed_images([image.read_bytes()])[0]
        assert_close_to_float32(served.embedding, expected, served.precision)  # the default precision is auto
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(patience(60)) == 0
    finally:
        worker.close()


def test_native_output_python_logging_warnings_and_crashes_become_json_lines(tmp_path):
    import json

    script = """
import logging, os, warnings
from producer.settings import CommonSettings, configure_logging
from worker.stdio import capture_stdio
configure_logging(CommonSettings(log_format="json", log_level="DEBUG"), capture_stdio())
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
os.write(2, b"I0000 00:00:1795975074.379782   25700 port.cc:153] oneDNN custom operations are on.\\n")
os.write(2, b"E0000 00:00:1795975075.795908   25700 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n")
os.write(2, b"E0000 00:00:1795975075.795909   25700 op_kernel.cc:1857] OP_REQUIRES failed\\n")
os.write(1, b"written by C to stdout\\n")
print("a python print")
logging.getLogger("rq.worker").warning("Could not connect to Redis at %s, retrying", "redis://h:p@x:6379")
warnings.warn("a python warning")
raise RuntimeError("boom")
"""
    proc = _Proc([sys.executable, "-c", script], _env_without_arcface(), tmp_path, "capture")
    try:
        assert proc.proc.wait(patience(60)) == 1
    finally:
        proc.close()
    lines = proc.lines()
    events = [json.loads(line) for line in lines]  # every line, stdout and stderr, is JSON
    assert proc.out.read_text() == ""  # what was written to stdout is logged (as JSON on stderr)
    by = {(e["event"], e.get("source") or e.get("message") or e.get("logger")): e for e in events}
    assert by[("tensorflow_log", "port.cc:153")]["level"] == "debug"
    assert by[("tensorflow_log", "cuda_platform.cc:52")]["level"] == "debug"  # a CPU-only machine is no error
    assert by[("tensorflow_log", "op_kernel.cc:1857")]["level"] == "error"
    assert by[("stray_output", "written by C to stdout")]["stream"] == "stdout"
    assert ("stray_output", "a python print") in by
    rq_line = next(e for e in events if e.get("logger") == "rq.worker")
    assert (
        rq_line["level"] == "warning"
        and rq_line["event"] == "Could not connect to Redis at redis://h:***@x:6379, retrying"
    )
    assert any(e.get("logger") == "py.warnings" and "a python warning" in e["event"] for e in events)
    crash = next(e for e in events if e["event"] == "uncaught_exception")
    assert crash["level"] == "critical" and "RuntimeError: boom" in crash["exception"]


def test_console_format_puts_event_jobs_images_and_timings_first(monkeypatch):
    import io
    import logging

    import structlog

    from producer.settings import CommonSettings, configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, structlog.get_config())
    out = io.StringIO()
    try:
        configure_logging(CommonSettings(log_format="console"), out)
        structlog.get_logger("arcface.test").info(
            "batch", failed=0, queue_wait_ms=2.5, jobs_completed=3, worker="w1", images=4, inference_ms=7.0
        )
        logging.getLogger("rq.worker").warning("plain %s", "rq")
    finally:
        for h in [h for h in root.handlers if h not in saved[0]]:
            root.removeHandler(h)
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
    first, second = out.getvalue().splitlines()
    assert re.search(
        r"\[info\s*\] batch\s+jobs_completed=3 images=4 queue_wait_ms=2.5 inference_ms=7.0 failed=0 worker=w1$", first
    ), first
    assert "[warning  ] plain rq" in second and "[rq.worker]" in second


def _serve_through_a_redis_outage(servers: list, worker, tmp_path) -> None:
    """Jobs served, Redis (``servers[-1]``) stopped for a few seconds and restarted on its port (appended to
    ``servers``, so the caller stops it whatever happens), a job served again, SIGTERM (exit 0)."""
    import signal
    import time

    from producer.client.face_client import FaceClient
    from producer.settings import ProducerSettings
    from tests.conftest import face_paths
    from tests.redis_server import RedisServer

    server = servers[-1]
    worker.wait_for("worker_started", patience(180))
    client = FaceClient(ProducerSettings(redis_url=server.url))
    ids = [client.embed(p) for p in face_paths()[:6]]
    for job_id in ids:
        client.result_embed(job_id, timeout=patience(60))
    worker.wait_for("batch", patience(30))
    client.connection.close()
    server.stop()  # a Redis outage of a few seconds
    worker.wait_for("redis_unreachable", patience(30))
    time.sleep(3)
    server = RedisServer(tmp_path / "redis", port=server.port)
    servers.append(server)
    server.start()
    worker.wait_for("redis_reachable_again", patience(60))
    client = FaceClient(ProducerSettings(redis_url=server.url))
    client.result_embed(client.embed(face_paths()[7]), timeout=patience(60))  # serving again
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(patience(60)) == 0


def _json_events(lines: list[str]) -> list[dict]:
    """Every line as a JSON log event (fails on any line that is not JSON, or lacks event/level)."""
    import json

    events = []
    for line in lines:
        event = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(event, dict) and "event" in event and "level" in event, line
        events.append(event)
    return events


def test_json_mode_every_worker_line_is_json_through_start_batch_redis_outage_and_shutdown(arcface_h5, tmp_path):
    """TF_CPP_MIN_LOG_LEVEL unset, as in a container: nothing but JSON on stdout and stderr, TensorFlow quiet."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    env = _env_without_arcface(
        ARCFACE_REDIS_URL=server.url,
        ARCFACE_MODEL_PATH=str(arcface_h5),
        ARCFACE_ALLOWED_BATCH_SIZES="1,4",
        ARCFACE_LOG_FORMAT="json",
    )
    worker = _worker(env, tmp_path)
    servers = [server]
    try:
        _serve_through_a_redis_outage(servers, worker, tmp_path)
    finally:
        worker.close()
        for each in servers:
            each.stop()
    events = _json_events(worker.lines())
    names = [e["event"] for e in events]
    order = [
        names.index(n)
        for n in ("worker_started", "batch", "redis_unreachable", "redis_reachable_again", "worker_stopped")
    ]
    assert order == sorted(order), names
    # one outage: one redis_reachable_again, logged once Redis really answers (no redis_unreachable after it)
    assert (
        names.count("redis_reachable_again") == 1
        and "redis_unreachable" not in names[names.index("redis_reachable_again") :]
    ), names
    noise = [e for e in events if e["event"] in ("tensorflow_log", "stray_output")]
    assert noise == [], noise  # TensorFlow's start-up chatter is below INFO
    batches = [e for e in events if e["event"] == "batch"]
    assert all("job_ids" not in e and isinstance(e["images"], int) for e in batches)  # ids only at DEBUG
    assert names.index("worker_started") < 10, names  # a quiet start: a few lines, none from TensorFlow
