"""Preprocessing in processes: the decode, pad and resize of images bound straight for the model, off the worker's
GIL, so that preprocessing scales with cores (threads share one GIL and reach 1.2-1.5x on two cores).

``ARCFACE_PREPROCESS_PROCESSES`` children (:mod:`worker.prepool_child`: numpy and Pillow, never TensorFlow) are fed
chunks of images over pipes, one sender thread a child so that a busy child never blocks the worker. Each writes
the model input into a slot of one shared ring (an anonymous ``memfd``: nothing in ``/dev/shm`` to leak or to
outgrow a container's small ``/dev/shm``) and answers each chunk in one message; the collector thread resolves the
images' futures with a :class:`~worker.runtime.PreparedImage` whose ``input`` is a view of the slot (the engine
batch is its only copy) and whose ``release`` frees the slot once the batch is built.

A child that dies (a decoder crash, the kernel's OOM killer) or spends longer than ``decode_timeout_s`` on one
image is killed and replaced: that image fails alone (``image_decode_error``), the rest of its work goes to the
other children. Images for the face detector (whole photos of any size) stay on the worker's threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from producer.codes import ErrorCode, JobFailure
from worker.decode_checks import DecodeLimits
from worker.runtime import PreparedImage

log = structlog.get_logger("arcface.prepool")

CHUNK = 8  # images a message: amortises the pipe round trip, small enough to spread a job over the children


@dataclasses.dataclass
class _Work:
    future: Future
    data_b64: str | None
    path: str | None
    slot: int = -1


class _Child:
    """One preprocessing process, its pipes and the images sent to it, oldest (the one it is on) first."""

    def __init__(self, index: int, ring_fd: int, config: str) -> None:
        self.index = index
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.prepool_child"]
            + [str(ring_fd), str(index), str(request_r), str(answer_w), config],
            pass_fds=(ring_fd, request_r, answer_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(request_r)
        os.close(answer_w)
        self.requests = Connection(request_w, readable=False)
        self.answers = Connection(answer_r, writable=False)
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sent: deque[_Work] = deque()
        self.seen: tuple[int, float] = (-1, time.monotonic())  # (slot in hand, since when), by the watchdog
        threading.Thread(target=self._send_loop, name="prepool-send", daemon=True).start()

    def _send_loop(self) -> None:
        try:
            while (chunk := self.outbox.get()) is not None:
                self.requests.send(chunk)
        except OSError:  # the child died: the collector sees its answers pipe close
            pass
        finally:
            self.requests.close()

    def send(self, works: list[_Work]) -> None:
        self.sent.extend(works)
        self.outbox.put([(w.slot, w.data_b64, w.path) for w in works])

    def stop(self, kill: bool = False) -> None:
        self.outbox.put(None)
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.answers.close()


class ProcessPreprocessor:
    """A pool of preprocessing processes for ``size`` x ``size`` model inputs; :meth:`submit` returns futures."""

    def __init__(
        self,
        processes: int,
        size: int,
        limits: DecodeLimits,
        shared_root: str | None,
        max_inline_bytes: int,
        timeout_s: float,
        slots: int = 128,
    ) -> None:
        self.size, self.slots, self.timeout_s = size, slots, timeout_s
        ring_bytes = slots * size * size * 3 * 4 + 8 * processes
        self._ring_fd = os.memfd_create("arcface-preprocess")
        os.ftruncate(self._ring_fd, ring_bytes)
        self._map = mmap.mmap(self._ring_fd, ring_bytes)
        self._ring = np.ndarray((slots, size, size, 3), np.float32, buffer=self._map)
        self._on = np.ndarray((processes,), np.int64, buffer=self._map, offset=self._ring.nbytes)
        self._on[:] = -1
        self._config = json.dumps(
            {
                "size": size,
                "slots": slots,
                "ring_bytes": ring_bytes,
                "max_children": processes,
                "limits": dataclasses.asdict(limits),
                "shared_root": shared_root,
                "max_inline_bytes": max_inline_bytes,
            }
        )
        self._lock = threading.Lock()
        self._free: deque[int] = deque(range(slots))
        self._pending: deque[_Work] = deque()
        self._closed = False
        self.replaced = 0
        self._children = [_Child(i, self._ring_fd, self._config) for i in range(processes)]
        self._collector = threading.Thread(target=self._collect, name="prepool-collect", daemon=True)
        self._collector.start()

    def child_pids(self) -> list[int]:
        """The process ids of the preprocessing processes (they change when one is replaced)."""
        return [c.proc.pid for c in self._children]

    def busy(self) -> int:
        """How many of the processes are on an image right now."""
        return int((self._on >= 0).sum())

    def submit(self, refs: list[tuple[str | None, str | None]]) -> list[Future]:
        """Futures of :class:`PreparedImage` for ``(data_b64, path)`` images, in order; a failed image's future
        raises :class:`JobFailure`."""
        works = [_Work(Future(), data_b64, path) for data_b64, path in refs]
        with self._lock:
            self._pending.extend(works)
            self._dispatch()
        return [w.future for w in works]

    def _dispatch(self) -> None:
        """Hand pending images to the least loaded children, while ring slots are free (holds the lock)."""
        while self._pending and self._free and not self._closed:
            child = min(self._children, key=lambda c: len(c.sent))
            n = min(len(self._pending), len(self._free), CHUNK)
            n = max(1, min(n, -(-len(self._pending) // len(self._children))))
            works = [self._pending.popleft() for _ in range(n)]
            for w in works:
                w.slot = self._free.popleft()
            child.send(works)

    def _collect(self) -> None:
        while not self._closed:
            by_pipe: dict[Any, _Child] = {c.answers: c for c in self._children}
            for pipe in wait(list(by_pipe), timeout=0.2):
                child = by_pipe[pipe]
                try:
                    answers = child.answers.recv()
                except (EOFError, OSError):
                    self._replace(child, "its preprocessing process died (exit code {code})")
                    continue
                self._answer(child, answers)
            self._watchdog()

    def _answer(self, child: _Child, answers: list[tuple[int, float, tuple[str, str] | None]]) -> None:
        done: list[tuple[_Work, float, tuple[str, str] | None]] = []
        with self._lock:
            for slot, ms, error in answers:
                work = child.sent.popleft()
                assert work.slot == slot, (work.slot, slot)
                done.append((work, ms, error))
                if error:
                    self._free.append(slot)
            self._dispatch()
        for work, ms, error in done:
            if error:
                _resolve(work.future, JobFailure(ErrorCode(error[0]), error[1]))
            elif not _resolve(work.future, self._prepared(work.slot, ms)):
                self._release(work.slot)  # nobody waits for it any more (the worker gave up: decode timeout)

    def _prepared(self, slot: int, ms: float) -> PreparedImage:
        """The image in ``slot`` as a view (no copy: the engine batch is its one copy); ``release`` frees the slot."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(slot)

        return PreparedImage(input=self._ring[slot], ms=ms, release=release)

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._dispatch()

    def _watchdog(self) -> None:
        """Replace a child that has made no progress for longer than ``timeout_s`` while it has images: stuck on
        one (that image fails) or between two (stopped, say: nothing fails, its images go to the others)."""
        now = time.monotonic()
        for child in list(self._children):
            on = int(self._on[child.index])
            if on != child.seen[0] or not child.sent:
                child.seen = (on, now)
            elif now - child.seen[1] > self.timeout_s:
                self._replace(child, f"it took over {self.timeout_s:g}s to decode (ARCFACE_DECODE_TIMEOUT_S)")

    def _replace(self, child: _Child, why: str) -> None:
        """Kill ``child``, fail the image it was on, give the rest of its images back, start a new child. ``why``
        may name the child's ``{code}`` (its exit code)."""
        child.stop(kill=True)
        why = why.replace("{code}", str(child.proc.returncode))
        with self._lock:
            if self._closed:
                return
            on = int(self._on[child.index])
            self._on[child.index] = -1
            culprit = next((w for w in child.sent if w.slot == on), None)
            for w in reversed(child.sent):
                self._free.append(w.slot)
                if w is not culprit:
                    w.slot = -1
                    self._pending.appendleft(w)
            new = _Child(child.index, self._ring_fd, self._config)
            self._children[self._children.index(child)] = new
            self.replaced += 1
            self._dispatch()
        log.warning("preprocess_process_replaced", reason=why, exit_code=child.proc.returncode)
        if culprit is not None:
            _resolve(culprit.future, JobFailure(ErrorCode.IMAGE_DECODE_ERROR, f"the image failed: {why}"))

    def close(self) -> None:
        """Stop the children (images still pending fail with ``internal_error``) and free the ring."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = list(self._pending) + [w for c in self._children for w in c.sent]
            self._pending.clear()
        self._collector.join(timeout=5)
        for child in self._children:
            child.stop()
        for w in left:
            _resolve(w.future, JobFailure(ErrorCode.INTERNAL_ERROR, "the worker stopped preprocessing"))
        del self._ring, self._on  # views of the map: it cannot close while they exist
        try:
            self._map.close()
        except BufferError:  # a prepared image still holds a view: the map goes with the last of them
            pass
        os.close(self._ring_fd)


def _resolve(future: Future, outcome: PreparedImage | JobFailure) -> bool:
    """Set a future's outcome unless it is already settled (cancelled by a worker that stopped waiting)."""
    try:
        if isinstance(outcome, JobFailure):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        return False
    return True


def preprocess_processes(settings: Any) -> int:
    """How many preprocessing processes ``ARCFACE_PREPROCESS_PROCESSES`` asks for: ``auto`` is one a usable core
    (at most 8) where there are two or more and JPEGs decode with Pillow (the tensorflow decoder would load
    TensorFlow into every child); 0 keeps preprocessing on threads."""
    value = settings.preprocess_processes
    if value != "auto":
        return int(value)
    cores = usable_cores()
    return min(cores, 8) if cores >= 2 and settings.jpeg_decoder == "pillow" else 0


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on, capped by a container's CPU quota (cgroup v2 ``cpu.max``) where it has one."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def start_preprocessors(settings: Any, size: int, max_batch_size: int) -> ProcessPreprocessor | None:
    """The worker's preprocessing processes, or None when it preprocesses on threads."""
    n = preprocess_processes(settings)
    if n == 0:
        return None
    pool = ProcessPreprocessor(
        n,
        size,
        DecodeLimits.from_settings(settings),
        str(settings.shared_root) if settings.shared_root else None,
        settings.max_inline_bytes,
        settings.decode_timeout_s,
        slots=max(64, 4 * max_batch_size),
    )
    log.info("preprocess_processes", processes=n, ring_slots=pool.slots)
    return pool
