"""Failure modes of the preprocessing processes (``worker.inference.prepool``) found by attacking them: signals meant
for the worker, children that cannot start, a respawn that fails, the worker's working directory, a child's answers and
its memory, the platform, and a worker that is SIGKILLed. Each test fails on the behaviour it describes, never by
waiting forever: every wait is bounded."""

from __future__ import annotations

import base64
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

import worker.inference.prepool_ipc as prepool_ipc
from producer.contract.codes import JobFailure
from tests.conftest import REPO, face_paths
from tests.patience import patience
from worker.inference.prepool import ProcessPreprocessor, start_preprocessors
from worker.inference.preprocess import preprocess
from worker.settings import WorkerSettings

FACE = base64.b64encode(face_paths()[0].read_bytes()).decode("ascii")
FACES = [p.read_bytes() for p in face_paths()]

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


def hostile_first_child(tmp_path: Path, body: str) -> Path:
    """A ``sys.executable`` whose first child runs ``body`` (argv: ``-m module memory index requests answers
    config``) and whose later ones are the real child."""
    flag = tmp_path / "hostile-started"
    first_only = f"""
        import os, sys
        try:
            os.close(os.open({str(flag)!r}, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
        """
    return fake_python(tmp_path / "python", textwrap.dedent(first_only) + textwrap.dedent(body))


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


@pytest.mark.parametrize(
    "header",
    [struct.pack("!i", 2**31 - 1), struct.pack("!i", -1) + struct.pack("!Q", 1 << 40)],
    ids=["2GB", "8-byte-length"],
)
def test_a_child_announcing_a_huge_answer_is_replaced_and_its_images_go_to_the_others(
    pool_of, tmp_path, monkeypatch, header
):
    # A frame header announcing 2 GB (or, after -1, a 1 TB 8-byte length) and nothing after it held the one collector
    # thread in a blocking read for good: every later image timed out, with nothing logged. The frame is refused at
    # its header, the child killed and replaced with a log line, and the images it had come out right elsewhere.
    body = f"""
        import time
        os.read(int(sys.argv[5]), 1)  # a chunk of images has come
        os.write(int(sys.argv[6]), {header!r})
        time.sleep(120)
        """
    monkeypatch.setattr(sys, "executable", str(hostile_first_child(tmp_path, body)))
    pool = pool_of(2)
    with capture_logs() as logs:
        futures = pool.submit([(base64.b64encode(f).decode("ascii"), None) for f in FACES[:16]])
        for future, data in zip(futures, FACES[:16], strict=True):
            try:
                prepared = future.result(timeout=patience(30))
            except FutureTimeout:
                pytest.fail(
                    f"an image was neither prepared nor failed within {patience(30)}s ({pool.replaced} respawns)"
                )
            np.testing.assert_array_equal(prepared.input, preprocess(data, 112))
            prepared.release()
    deadline = time.monotonic() + patience(10)  # the replacement starts beside the work, not before it
    while len(pool.child_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    announced = struct.unpack("!i", header[:4])[0]
    assert [(e["event"], e["reason"]) for e in logs if e["event"] == "preprocess_process_replaced"] == [
        (
            "preprocess_process_replaced",
            f"its preprocessing process broke the protocol (a frame of {announced} bytes announced (at most 65536))",
        )
    ]
    assert pool.replaced == 1 and len(pool.child_pids()) == 2


def test_a_child_cannot_write_into_the_images_of_other_children(pool_of, tmp_path, monkeypatch):
    # Every child mapped the whole shared ring: one that a crafted image took over could overwrite the inputs other
    # children had prepared, and wrong embeddings came back as successes. A child now writes only its own memory
    # and the worker copies each answered input out of it: this child scribbles over all the memory it has while it
    # refuses each image it is given, and every image the other child prepared comes out exactly right.
    body = """
        import json, mmap, threading
        import numpy as np
        from multiprocessing.connection import Connection

        fd = int(sys.argv[3])
        memory = np.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), np.uint8)

        def scribble():
            while True:
                memory[:] = 0x40  # 3.0 in every float32

        threading.Thread(target=scribble, daemon=True).start()
        requests = Connection(int(sys.argv[5]), writable=False)
        answers = Connection(int(sys.argv[6]), readable=False)
        while True:
            chunk = json.loads(requests.recv_bytes())
            refused = [[item[0], 0, ["image_decode_error", "refused by a hostile child"]] for item in chunk]
            answers.send_bytes(json.dumps(refused).encode())
        """
    monkeypatch.setattr(sys, "executable", str(hostile_first_child(tmp_path, body)))
    pool = pool_of(2)
    blobs = FACES * 2
    futures = pool.submit([(base64.b64encode(b).decode("ascii"), None) for b in blobs])
    prepared = refused = 0
    for future, data in zip(futures, blobs, strict=True):
        error = future.exception(timeout=patience(60))
        if error is not None:
            assert isinstance(error, JobFailure) and error.message == "refused by a hostile child", error
            refused += 1
            continue
        time.sleep(0.002)  # give a scribbler the time to reach it
        np.testing.assert_array_equal(future.result().input, preprocess(data, 112))
        future.result().release()
        prepared += 1
    assert prepared > 0 and refused > 0 and prepared + refused == len(blobs)


def test_a_pool_on_threads_goes_back_to_processes_once_a_child_starts_again(pool_of, tmp_path, monkeypatch):
    # Three failed starts in a row (a fork refused under memory pressure, an install being replaced) put the pool on
    # threads for good: 2.4x slower for the rest of the worker's life. It now tries one child again after a back-off
    # and goes back to processes once it is up.
    starts = tmp_path / "starts"
    starts.mkdir()
    body = f"""
        import os, sys
        n = len(os.listdir({str(starts)!r}))
        open(os.path.join({str(starts)!r}, str(os.getpid())), "w").close()
        if n < 3:
            raise SystemExit(3)
        os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
        """
    monkeypatch.setattr(sys, "executable", str(fake_python(tmp_path / "python", body)))
    with capture_logs() as logs:
        pool = pool_of(1, retry_s=0.5)
        assert outcome(pool, timeout=patience(15)) is None  # on the threads meanwhile
        deadline = time.monotonic() + patience(30)
        while pool.broken is not None:
            assert time.monotonic() < deadline, f"still on threads 30s later: {pool.broken}"
            time.sleep(0.02)
    prepared = pool.submit([(FACE, None)])[0].result(timeout=patience(30))
    assert prepared.release is not None  # a child's input (the threads' have no slot to release)
    prepared.release()
    assert len(pool.child_pids()) == 1 and len(os.listdir(starts)) == 4
    assert [e["event"] for e in logs if e["event"].startswith("preprocess_processes")] == [
        "preprocess_processes_unavailable",
        "preprocess_processes_retry",
        "preprocess_processes_restored",
    ]
