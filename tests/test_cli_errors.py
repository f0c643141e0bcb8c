"""Every user or configuration error of ``arcface-producer`` and ``arcface-worker``, run as a subprocess: the
documented exit code, exactly one line on stderr naming the flag or ``ARCFACE_*`` variable, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import REPO, face_paths
from tests.patience import patience

# Runs a console script with some modules made unimportable (a producer-only install, no matplotlib).
RUNNER = """
import os, sys, importlib.abc
blocked = set(filter(None, os.environ.get("TEST_BLOCK_MODULES", "").split(",")))
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Block())
prog = sys.argv[1]
sys.argv = [prog] + sys.argv[2:]
if prog == "arcface-producer":
    from producer.cli import main
else:
    from worker.cli import main
main()
"""
PRODUCER_ONLY = "tensorflow,keras,h5py,prometheus_client,worker"
NO_MATPLOTLIB = PRODUCER_ONLY + ",matplotlib"


def run(
    prog: str, *args: str, env: dict[str, str], cwd: Path = REPO, block: str = "", timeout: float = patience(60)
) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
    full.update({"PYTHONPATH": str(REPO), "TEST_BLOCK_MODULES": block, **env})
    return subprocess.run(
        [sys.executable, "-c", RUNNER, prog, *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]
    code: int
    says: list[str]
    env: dict[str, str] = field(default_factory=dict)
    prog: str = "arcface-producer"
    block: str = PRODUCER_ONLY
    setup: Callable[[Path, object, str], dict[str, str]] | None = None  # returns more env
    dotenv: str | None = None


FACE = str(face_paths()[0])


def _corrupt_hash(tmp: Path, r, queue: str) -> dict[str, str]:
    r.hset(
        "rq:job:corrupt-job",
        mapping={"data": b"\x80\x04 not json", "created_at": "2026-11-29T16:00:00+00:00", "status": "queued"},
    )
    return {}


def _pickled_job(tmp: Path, r, queue: str) -> dict[str, str]:
    from rq import Queue

    Queue("another-app", connection=r).enqueue_call("os.getcwd", job_id="pickled-job")  # rq's default: pickle
    return {}


def _pairs(tmp: Path, r, queue: str) -> dict[str, str]:
    (tmp / "pairs.csv").write_text(f"a,b\n{FACE},{FACE}\n")
    (tmp / "outdir").mkdir(exist_ok=True)
    return {}


def _busy_port(tmp: Path, r, queue: str) -> dict[str, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _HELD.append(s)
    return {"ARCFACE_METRICS_PORT": str(s.getsockname()[1])}


_HELD: list[socket.socket] = []
STEAL = {"ARCFACE_QUEUE": "victim:intermediate"}  # rq:queue:victim:intermediate is queue victim's in-flight list
NOT_OURS = "not an ArcFace job"


def _embed(name: str, says: list[str], *extra: str, **kw: Any) -> Case:
    """``arcface-producer embed FACE EXTRA...``: a settings error (``env=``, ``dotenv=``) refused before enqueuing."""
    return Case(name, lambda t: ["embed", FACE, *extra], 2, says, **kw)


def _bulk(name: str, says: list[str], *extra: str, out: str = "r.csv", **kw: Any) -> Case:
    """``arcface-producer bulk pairs.csv --out OUT EXTRA...`` in the test's folder (``{t}`` in EXTRA names it)."""
    return Case(
        name,
        lambda t: ["bulk", str(t / "pairs.csv"), "--out", str(t / out), *(a.format(t=t) for a in extra)],
        2,
        says,
        setup=_pairs,
        **kw,
    )


def _worker(name: str, says: list[str], *args: str, block: str = "", **kw: Any) -> Case:
    """``arcface-worker ARGS``, by default with every module importable (a full install)."""
    return Case(name, lambda t: list(args), 2, says, prog="arcface-worker", block=block, **kw)


