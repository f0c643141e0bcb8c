"""Failure modes of the preprocessing processes (``worker.inference.prepool``) found by attacking them: signals meant
for the worker, children that cannot start, a respawn that fails, the worker's working directory, a child's answers, the
platform, and a worker that is SIGKILLed. Each test fails on the behaviour it describes, never by waiting forever:
every wait is bounded."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

import worker.inference.prepool_ipc as prepool_ipc
from producer.codes import JobFailure
from tests.conftest import REPO, face_paths
from tests.patience import patience
from worker.inference.prepool import ProcessPreprocessor, start_preprocessors
from worker.settings import WorkerSettings

FACE = base64.b64encode(face_paths()[0].read_bytes()).decode("ascii")

# A child script's common start: the repository's pool, the worker's own SIGINT/SIGTERM handlers (a warm shutdown
# that lets the images in hand finish) and a 6000 x 6000 PNG (about half a second to decode and resize).
_CHILD_PRELUDE = """
import base64, io, json, signal, sys, time
from PIL import Image
from tests.patience import patience
from worker.inference.decode_checks import DecodeLimits
from worker.inference.prepool import ProcessPreprocessor
from tests.patience import patience

signal.signal(signal.SIGINT, lambda *_: None)
signal.signal(signal.SIGTERM, lambda *_: None)
out = io.BytesIO()
Image.new("RGB", (6000, 6000), (90, 120, 200)).save(out, "PNG")
SLOW = base64.b64encode(out.getvalue()).decode("ascii")
pool = ProcessPreprocessor(1, 112, DecodeLimits(), None, 10 << 20, 30.0, slots=64)
pool.submit([(sys.argv[1], None)])[0].exception(timeout=patience(60))  # the child is up
"""


def outcome(pool: ProcessPreprocessor, timeout: float) -> BaseException | None:
    """The outcome of one face image submitted to ``pool`` (None: prepared); fails the test if it never comes."""
    future = pool.submit([(FACE, None)])[0]
    try:
        error = future.exception(timeout=timeout)
    except FutureTimeout:
        pytest.fail(f"the image was neither prepared nor failed within {timeout:g}s ({pool.replaced} respawns)")
    if error is None:
        release = getattr(future.result(), "release", None)
        if release is not None:
            release()
    return error


def fake_python(path: Path, body: str) -> Path:
    """Stands in for ``sys.executable`` (the pool runs ``<it> -m worker.inference.prepool_child``)."""
    path.write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_in_own_session(script: str, *args: str) -> subprocess.Popen:
    """``script`` (after the prelude) in a new session, as a worker would be: its process group is its own."""
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_PRELUDE + textwrap.dedent(script), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def line_from(proc: subprocess.Popen, tag: str) -> str:
    """The rest of the first line of ``proc``'s output that starts with ``tag`` (log lines come in between)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.split(" ", 1)[0].strip() == tag:
            return line[len(tag) :].strip()
    raise AssertionError(f"the script ended (exit code {proc.wait()}) before printing {tag!r}")


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_warm_shutdown_signalled_to_the_process_group_lets_the_images_in_hand_finish():
    # Ctrl-C in a terminal, systemd (KillMode=control-group), supervisord's stopasgroup signal the whole group: the
    # worker starts its warm shutdown (README: finish every job in hand), its preprocessing processes must too.
    proc = run_in_own_session(
        """
        slow = pool.submit([(SLOW, None)])[0]
        while pool.busy() == 0:
            time.sleep(0.005)
        print("busy", flush=True)
        error = slow.exception(timeout=patience(60))
        print("outcome", json.dumps(None if error is None else str(error)), flush=True)
        pool.close()
        """,
        FACE,
    )
    try:
        assert line_from(proc, "busy") == ""
        os.killpg(proc.pid, signal.SIGINT)
        result = line_from(proc, "outcome")
        assert proc.wait(timeout=patience(60)) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert result == "null", f"the image in hand failed on the warm shutdown: {result}"


def test_children_that_cannot_start_put_the_pool_on_threads_instead_of_being_respawned_forever(
    pool_of, tmp_path, monkeypatch
):
    # A child that dies before its first image (a broken install, a memory limit hit while importing) is replaced
    # with nothing failed; when every replacement dies the same way the pool must not wait forever: it falls back
    # to preprocessing in the worker (slower, never stuck), says why, and the image comes out the same.
    monkeypatch.setattr(sys, "executable", str(fake_python(tmp_path / "python", "raise SystemExit(3)\n")))
    pool = pool_of(1)
    error = outcome(pool, timeout=patience(15))
    assert error is None, error
    assert pool.broken is not None and "3 starts in a row failed" in pool.broken
    assert pool.child_pids() == []
    assert outcome(pool, timeout=patience(15)) is None  # and later images too


