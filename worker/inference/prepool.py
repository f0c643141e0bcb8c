"""Preprocessing in processes: the decode, pad and resize of images bound straight for the model, off the worker's
GIL, so that preprocessing scales with cores (threads share one GIL and reach 1.2-1.5x on two cores).

``ARCFACE_PREPROCESS_PROCESSES`` children (:mod:`~worker.inference.prepool_child`: numpy and Pillow, never TensorFlow)
are fed chunks of images over pipes (:mod:`~worker.inference.prepool_ipc`: JSON both ways, one sender thread a child so
that a busy child never blocks the worker, at most ``CHUNK_BYTES`` of image data in flight to each). Each writes the
model input into a slot of one shared ring (an anonymous ``memfd``: nothing in ``/dev/shm`` to leak or to outgrow a
container's small ``/dev/shm``) and answers each chunk in one message; the collector thread resolves the images' futures
with a :class:`~worker.inference.preprocess.PreparedImage` whose ``input`` is a view of the slot (the engine batch is
its only copy) and whose ``release`` frees the slot once the batch is built.

A child that dies (a decoder crash, the kernel's OOM killer) or spends longer than ``decode_timeout_s`` on one
image is killed and replaced: that image fails alone (``image_decode_error``), the rest of its work goes to the
other children. A child that cannot start (a failed fork, a broken install: ``MAX_FAILED_STARTS`` in a row) puts
the pool on threads in the worker, with an error logged: slower, never stuck. Images for the face detector (whole
photos of any size) stay on the worker's threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from producer.contract.codes import ErrorCode, JobFailure
from worker.inference.decode_checks import DecodeLimits
from worker.inference.prepool_child import STARTING, model_input
from worker.inference.prepool_ipc import Answer, Child, Work, parse_answers
from worker.inference.preprocess import PreparedImage

log = structlog.get_logger("arcface.prepool")

CHUNK = 8  # images a message: amortises the pipe round trip, small enough to spread a job over the children
CHUNK_BYTES = 8 << 20  # image data in flight to one child (beyond its first image): bounds the copies on the way
MAX_FAILED_STARTS = 3  # children in a row that die before their first image: then threads


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
        self.start_timeout_s = max(60.0, 2 * timeout_s)  # Python, numpy and Pillow on busy cores
        ring_bytes = slots * size * size * 3 * 4 + 8 * processes
        self._ring_fd = os.memfd_create("arcface-preprocess")
        os.ftruncate(self._ring_fd, ring_bytes)
        self._map = mmap.mmap(self._ring_fd, ring_bytes)
        self._ring = np.ndarray((slots, size, size, 3), np.float32, buffer=self._map)
        self._on = np.ndarray((processes,), np.int64, buffer=self._map, offset=self._ring.nbytes)
        config: dict[str, Any] = {
            "size": size,
            "slots": slots,
            "ring_bytes": ring_bytes,
            "max_children": processes,
            "limits": dataclasses.asdict(limits),
            "shared_root": shared_root,
            "max_inline_bytes": max_inline_bytes,
        }
        self._config = json.dumps(config)
        self._here = {**config, "limits": limits}  # the fallback's config: built once, not per image
        self._lock = threading.RLock()
        self._free: deque[int] = deque(range(slots))
        self._pending: deque[Work] = deque()
        self._closed = False
        self.replaced = 0
        self.broken: str | None = None  # why the pool fell back to threads
        self._fallback: ThreadPoolExecutor | None = None
        self._failed_starts, self._next_start = 0, 0.0
        self._children: list[Child | None] = [None] * processes
        for i in range(processes):
            self._start(i)
        self._collector = threading.Thread(target=self._collect, name="prepool-collect", daemon=True)
        self._collector.start()

    def child_pids(self) -> list[int]:
        """The process ids of the preprocessing processes (they change when one is replaced)."""
        return [c.proc.pid for c in self._children if c is not None]

    def busy(self) -> int:
        """How many of the processes are on an image right now."""
        return int((self._on >= 0).sum())

    def submit(self, refs: list[tuple[str | None, str | None]]) -> list[Future]:
        """Futures of :class:`PreparedImage` for ``(data_b64, path)`` images, in order; a failed image's future
        raises :class:`JobFailure`."""
        works = [Work(Future(), data_b64, path) for data_b64, path in refs]
        with self._lock:
            if self._closed:
                for w in works:
                    _resolve(w.future, JobFailure(ErrorCode.INTERNAL_ERROR, "the worker stopped preprocessing"))
            elif self.broken:
                self._run_here(works)
            else:
                self._pending.extend(works)
                self._dispatch()
        return [w.future for w in works]

    def _dispatch(self) -> None:
        """Hand pending images to the least loaded children, while ring slots are free (holds the lock)."""
        live = [c for c in self._children if c is not None]
        while self._pending and self._free and live and not self._closed:
            child = min(live, key=lambda c: len(c.sent))
            if child.sent and child.in_flight_bytes >= CHUNK_BYTES:
                return  # the least loaded child has enough data in hand already
            n = min(len(self._pending), len(self._free), CHUNK)
            n = max(1, min(n, -(-len(self._pending) // len(live))))
            works: list[Work] = []
            while len(works) < n and (not works or sum(w.nbytes for w in works) < CHUNK_BYTES):
                works.append(self._pending.popleft())
                works[-1].slot = self._free.popleft()
            child.send(works)

    def _start(self, index: int) -> None:
        """Start (or restart) child ``index``; a refused fork counts as a failed start (the collector retries)."""
        self._on[index] = STARTING
        try:
            self._children[index] = Child.spawn(index, self._ring_fd, self._config)
        except OSError as exc:
            self._children[index] = None
            self._start_failed(f"could not start a preprocessing process: {exc}")

    def _start_failed(self, why: str) -> None:
        self._failed_starts += 1
        self._next_start = time.monotonic() + 0.5 * self._failed_starts
        log.warning("preprocess_process_start_failed", reason=why, failed_starts=self._failed_starts)
        if self._failed_starts >= MAX_FAILED_STARTS and not self.broken:
            self._fall_back(f"{why} ({self._failed_starts} starts in a row failed)")

    def _fall_back(self, why: str) -> None:
        """Preprocess in the worker from now on; what the children held and what is pending goes there too."""
        self.broken = why
        log.error("preprocess_processes_unavailable", reason=why, fallback="threads in the worker")
        self._fallback = ThreadPoolExecutor(max(1, len(self._children)), thread_name_prefix="preprocess-fallback")
        works = list(self._pending)
        self._pending.clear()
        for i, child in enumerate(self._children):
            if child is not None:
                child.stop(kill=True)
                works.extend(child.sent)
                self._children[i] = None
        self._free = deque(range(self.slots))
        self._run_here(works)

    def _run_here(self, works: list[Work]) -> None:
        assert self._fallback is not None
        for w in works:
            self._fallback.submit(self._prepare_here, w)

    def _prepare_here(self, work: Work) -> None:
        start = time.perf_counter()
        if work.future.cancelled():
            return
        try:
            image = model_input(work.data_b64, work.path, self.size, self._here)
            _resolve(work.future, PreparedImage(input=image, ms=(time.perf_counter() - start) * 1000.0))
        except JobFailure as failure:
            _resolve(work.future, failure)
        except Exception as exc:
            _resolve(work.future, JobFailure(ErrorCode.INTERNAL_ERROR, f"preprocessing crashed: {exc!r}"))

    def _collect(self) -> None:
        while not self._closed:
            try:
                self._collect_once()
            except Exception:  # never let one surprise stop every image's future
                log.exception("preprocess_collector_error")
                time.sleep(0.1)

    def _collect_once(self) -> None:
        by_pipe: dict[Any, Child] = {c.answers: c for c in self._children if c is not None}
        if not by_pipe:
            time.sleep(0.1)
        for pipe in wait(list(by_pipe), timeout=0.2) if by_pipe else []:
            child = by_pipe[pipe]
            try:
                answers = parse_answers(child.answers.recv_bytes())
            except (EOFError, OSError):
                self._replace(child, "its preprocessing process died (exit code {code})")
                continue
            except ValueError as exc:
                self._replace(child, f"its preprocessing process broke the protocol ({exc})")
                continue
            self._answer(child, answers)
        self._watchdog()
        with self._lock:
            for i, c in enumerate(self._children):
                if c is None and not self.broken and not self._closed and time.monotonic() >= self._next_start:
                    self._start(i)
            self._dispatch()

    def _answer(self, child: Child, answers: list[Answer]) -> None:
        done: list[tuple[Work, float, tuple[ErrorCode, str] | None]] = []
        with self._lock:
            if self._children[child.index] is not child:
                return
            if any(slot != w.slot for (slot, _, _), w in zip(answers, child.sent, strict=False)):
                self._replace(child, "its preprocessing process answered out of order")
                return
            self._failed_starts = 0
            for _, ms, error in answers[: len(child.sent)]:
                work = child.answered()
                done.append((work, ms, error))
                if error:
                    self._free.append(work.slot)
            self._dispatch()
        for work, ms, error in done:
            if error:
                _resolve(work.future, JobFailure(*error))
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
        """Replace a child that made no progress for longer than ``timeout_s`` while it has images: stuck on one
        (that image fails) or between two (stopped, say: nothing fails, its images go to the others); and one
        that has not started within ``start_timeout_s``."""
        now = time.monotonic()
        for child in [c for c in self._children if c is not None]:
            on = int(self._on[child.index])
            if on == STARTING:
                if now - child.started > self.start_timeout_s:
                    self._replace(child, f"it did not start within {self.start_timeout_s:g}s")
            elif on != child.seen[0] or not child.sent:
                child.seen = (on, now)
            elif now - child.seen[1] > self.timeout_s:
                self._replace(child, f"it took over {self.timeout_s:g}s to decode (ARCFACE_DECODE_TIMEOUT_S)")

    def _replace(self, child: Child, why: str) -> None:
        """Kill ``child``, fail the image it was on, give the rest of its images back, start a new child. ``why``
        may name the child's ``{code}`` (its exit code)."""
        with self._lock:
            if self._closed or self._children[child.index] is not child:
                return
            child.stop(kill=True)
            why = why.replace("{code}", str(child.proc.returncode))
            on = int(self._on[child.index])
            culprit = next((w for w in child.sent if w.slot == on), None) if on >= 0 else None
            for w in reversed(child.sent):
                self._free.append(w.slot)
                if w is not culprit:
                    w.slot = -1
                    self._pending.appendleft(w)
            self._children[child.index] = None
            self.replaced += 1
            log.warning("preprocess_process_replaced", reason=why, exit_code=child.proc.returncode)
            if on == STARTING:
                self._start_failed(f"a preprocessing process failed before its first image: {why}")
            if not self.broken and time.monotonic() >= self._next_start:
                self._start(child.index)
            self._dispatch()
        if culprit is not None:
            _resolve(culprit.future, JobFailure(ErrorCode.IMAGE_DECODE_ERROR, f"the image failed: {why}"))

    def close(self) -> None:
        """Stop the children (images still pending fail with ``internal_error``) and free the ring."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            left = list(self._pending) + [w for c in self._children if c is not None for w in c.sent]
            self._pending.clear()
        self._collector.join(timeout=5)
        children = [c for c in self._children if c is not None]
        for child in children:
            child.close_pipe()  # all at once: each exits between two images
        deadline = time.monotonic() + 5.0
        for child in children:
            child.stop(wait_s=max(0.0, deadline - time.monotonic()))
        if self._fallback is not None:
            self._fallback.shutdown(wait=True)
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
    fits = cores >= 2 and settings.jpeg_decoder == "pillow" and hasattr(os, "memfd_create")
    return min(cores, 8) if fits else 0


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on, capped by a container's CPU quota (cgroup v2 ``cpu.max``) where it has one."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
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
    if not hasattr(os, "memfd_create"):
        log.warning("preprocess_processes_unavailable", reason="no memfd_create on this system", fallback="threads")
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