CASES = [
    # producer flags
    Case("threshold-5", lambda t: ["verify", FACE, FACE, "--threshold", "5"], 2, ["--threshold", "0..2"]),
    Case("threshold-nan", lambda t: ["verify", FACE, FACE, "--threshold", "nan"], 2, ["--threshold", "finite"]),
    Case("ref-too-long", lambda t: ["embed", FACE, "--ref", "r" * 1025], 2, ["--ref", "1024"]),
    Case("timeout-nan", lambda t: ["embed", FACE, "--wait", "--timeout", "nan"], 2, ["--timeout"]),
    Case("timeout-negative", lambda t: ["embed", FACE, "--wait", "--timeout", "-1"], 2, ["--timeout"]),
    Case("job-id-with-dot", lambda t: ["status", "order.42"], 2, ["order.42", "job id"]),
    Case("result-id-with-colon", lambda t: ["result", "a:b"], 2, ["job id"]),
    Case("unknown-command", lambda t: ["frobnicate"], 2, ["frobnicate"]),
    Case("missing-image", lambda t: ["embed", str(t / "nope.jpg")], 2, ["nope.jpg"]),
    Case("verify-missing-b", lambda t: ["verify", FACE, str(t / "nope.jpg")], 2, ["image b", "nope.jpg"]),
    # producer settings
    _embed("redis-url-no-scheme", ["ARCFACE_REDIS_URL", "redis://"], env={"ARCFACE_REDIS_URL": "redis//x"}),
    _embed("redis-url-http", ["ARCFACE_REDIS_URL", "redis://"], env={"ARCFACE_REDIS_URL": "http://x"}),
    _embed(
        "redis-url-bad-port-secret", ["ARCFACE_REDIS_URL", "***"], env={"ARCFACE_REDIS_URL": "redis://:s3cret@h:xx/0"}
    ),
    _embed("dotenv-wait-timeout", ["ARCFACE_WAIT_TIMEOUT", "soon", ".env"], dotenv="ARCFACE_WAIT_TIMEOUT=soon\n"),
    _embed("retries-negative", ["ARCFACE_RETRIES", "-1"], env={"ARCFACE_RETRIES": "-1"}),
    _embed("log-level", ["ARCFACE_LOG_LEVEL", "INFO"], env={"ARCFACE_LOG_LEVEL": "LOUD"}),
    _embed(
        "embedded-forbidden",
        ["ARCFACE_REDIS_URL", "ARCFACE_EMBEDDED_REDIS"],
        env={"ARCFACE_EMBEDDED_REDIS": "false", "ARCFACE_REDIS_URL": ""},
    ),
    _embed("wait-with-result-ttl-0", ["ARCFACE_RESULT_TTL"], "--wait", env={"ARCFACE_RESULT_TTL": "0"}),
    _embed("queue-aliasing-intermediate", ["ARCFACE_QUEUE", "victim:intermediate", "':'"], env=STEAL),
    _embed("queue-with-space", ["ARCFACE_QUEUE", "1 to 128"], env={"ARCFACE_QUEUE": "my queue"}),
    _embed("queue-too-long", ["ARCFACE_QUEUE", "1 to 128"], env={"ARCFACE_QUEUE": "q" * 129}),
    _embed("wait-timeout-inf", ["ARCFACE_WAIT_TIMEOUT", "finite", "<= 86400"], env={"ARCFACE_WAIT_TIMEOUT": "inf"}),
    _embed("result-ttl-huge", ["ARCFACE_RESULT_TTL", "<= 31622400"], env={"ARCFACE_RESULT_TTL": "99999999999"}),
    _embed(
        "unknown-variable-suggests",
        ["ARCFACE_WAIT_TIMOUT", "not a setting", "did you mean ARCFACE_WAIT_TIMEOUT?"],
        env={"ARCFACE_WAIT_TIMOUT": "5"},
    ),
    _embed(
        "unknown-variable-in-dotenv",
        ["ARCFACE_TRESHOLD", ".env", "did you mean ARCFACE_THRESHOLD?"],
        dotenv="ARCFACE_TRESHOLD=0.5\n",
    ),
    _embed(
        "unknown-variable-no-match", ["ARCFACE_ZZZZZZ", "no setting has a similar name"], env={"ARCFACE_ZZZZZZ": "1"}
    ),
    # jobs that are not ours
    Case("corrupt-job-hash", lambda t: ["status", "corrupt-job"], 2, ["corrupt-job", NOT_OURS], setup=_corrupt_hash),
    Case("pickled-job-status", lambda t: ["status", "pickled-job"], 2, ["pickled-job", NOT_OURS], setup=_pickled_job),
    Case(
        "pickled-job-result",
        lambda t: ["result", "pickled-job", "--timeout", "1"],
        2,
        ["pickled-job"],
        setup=_pickled_job,
    ),
    # bulk: refused before anything is enqueued
    _bulk("bulk-out-missing-dir", ["--out", "does not exist"], out="no/r.csv"),
    _bulk("bulk-out-is-dir", ["--out", "directory"], out="outdir"),
    _bulk("bulk-threshold-nan", ["--threshold"], "--threshold", "nan"),
    _bulk("bulk-window-negative", ["--window"], "--window", "-5"),
    _bulk("bulk-plot-without-matplotlib", ["--plot", "matplotlib"], "--plot", "{t}/p.png", block=NO_MATPLOTLIB),
    _bulk("bulk-shared-root-unset", ["--shared-root", "ARCFACE_SHARED_ROOT"], "--shared-root"),
    Case(
        "bulk-broken-pair-file",
        lambda t: ["bulk", str(t / "bad.csv"), "--out", str(t / "r.csv")],
        2,
        ["bad.csv:2"],
        setup=lambda t, r, q: (t / "bad.csv").write_text("a,b,label\nx,y,perhaps\n") and {},
    ),
    # worker configuration
    _worker("worker-max-batch-size", ["ARCFACE_MAX_BATCH_SIZE", "abc"], env={"ARCFACE_MAX_BATCH_SIZE": "abc"}),
    _worker("worker-precision", ["ARCFACE_PRECISION", "float32", "reduced"], env={"ARCFACE_PRECISION": "bogus"}),
    _worker("worker-log-level", ["ARCFACE_LOG_LEVEL", "DEBUG"], env={"ARCFACE_LOG_LEVEL": "LOUD"}),
    _worker("worker-metrics-port-in-use", ["ARCFACE_METRICS_PORT"], setup=_busy_port),
    _worker("worker-producer-only-install", ["arcface-service[worker]"], block=PRODUCER_ONLY.replace(",worker", "")),
    _worker("worker-bad-flag", ["--bogus"], "--bogus"),
    _worker("worker-queue-aliasing-intermediate", ["ARCFACE_QUEUE", "victim:intermediate", "':'"], env=STEAL),
    _worker(
        "worker-decode-timeout-inf",
        ["ARCFACE_DECODE_TIMEOUT_S", "finite", "> 0 and <= 600", "default 30"],
        env={"ARCFACE_DECODE_TIMEOUT_S": "inf"},
    ),
    _worker(
        "worker-batch-timeout-inf",
        ["ARCFACE_BATCH_TIMEOUT_MS", "finite", ">= 0 and <= 10000"],
        env={"ARCFACE_BATCH_TIMEOUT_MS": "inf"},
    ),
    _worker(
        "worker-heartbeat-microsecond",
        ["ARCFACE_HEARTBEAT_INTERVAL_S", ">= 0.1 and <= 60"],
        env={"ARCFACE_HEARTBEAT_INTERVAL_S": "1e-6"},
    ),
    _worker(
        "worker-heartbeat-not-below-ttl",
        ["ARCFACE_HEARTBEAT_INTERVAL_S=20", "ARCFACE_EXECUTION_TTL_S=15"],
        env={"ARCFACE_HEARTBEAT_INTERVAL_S": "20"},
    ),
    _worker(
        "worker-preprocess-processes-100000",
        ["ARCFACE_PREPROCESS_PROCESSES", "usable cores", "set auto"],
        env={"ARCFACE_PREPROCESS_PROCESSES": "100000"},
    ),
    _worker(
        "worker-batch-size-4096",
        ["ARCFACE_ALLOWED_BATCH_SIZES", "from 1 to 1024"],
        env={"ARCFACE_ALLOWED_BATCH_SIZES": "1,4096", "ARCFACE_MAX_BATCH_SIZE": "4096"},
    ),
    _worker("worker-metrics-port-70000", ["ARCFACE_METRICS_PORT", "<= 65535"], env={"ARCFACE_METRICS_PORT": "70000"}),
    _worker(
        "worker-blazeface-without-detector",
        ["ARCFACE_DETECT=blazeface", "ARCFACE_DETECTOR_PATH", "ARCFACE_DETECTOR_URL"],
        env={"ARCFACE_DETECT": "blazeface"},
    ),
    _worker(
        "worker-unknown-variable",
        ["ARCFACE_TRESHOLD", "not a setting", "did you mean ARCFACE_THRESHOLD?"],
        env={"ARCFACE_TRESHOLD": "0.5"},
    ),
    _worker(
        "worker-unknown-variable-in-dotenv",
        ["ARCFACE_MAX_BATCH", ".env", "did you mean ARCFACE_MAX_BATCH_SIZE?"],
        dotenv="ARCFACE_MAX_BATCH=8\n",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_invocation_exits_with_one_line(case: Case, redis_server, tmp_path):
    r = redis_server.client()
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    env = {
        "ARCFACE_REDIS_URL": redis_server.url,
        "ARCFACE_QUEUE": queue,
        "ARCFACE_DATA_DIR": str(tmp_path / "data"),
        "ARCFACE_MODEL_PATH": str(tmp_path / "never-loaded.h5"),
    }
    if case.setup:
        env.update(case.setup(tmp_path, r, queue) or {})
    env.update(case.env)
    cwd = REPO
    if case.dotenv is not None:
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        (cwd / ".env").write_text(case.dotenv)
    start = time.monotonic()
    proc = run(case.prog, *case.args(tmp_path), env=env, cwd=cwd, block=case.block)
    took = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == case.code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for text in case.says:
        assert text in lines[0], (text, lines[0])
    assert "s3cret" not in proc.stderr
    assert r.llen(f"rq:queue:{queue}") == 0  # refused before anything was enqueued
    if case.prog == "arcface-worker":
        assert took < 30, f"a configuration error must be reported before the model loads ({took:.1f}s)"


def test_help_documents_every_argument():
    from producer.cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.help == "==SUPPRESS==":
                continue
            assert action.help, (name, action.dest)


def test_version_and_worker_help_list_settings():
    out = run("arcface-producer", "--version", env={}, block=PRODUCER_ONLY)
    assert out.returncode == 0 and out.stdout.startswith("arcface-producer ") and out.stdout.split()[1][0].isdigit()
    help_ = run("arcface-worker", "--help", env={}, block=PRODUCER_ONLY.replace(",worker", ""))
    assert help_.returncode == 0
    from worker.settings import WorkerSettings

    for name in WorkerSettings.model_fields:
        assert f"ARCFACE_{name.upper()}" in help_.stdout


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    """A redis-server that wants the password ``s3cret-pw`` (and knows an ACL user ``reader`` allowed only PING)."""
    from tests.redis_server import RedisServer

    server = RedisServer(
        tmp_path_factory.mktemp("auth-redis"),
        "--requirepass",
        "s3cret-pw",
        "--user",
        "reader",
        "on",
        ">r3ader-pw",
        "+ping",
        password="s3cret-pw",
    ).start()
    yield server
    server.stop()


def _auth_urls(server) -> list[tuple[str, str]]:
    return [
        # Redis's reply (redis-py drops the WRONGPASS / NOAUTH prefix, turned into AuthenticationError)
        (f"redis://:s3cret-wrong@127.0.0.1:{server.port}/0", "invalid username-password pair"),  # a wrong password
        (f"redis://127.0.0.1:{server.port}/0", "Authentication required"),  # none given
        (f"redis://nobody:s3cret-x@127.0.0.1:{server.port}/0", "invalid username-password pair"),  # no such user
    ]


@pytest.mark.parametrize("prog", ["arcface-producer", "arcface-worker"])
def test_refused_password_is_reported_as_authentication_not_unreachable(prog, password_redis, tmp_path):
    """A wrong or missing password exits 4 like an unreachable Redis, but the line says the credentials were
    refused (never 'cannot reach'), names the reply, and never prints the password."""
    for url, reply in _auth_urls(password_redis):
        env = {
            "ARCFACE_REDIS_URL": url,
            "ARCFACE_QUEUE": "auth",
            "ARCFACE_DATA_DIR": str(tmp_path / "data"),
            "ARCFACE_MODEL_PATH": str(tmp_path / "never-loaded.h5"),
        }
        args = ["status", "some-job"] if prog == "arcface-producer" else []
        proc = run(prog, *args, env=env, block=PRODUCER_ONLY if prog == "arcface-producer" else "")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 4, (url, proc.stderr)
        assert len(lines) == 1, proc.stderr
        assert "refused the password or ACL user" in lines[0] and reply in lines[0], lines[0]
        assert "ARCFACE_REDIS_URL" in lines[0] and "cannot reach" not in lines[0]
        assert "s3cret" not in proc.stderr + proc.stdout
        if prog == "arcface-worker":
            assert '"event": "redis_auth_failed"' in lines[0]


def test_library_raises_redis_auth_failed_for_refused_credentials_and_denied_commands(password_redis):
    """``connect`` raises RedisAuthFailed (a RedisUnavailable) for refused credentials; a later command an ACL user
    may not run is reported as denied to that user, through the same ``redis_errors`` helper the client uses."""
    from producer.contract.errors import RedisAuthFailed, RedisUnavailable
    from producer.redisconn import connect, redis_errors
    from producer.settings import ProducerSettings

    for url, reply in _auth_urls(password_redis):
        with pytest.raises(RedisAuthFailed) as caught:
            connect(ProducerSettings(redis_url=url))
        assert isinstance(caught.value, RedisUnavailable) and caught.value.exit_code == 4
        assert "Redis at redis://" in caught.value.message and reply in caught.value.message
        assert "refused the password or ACL user" in caught.value.message and "s3cret" not in caught.value.message
    reader = connect(ProducerSettings(redis_url=f"redis://reader:r3ader-pw@127.0.0.1:{password_redis.port}/0"))
    with pytest.raises(RedisAuthFailed, match="denied the command to this ACL user while enqueueing: .*'set' command"):
        with redis_errors("enqueueing"):
            reader.set("x", 1)