def test_a_respawn_that_fails_once_does_not_stop_the_pool(pool_of, monkeypatch):
    # fork() fails with EAGAIN (a pids cgroup limit, RLIMIT_NPROC) or ENOMEM, typically under the very memory
    # pressure that had the OOM killer take the child: the collector thread must survive it.
    pool = pool_of(1)
    assert outcome(pool, timeout=patience(60)) is None
    real, calls = subprocess.Popen, []

    def flaky_popen(*args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(*args, **kw)

    monkeypatch.setattr(prepool_ipc.subprocess, "Popen", flaky_popen)
    os.kill(pool.child_pids()[0], signal.SIGKILL)
    deadline = time.monotonic() + patience(15)
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls, "the dead child was never replaced"
    error = outcome(pool, timeout=patience(15))
    assert error is None or isinstance(error, JobFailure), error


def test_a_child_slower_to_start_than_the_decode_timeout_is_not_killed_before_its_first_image(pool_of):
    # The watchdog counts a new child's start (Python, numpy, Pillow: 0.5 s idle, seconds on loaded cores) as a
    # stall "between images" and replaces it, with nothing failed, again and again: the image waits forever.
    error = outcome(pool_of(1, timeout_s=0.1), timeout=patience(10))
    assert error is None, error


def test_the_children_do_not_import_modules_from_the_workers_working_directory(pool_of, tmp_path, monkeypatch):
    # ``python -m`` puts the working directory first on sys.path (the arcface-worker script does not): a numpy.py,
    # PIL/ or worker/ where the worker was started from would replace the children's code.
    (tmp_path / "numpy.py").write_text("raise SystemExit('numpy imported from the working directory')\n")
    monkeypatch.chdir(tmp_path)
    error = outcome(pool_of(1), timeout=patience(10))
    assert error is None, error


def test_a_childs_answers_are_not_unpickled(pool_of, tmp_path, monkeypatch):
    # The children parse untrusted images in C decoders; a child that one of them took over must not be able to run
    # code in the worker through its answers (README, Security: "No pickle" on any code path).
    marker = tmp_path / "ran-in-the-worker"
    evil = f"""
        import sys
        from multiprocessing.connection import Connection

        class Evil:
            def __reduce__(self):
                return (open, ({str(marker)!r}, "w"))

        Connection(int(sys.argv[6]), readable=False).send([Evil()])  # argv: -m module ring index requests answers
        """
    monkeypatch.setattr(sys, "executable", str(fake_python(tmp_path / "python", evil)))
    pool = pool_of(1)
    future = pool.submit([(FACE, None)])[0]
    deadline = time.monotonic() + patience(3)
    while not marker.exists() and not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)  # the image comes out once the pool has given up on such children
    assert not marker.exists(), "a child's answer ran code in the worker"


def test_auto_does_not_stop_the_worker_where_os_lacks_sched_getaffinity_and_memfd_create(monkeypatch):
    # macOS and the BSDs have neither; the worker's other Linux-only paths (inference.files) fall back, this must too.
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "memfd_create", raising=False)
    pool = start_preprocessors(WorkerSettings(preprocess_processes="auto", jpeg_decoder="pillow"), 112, 16)
    if pool is not None:
        pool.close()


def test_children_stop_soon_after_the_worker_is_killed():
    # A SIGKILLed worker (OOM killer, a cold stop) outside a container: its children must not go on decoding the
    # chunk they hold (up to 8 images, each up to ARCFACE_DECODE_TIMEOUT_S) for a worker that is gone.
    proc = run_in_own_session(
        """
        pool.submit([(SLOW, None)] * 8)
        while pool.busy() == 0:
            time.sleep(0.005)
        print("children", *pool.child_pids(), flush=True)
        time.sleep(120)
        """,
        FACE,
    )
    children = [int(pid) for pid in line_from(proc, "children").split()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    try:
        while any(map(running, children)) and time.monotonic() - killed < patience(2.5):
            time.sleep(0.05)
        alive = [pid for pid in children if running(pid)]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert alive == [], f"children still running {time.monotonic() - killed:.1f}s after the worker was killed"
