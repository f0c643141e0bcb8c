"""arcface-producer: exit codes, output, and a producer that works without TensorFlow installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.redis_server import free_port

# Runs the CLI with TensorFlow made unimportable, as in a producer-only install.
NO_TF = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'worker'):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: producer-only environment)")
sys.meta_path.insert(0, _Block())
import producer, producer.contract.wire, producer.contract.rqjob, producer.client, producer.cli
import producer.bulk.run, producer.settings, producer.redisconn
assert not any(m.split('.')[0] in ('tensorflow', 'keras', 'worker') for m in sys.modules)
from producer.cli.main import run
sys.exit(run(sys.argv[1:]))
"""


def cli(env: dict, *args: str, timeout: float = patience(60)) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TF, *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_embed_then_result_without_tensorflow(worker_env):
    from producer.client.face_client import FaceClient
    from tests.test_contract import run_plain_rq_worker

    queued = cli(worker_env, "embed", str(face_paths()[0]), "--json", "--ref", "abc")
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["job_id"]
    assert cli(worker_env, "status", job_id).stdout.strip() == "queued"
    run_plain_rq_worker(FaceClient())
    done = cli(worker_env, "result", job_id, "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["status"] == "finished" and body["result"]["dim"] == 512 and body["result"]["ref"] == "abc"
    human = cli(worker_env, "result", job_id)
    assert human.returncode == 0 and "512-d embedding" in human.stdout
    floats = body["result"]["embedding"]  # --json carries the floats, not only base64
    assert len(floats) == 512 and all(isinstance(x, float) for x in floats)
    import numpy as np

    saved = cli(worker_env, "result", job_id, "--out", str(Path(worker_env["ARCFACE_DATA_DIR"]).parent / "emb.npy"))
    assert saved.returncode == 0 and "written to" in saved.stdout
    vec = np.load(Path(worker_env["ARCFACE_DATA_DIR"]).parent / "emb.npy")
    assert vec.dtype == np.float32 and vec.shape == (512,)
    np.testing.assert_allclose(vec, np.asarray(floats, np.float32))


def test_cli_verify_human_output_and_failed_job_exit_1(worker_env, tmp_path):
    from producer.client.face_client import FaceClient
    from tests.test_contract import run_plain_rq_worker

    a, b = face_paths()[0], face_paths()[1]
    job_id = cli(worker_env, "verify", str(a), str(b)).stdout.strip()
    text = tmp_path / "note.png"
    text.write_text("not an image at all")
    bad_id = cli(worker_env, "embed", str(text)).stdout.strip()
    run_plain_rq_worker(FaceClient())
    ok = cli(worker_env, "result", job_id)
    assert ok.returncode == 0 and "distance" in ok.stdout and "threshold 0.68" in ok.stdout
    failed = cli(worker_env, "result", bad_id, "--json")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert json.loads(failed.stdout)["code"] == "image_decode_error"
    status = cli(worker_env, "status", bad_id)
    assert status.returncode == 0 and status.stdout.startswith("failed [image_decode_error]: "), status.stdout
    assert json.loads(cli(worker_env, "status", bad_id, "--json").stdout)["error"]["code"] == "image_decode_error"


def test_client_error_is_none_for_a_job_that_did_not_fail(worker_env, tmp_path):
    from producer.client.face_client import FaceClient
    from producer.contract.codes import ErrorCode
    from tests.test_contract import run_plain_rq_worker

    client = FaceClient()
    good = client.embed(face_paths()[0])
    text = tmp_path / "note.png"
    text.write_text("not an image at all")
    bad = client.embed(text)
    assert client.error(good) is None and client.error(bad) is None  # queued: not failed (yet)
    run_plain_rq_worker(client)
    assert client.status(good) == "finished" and client.error(good) is None
    error = client.error(bad)
    assert client.status(bad) == "failed" and error is not None and error.code is ErrorCode.IMAGE_DECODE_ERROR


def test_cli_exit_codes_for_bad_input_timeout_and_redis_down(worker_env, tmp_path):
    missing = cli(worker_env, "embed", str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "nope.jpg" in missing.stderr and "Traceback" not in missing.stderr
    assert cli(worker_env, "frobnicate").returncode == 2
    timeout = cli(worker_env, "embed", str(face_paths()[0]), "--wait", "--timeout", "0.3")
    assert timeout.returncode == 3 and "no result after 0.3s" in timeout.stderr
    down = {**worker_env, "ARCFACE_REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    gone = cli(down, "embed", str(face_paths()[0]))
    assert gone.returncode == 4
    assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr
    assert "s3cret" not in gone.stderr and "***" in gone.stderr
    unknown = cli(worker_env, "status", "no-such-job")
    assert unknown.returncode == 2 and "no job" in unknown.stderr


def test_import_producer_pulls_no_tensorflow():
    code = (
        "import sys, producer, producer.contract.wire, producer.client, producer.cli, producer.bulk.run; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow','keras','worker')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    # and the packaging agrees: TensorFlow is only in the worker extra
    import tomllib

    project = tomllib.loads(Path(REPO, "pyproject.toml").read_text())["project"]
    assert not any("tensorflow" in dep for dep in project["dependencies"])
    assert any(dep.startswith("tensorflow") for dep in project["optional-dependencies"]["worker"])


def test_ctrl_c_while_waiting_prints_the_job_id_and_exits_130(worker_env):
    """No worker serves this queue: the CLI waits; SIGINT ends it with the id and how to fetch the result."""
    import signal
    import time

    import redis

    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TF, "embed", str(face_paths()[0]), "--wait", "--json"],
        env={**os.environ, **worker_env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    r = redis.Redis.from_url(worker_env["ARCFACE_REDIS_URL"])
    deadline = time.monotonic() + patience(30)
    while time.monotonic() < deadline and r.llen(f"rq:queue:{worker_env['ARCFACE_QUEUE']}") == 0:
        time.sleep(0.05)
    while time.monotonic() < deadline and not any("b" in c["flags"] for c in r.client_list()):
        time.sleep(0.05)  # until the CLI is inside its blocking read
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=patience(30))
    assert proc.returncode == 130, (out, err)
    body = json.loads(out)
    job_id = body["job_id"]
    assert body["status"] == "interrupted" and body["enqueued"] is True
    assert err.count("\n") == 1 and "Traceback" not in err and f"arcface-producer result {job_id}" in err
    assert cli(worker_env, "status", job_id).stdout.strip() == "queued"  # the job was not lost


def test_a_fifo_or_a_device_given_as_an_image_is_refused_before_it_is_read(worker_env, tmp_path):
    """A FIFO (which would block the read forever) and /dev/zero (endless) are refused at once, with exit 2, by
    embed, by enroll --folder (a failed row each) and by bulk (a failed row each); nothing is enqueued."""
    import csv

    import redis

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for image, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/zero"), "a character device")):
        proc = cli(worker_env, "embed", str(image), timeout=patience(60))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"arcface-producer: {image}: {kind}, not a regular file; give an image file\n"

    folder = tmp_path / "people" / "alice"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "1.jpg")
    (folder / "2.jpg").symlink_to("/dev/zero")
    out = tmp_path / "enrolled.csv"
    enrolled = cli(
        worker_env, "enroll", "--folder", str(folder.parent), "--out", str(out), "--json", timeout=patience(60)
    )
    assert enrolled.returncode == 1, enrolled.stderr
    assert json.loads(enrolled.stdout)["failed"] == 2
    rows = list(csv.DictReader(out.open()))
    assert [(r["image"], r["error"]) for r in rows] == [
        ("alice/1.jpg", "invalid_payload"),
        ("alice/2.jpg", "invalid_payload"),
    ]
    assert "a FIFO (named pipe), not a regular file" in rows[0]["message"]
    assert "a character device, not a regular file" in rows[1]["message"]

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,label\npeople/alice/1.jpg,people/alice/2.jpg,1\n")
    bulk = cli(
        worker_env, "bulk", str(pairs), "--root", str(tmp_path), "--out", str(tmp_path / "r.csv"), timeout=patience(60)
    )
    assert bulk.returncode == 1, bulk.stderr
    (row,) = csv.DictReader((tmp_path / "r.csv").open())
    assert row["error"] == "invalid_payload" and "a FIFO (named pipe), not a regular file" in row["message"]
    assert "image b people/alice/2.jpg" in row["message"] and "a character device" in row["message"]
    assert redis.Redis.from_url(worker_env["ARCFACE_REDIS_URL"]).llen(f"rq:queue:{worker_env['ARCFACE_QUEUE']}") == 0
