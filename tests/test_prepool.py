"""Preprocessing in processes (``worker.inference.prepool``): the same model inputs and error codes as the thread path,
in order, and a child that dies or hangs fails only the image it was on."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.contract.codes import ErrorCode, JobFailure
from tests.patience import patience
from worker.inference.prepool import ProcessPreprocessor
from worker.inference.preprocess import preprocess

FACES = sorted((Path(__file__).parent / "data" / "faces").glob("*/*.png"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def slow_png() -> bytes:
    """A 6000 x 6000 PNG: small on the wire, about half a second to decode and resize."""
    return encoded(Image.new("RGB", (6000, 6000), (90, 120, 200)), "PNG")


def same_inputs(futures: list, blobs: list[bytes]) -> None:
    """Each future's input equals the thread path's for its image, in order; slots are freed as they are read."""
    for future, data in zip(futures, blobs, strict=True):
        prepared = future.result(timeout=patience(60))
        np.testing.assert_array_equal(prepared.input, preprocess(data, 112))
        prepared.release()


def wait_busy(pool: ProcessPreprocessor) -> None:
    deadline = time.monotonic() + patience(30)
    while pool.busy() == 0:
        assert time.monotonic() < deadline, "the child never started the image"
        time.sleep(0.005)


def test_inputs_equal_the_thread_path_in_order_across_processes_and_chunks(pool_of, tmp_path):
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 61, 4), np.uint8), "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 80, 3), np.uint8))
    extra = [encoded(rgba, "PNG"), encoded(photo, "JPEG", quality=90, exif=exif.tobytes())]
    blobs = [p.read_bytes() for p in FACES] * 3 + extra
    (tmp_path / "face.png").write_bytes(blobs[0])
    pool = pool_of(2)
    futures = pool.submit([(b64(b), None) for b in blobs] + [(None, "face.png")])
    assert len(futures) == len(blobs) + 1
    for future, data in zip(futures, blobs + [blobs[0]], strict=True):
        prepared = future.result(timeout=patience(60))
        assert prepared.input.dtype == np.float32 and prepared.input.shape == (112, 112, 3)
        np.testing.assert_array_equal(prepared.input, preprocess(data, 112))
        assert prepared.ms > 0
        prepared.release()  # the input is a view of a ring slot (64 here): free it for the images behind


def test_bad_images_fail_alone_with_the_thread_paths_codes(pool_of):
    good = FACES[0].read_bytes()
    refs = [
        ("not base64!", None),
        (b64(good), None),
        (b64(b"not an image at all"), None),
        (None, "../escape.png"),
        (None, "missing.png"),
        (b64(good[: len(good) // 2]), None),
        (b64(good), None),
    ]
    outcomes = [f.exception(timeout=patience(60)) for f in pool_of(2).submit(refs)]
    codes = [o.code if isinstance(o, JobFailure) else None for o in outcomes]
    assert codes == [
        ErrorCode.INVALID_PAYLOAD,
        None,
        ErrorCode.IMAGE_DECODE_ERROR,
        ErrorCode.PATH_NOT_ALLOWED,
        ErrorCode.PATH_NOT_ALLOWED,
        ErrorCode.IMAGE_DECODE_ERROR,
        None,
    ]


def test_a_child_killed_mid_image_fails_that_image_only_and_is_replaced(pool_of, slow_png):
    pool = pool_of(1)
    faces = [p.read_bytes() for p in FACES]
    pool.submit([(b64(faces[0]), None)])[0].result(timeout=patience(60)).release()  # the child is up
    before = pool.child_pids()
    slow = pool.submit([(b64(slow_png), None)])[0]
    rest = pool.submit([(b64(f), None) for f in faces])
    wait_busy(pool)
    os.kill(before[0], signal.SIGKILL)
    failure = slow.exception(timeout=patience(60))
    assert isinstance(failure, JobFailure) and failure.code == ErrorCode.IMAGE_DECODE_ERROR
    assert "process died (exit code -9)" in failure.message
    same_inputs(rest, faces)
    assert pool.replaced == 1 and pool.child_pids() != before


def test_a_child_stuck_past_the_decode_timeout_is_replaced_and_only_its_image_fails(pool_of, slow_png):
    pool = pool_of(2, timeout_s=1.5)
    faces = [p.read_bytes() for p in FACES]
    same_inputs(pool.submit([(b64(x), None) for x in faces[:8]]), faces[:8])
    slow = pool.submit([(b64(slow_png), None)])[0]
    wait_busy(pool)
    stuck = [pid for pid in pool.child_pids() if _on_cpu(pid)] or pool.child_pids()
    for pid in pool.child_pids():
        os.kill(pid, signal.SIGSTOP)  # both: whichever holds the slow image is stuck on it
    rest = pool.submit([(b64(f), None) for f in faces])
    try:
        failure = slow.exception(timeout=patience(60))
    finally:
        for pid in stuck + pool.child_pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert isinstance(failure, JobFailure) and failure.code == ErrorCode.IMAGE_DECODE_ERROR
    assert "took over 1.5s to decode (ARCFACE_DECODE_TIMEOUT_S)" in failure.message
    same_inputs(rest, faces)
    assert pool.replaced >= 1


def _on_cpu(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"


def test_slots_are_reused_only_after_release_and_a_cancelled_image_frees_its_own(pool_of):
    pool = pool_of(1)  # 64 slots
    faces = [p.read_bytes() for p in FACES]
    held = [f.result(timeout=patience(60)) for f in pool.submit([(b64(faces[i % 40]), None) for i in range(64)])]
    blocked = pool.submit([(b64(faces[0]), None), (b64(faces[1]), None)])
    time.sleep(1.0)
    assert not any(f.done() for f in blocked)  # no free slot: nothing overwrites an input still in use
    assert blocked[0].cancel()  # a worker that stopped waiting (decode timeout)
    held[0].release()
    held[0].release()  # twice is harmless
    np.testing.assert_array_equal(held[1].input, preprocess(faces[1], 112))  # untouched by the reuse
    same_inputs(blocked[1:], faces[1:2])  # the cancelled image's slot came back for it
    for h in held[1:]:
        h.release()
    same_inputs(pool.submit([(b64(f), None) for f in faces]), faces)


def test_closing_fails_what_is_still_pending_and_stops_the_children(pool_of, slow_png):
    pool = pool_of(1)
    pids = pool.child_pids()
    futures = pool.submit([(b64(slow_png), None)] * 3)
    pool.close()
    outcomes = [f.exception(timeout=patience(60)) for f in futures]
    assert all(o is None or (isinstance(o, JobFailure) and o.code == ErrorCode.INTERNAL_ERROR) for o in outcomes)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_auto_is_one_process_a_usable_core_for_a_fast_model_capped_by_a_container_quota(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from worker.inference.prepool import FAST_MODEL_IMAGES_PER_S, preprocess_processes, usable_cores

    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two processes may run
    assert usable_cores(quota) == min(cores, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == cores
    assert usable_cores(tmp_path / "absent") == cores
    settings = SimpleNamespace(preprocess_processes="auto", jpeg_decoder="pillow")
    monkeypatch.setattr("worker.inference.prepool.usable_cores", lambda: 1)
    assert preprocess_processes(settings, gpu=True) == 0  # one core: threads
    monkeypatch.setattr("worker.inference.prepool.usable_cores", lambda: 16)
    assert preprocess_processes(settings, gpu=True) == 8  # a GPU serves the model: the CPU only feeds it
    assert preprocess_processes(settings, model_images_per_s=FAST_MODEL_IMAGES_PER_S) == 8  # a fast model on the CPU
    # the model on the CPU at tens of images/s: preprocessing is 1-3 % of the work, threads whatever the cores
    assert preprocess_processes(settings, model_images_per_s=35.0) == 0
    assert preprocess_processes(settings) == 0  # speed unknown (a fixed batch cap), no GPU
    tf_decoder = SimpleNamespace(preprocess_processes="auto", jpeg_decoder="tensorflow")
    assert preprocess_processes(tf_decoder, gpu=True) == 0
    assert preprocess_processes(SimpleNamespace(preprocess_processes=3, jpeg_decoder="tensorflow")) == 3


def test_stalled_says_so_while_images_wait_with_nothing_moving_and_clears_once_they_move(pool_of):
    # The worker's health check reads stalled() (with its heartbeat): images held by a child that neither answers
    # nor gets replaced (the decode timeout is 30 s here) are a stall after stall_s.
    pool = pool_of(1, stall_s=1.0)
    faces = [p.read_bytes() for p in FACES[:3]]
    same_inputs(pool.submit([(b64(faces[0]), None)]), faces[:1])  # the child is up
    assert pool.stalled() is None
    pid = pool.child_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        futures = pool.submit([(b64(f), None) for f in faces])
        deadline = time.monotonic() + patience(10)
        while (why := pool.stalled()) is None:
            assert time.monotonic() < deadline, "stalled() never said so"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert re.fullmatch(r"no preprocessing progress for \d+s with 3 images waiting", why), why
    same_inputs(futures, faces)
    assert pool.stalled() is None


def test_stalled_says_so_when_the_collector_stops_running(pool_of):
    # Whatever wedges the collector thread (a blocking read on one child did), images stop coming: the health
    # check must say so even with nothing submitted.
    pool = pool_of(1, stall_s=1.0)
    same_inputs(pool.submit([(b64(FACES[0].read_bytes()), None)]), [FACES[0].read_bytes()])
    with pool._lock:  # the collector takes it on every pass
        deadline = time.monotonic() + patience(10)
        while (why := pool.stalled()) is None:
            assert time.monotonic() < deadline, "stalled() never said so"
            time.sleep(0.05)
    assert re.fullmatch(r"the preprocessing collector has not run for \d+s", why), why
    deadline = time.monotonic() + patience(10)
    while pool.stalled() is not None:
        assert time.monotonic() < deadline, "stalled() still says so once the collector runs"
        time.sleep(0.05)
