"""Security: no pickle on any code path, Redis AUTH (password and ACL user) and TLS from settings, secrets
never in logs, the container's user."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from producer.client.face_client import FaceClient
from producer.contract.rqjob import JSONSerializer, SafeJob
from producer.settings import ProducerSettings, redact
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.redis_server import RedisServer, free_port
from tests.workers import WorkerProcess


def test_no_pickle_in_any_code_path_and_everything_uses_the_json_serializer(worker_env):
    offenders = []
    for path in [*REPO.joinpath("producer").rglob("*.py"), *REPO.joinpath("worker").rglob("*.py")]:
        text = path.read_text()
        if (
            re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle|import marshal)", text, re.M)
            or "pickle.load" in text
        ):
            offenders.append(str(path))
    assert offenders == []
    client = FaceClient(ProducerSettings())
    assert client.queue.serializer is JSONSerializer and client.queue.job_class is SafeJob
    import inspect

    from worker.batching.worker import BatchWorker  # the worker inherits the queue's serializer and job class

    assert "serializer=queue.serializer" in inspect.getsource(BatchWorker.__init__)
    assert "job_class=queue.job_class" in inspect.getsource(BatchWorker.__init__)


@pytest.fixture()
def small_model(tmp_path):
    import keras

    inputs = keras.Input((112, 112, 3))
    x = keras.layers.Conv2D(4, 7, strides=8)(inputs)
    keras.Model(inputs, keras.layers.Dense(16)(keras.layers.Flatten()(x))).save(tmp_path / "m.keras")
    return tmp_path / "m.keras"


def run_one_job(url: str, small_model: Path, log: Path, **extra: str) -> tuple[WorkerProcess, int]:
    queue = f"sec-{uuid.uuid4().hex[:6]}"
    env = {
        "ARCFACE_REDIS_URL": url,
        "ARCFACE_QUEUE": queue,
        "ARCFACE_MODEL_PATH": str(small_model),
        "ARCFACE_ALLOWED_BATCH_SIZES": "1,4",
        **extra,
    }
    worker = WorkerProcess(env, log, "--burst")
    client = FaceClient(ProducerSettings(redis_url=url, queue=queue, **{k[8:].lower(): v for k, v in extra.items()}))
    job = client.embed(face_paths()[0])
    assert worker.wait(patience(180)) == 0, log.read_text()[-2000:]
    return worker, client.result(job, timeout=patience(10)).dim


def test_password_and_acl_user_auth_work_and_never_reach_the_logs(tmp_path, small_model):
    server = RedisServer(
        tmp_path / "redis",
        "--requirepass",
        "s3cret-pw",
        "--user",
        "alice",
        "on",
        ">w0nderland",
        "~*",
        "&*",
        "+@all",
        password="s3cret-pw",
    ).start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("x", 1)
        for url, secret in (
            (f"redis://:s3cret-pw@127.0.0.1:{server.port}/0", "s3cret-pw"),
            (f"redis://alice:w0nderland@127.0.0.1:{server.port}/0", "w0nderland"),
        ):
            worker, dim = run_one_job(url, small_model, tmp_path / f"{secret}.log")
            assert dim == 16
            text = worker.log_path.read_text()
            assert secret not in text
            assert f":***@127.0.0.1:{server.port}" in text  # the URL is logged, its password redacted
        assert (
            redact("redis://alice:w0nderland@host:6379/0 and rediss://:pw@h/1")
            == "redis://alice:***@host:6379/0 and rediss://:***@h/1"
        )
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://:s3cret@127.0.0.1:1/0", "http://:***@127.0.0.1:1/0"),
        ("REDIS://:s3cret@127.0.0.1:1/0", "REDIS://:***@127.0.0.1:1/0"),
        ("redis+tls://alice:s3cret@127.0.0.1:1/0", "redis+tls://alice:***@127.0.0.1:1/0"),
        ("Rediss://alice:s3@cret@127.0.0.1:1/0", "Rediss://alice:***@127.0.0.1:1/0"),  # '@' inside the password
    ],
)
def test_a_refused_redis_url_is_shown_without_its_password_whatever_its_scheme(url, shown):
    """An ARCFACE_REDIS_URL of another scheme (or case) is refused by both programs, and the error quotes it with
    the password hidden."""
    for program, prog in (("producer.cli", "arcface-producer"), ("worker.cli", "arcface-worker")):
        args = ["status", "abc"] if program == "producer.cli" else ["--burst"]
        proc = subprocess.run(
            [sys.executable, "-m", program, *args],
            env={**os.environ, "ARCFACE_REDIS_URL": url},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=patience(120),
        )
        assert proc.returncode == 2, proc.stderr
        assert "s3" not in proc.stderr and "cret" not in proc.stderr
        assert proc.stderr.startswith(f"{prog}: ARCFACE_REDIS_URL={shown!r}: must be a redis://"), proc.stderr


def test_redact_hides_every_password_of_a_text():
    assert redact("REDIS://:pw@h:1/0, redis+tls://u:p@ss@h/1 and http://x:y@z") == (
        "REDIS://:***@h:1/0, redis+tls://u:***@h/1 and http://x:***@z"
    )
    assert redact("unix:///run/redis.sock?db=0&password=pw") == "unix:///run/redis.sock?db=0&password=***"
    for plain in ("redis://alice@host:6379/0", "redis://host:6379/0 then user:name@example.org", "a:b@c"):
        assert redact(plain) == plain  # no password: nothing changes


def _wait(ping, timeout: float = patience(10)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError("server did not come up")


def _make_tls_certs(d: Path) -> None:
    """A throw-away CA (ca.crt) and a server certificate it signed for 127.0.0.1 (server.crt/server.key) in ``d``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ca = ["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca"]
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", *ca)
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"
    )
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    signed = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2"]
    openssl("x509", "-req", "-in", "server.csr", *signed, "-extfile", "san.cnf")


def _start_tls_redis(d: Path, port: int) -> subprocess.Popen:
    """redis-server with only a TLS port (no client certificates required), using the certificates in ``d``."""
    from producer.redisconn import redis_server_binary

    tls = ["--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key")]
    tls += ["--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no"]
    return subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
        + ["--save", "", "--dir", str(d), *tls],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_tls_rediss_url_with_a_ca_file(tmp_path, small_model):
    d = tmp_path / "tls"
    d.mkdir()
    _make_tls_certs(d)
    port = free_port()
    proc = _start_tls_redis(d, port)
    try:
        _wait(lambda: redis.Redis(port=port, ssl=True, ssl_ca_certs=str(d / "ca.crt")).ping())
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_timeout=2).ping()  # plain text is refused
        url = f"rediss://127.0.0.1:{port}/0"
        _, dim = run_one_job(url, small_model, tmp_path / "tls.log", ARCFACE_REDIS_TLS_CA_FILE=str(d / "ca.crt"))
        assert dim == 16
    finally:
        proc.terminate()
        proc.wait(patience(10))


def test_container_runs_as_a_non_root_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users, "the Dockerfile must switch user"
    assert users[-1] not in ("root", "0", "0:0")
