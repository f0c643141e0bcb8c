"""Preprocessing in processes: the decode, pad and resize of images bound straight for the model, off the worker's
GIL, so that preprocessing scales with cores (threads share one GIL and reach 1.2-1.5x on two cores).

``ARCFACE_PREPROCESS_PROCESSES`` children (:mod:`~worker.inference.prepool_child`: numpy and Pillow, never TensorFlow)
are fed chunks of images over pipes (:mod:`~worker.inference.prepool_ipc`: JSON both ways, one sender thread a child so
that a busy child never blocks the worker, at most ``CHUNK_BYTES`` of image data in flight to each). The collector
thread resolves the images' futures with a :class:`~worker.inference.preprocess.PreparedImage` whose ``input`` is a
view of a slot of the worker's ring and whose ``release`` frees the slot once the engine batch is built.

A child decodes untrusted images and is untrusted itself: one that a crafted image took over must not be able to
stop the pool, change other images or run code in the worker.

- Memory: each child has a memfd of its own (``CHILD_SLOTS`` inputs and a progress word) and no other shared
  memory: it can write only images it was given. When a chunk is answered the collector checks that the answer
  names exactly the child slots of the chunk it gave that child, oldest first, and copies each input into the
  worker's ring (a slot reserved when the image was sent; the child never sees that memory), so that what the child
  writes afterwards changes nothing. A lying child can spoil only the images it was given.
- Answers: length-prefixed frames of at most ``MAX_ANSWER_BYTES``, read without blocking from every child at once
  into a bounded buffer of each: an oversized or garbled frame, or an answer to images it was not given, is a
  protocol violation; a frame that never completes holds nothing but that child's images.
- Deadlines: a child on one image (its progress word) for over ``decode_timeout_s`` is killed and replaced and that
  image fails alone (``image_decode_error``); since the progress word is the child's say-so, any chunk must also be
  answered within ``decode_timeout_s`` an image (plus one) of becoming the child's oldest, whatever the word says.
- A child that dies, breaks the protocol or misses a deadline is killed and replaced, with a log line; the image it
  was on fails, the rest of its images go to the other children, alone in their chunks, and an image that
  ``MAX_TRIES`` killed children had fails (``image_decode_error``) instead of taking a fourth one down.
- Health: :meth:`ProcessPreprocessor.stalled` says why the pool is stuck when its collector stopped running or no
  image it holds moved for ``stall_s``; the worker publishes it with its heartbeat and ``arcface-worker-health`` fails.

A child that cannot start (a failed fork, a broken install: ``MAX_FAILED_STARTS`` in a row) puts the pool on
threads in the worker, with an error logged: slower, never stuck. After ``RETRY_S`` (doubling up to ``RETRY_MAX_S``
while starts keep failing) it tries one child again and goes back to processes once that one is up. Images for the
face detector (whole photos of any size) stay on the worker's threads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
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
from worker.inference.prepool_ipc import CHILD_SLOTS, Answer, Child, ProtocolError, Work, parse_answers
from worker.inference.preprocess import PreparedImage

log = structlog.get_logger("arcface.prepool")

CHUNK = 8  # images a message: amortises the pipe round trip, small enough to spread a job over the children
CHUNK_BYTES = 8 << 20  # image data in flight to one child (beyond its first image): bounds the copies on the way
MAX_FAILED_STARTS = 3  # children in a row that die before their first image: then threads
MAX_TRIES = 3  # killed children an image may have been with: then it fails
RETRY_S = 30.0  # threads for this long before processes are tried again; doubles while starts keep failing
RETRY_MAX_S = 600.0


class ProcessPreprocessor:
    """A pool of preprocessing processes for ``size`` x ``size`` model inputs; :meth:`submit` returns futures.

    ``slots``: the worker's ring (inputs sent or prepared and not yet released); ``retry_s``: how long the pool stays
    on threads after its children failed to start; ``stall_s``: how long images may wait with nothing moving before
    :meth:`stalled` reports it (default: the start timeout plus two decode timeouts)."""

    def __init__(
        self,
        processes: int,
        size: int,
        limits: DecodeLimits,
        shared_root: str | None,
        max_inline_bytes: int,
        timeout_s: float,
        slots: int = 128,
        retry_s: float = RETRY_S,
        stall_s: float | None = None,
    ) -> None:
        self.size, self.slots, self.timeout_s = size, slots, timeout_s
        self.start_timeout_s = max(60.0, 2 * timeout_s)  # Python, numpy and Pillow on busy cores
        self.stall_s = stall_s if stall_s is not None else self.start_timeout_s + 2 * timeout_s
        self.retry_s = retry_s
        self._ring = np.empty((slots, size, size, 3), np.float32)  # the worker's own: no child maps it
        config: dict[str, Any] = {
            "size": size,
            "child_slots": CHILD_SLOTS,
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
        self.broken: str | None = None  # why the pool is on threads now
        self._fallback: ThreadPoolExecutor | None = None
        self._failed_starts, self._next_start = 0, 0.0
        self._retry_wait, self._retry_at = retry_s, math.inf
        self._beat = self._progress_at = time.monotonic()
        self._children: list[Child | None] = [None] * processes
        with self._lock:
            for i in range(processes):
                self._start(i)
        self._collector = threading.Thread(target=self._collect, name="prepool-collect", daemon=True)
        self._collector.start()

    def child_pids(self) -> list[int]:
        """The process ids of the preprocessing processes (they change when one is replaced)."""
        return [c.proc.pid for c in self._children if c is not None]

    def busy(self) -> int:
        """How many of the processes say they are on an image right now."""
        return sum(1 for c in self._children if c is not None and c.progress() >= 0)

    def stalled(self) -> str | None:
        """Why preprocessing is stuck, or None: the collector has not run for ``stall_s``, or images have waited
        in the pool that long with none answered, failed, started or released. Takes no lock (the heartbeat thread
        calls it: it must answer even when the pool is wedged)."""
        if self._closed:
            return None
        now = time.monotonic()
        if now - self._beat > self.stall_s:
            return f"the preprocessing collector has not run for {now - self._beat:.0f}s"
        held = sum(len(c.sent) for c in list(self._children) if c is not None)
        waiting = held + (len(self._pending) if self._free else 0)  # no free slot: the engine holds them, not us
        if waiting and now - self._progress_at > self.stall_s:
            return f"no preprocessing progress for {now - self._progress_at:.0f}s with {waiting} images waiting"
        return None

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
                if not self._pending and not any(c.sent for c in self._children if c is not None):
                    self._moved()  # the wait starts now, not at the last answer
                self._pending.extend(works)
                self._dispatch()
        return [w.future for w in works]

    def _moved(self) -> None:
        self._progress_at = time.monotonic()

    def _dispatch(self) -> None:
        """Hand pending images to the least loaded children, while ring slots are free (holds the lock). An image
        that was with a killed child goes alone: it cannot take a chunk of others down with it twice."""
        live = [c for c in self._children if c is not None]
        while self._pending and self._free and not self._closed:
            ready = [c for c in live if c.free]
            if not ready:
                return
            child = min(ready, key=lambda c: len(c.sent))
            if child.sent and child.in_flight_bytes >= CHUNK_BYTES:
                return  # the least loaded child has enough data in hand already
            if self._pending[0].tries:
                n = 1
            else:
                n = min(len(self._pending), len(self._free), len(child.free), CHUNK)
                n = max(1, min(n, -(-len(self._pending) // len(live))))
            works: list[Work] = []
            while len(works) < n and (
                not works or (sum(w.nbytes for w in works) < CHUNK_BYTES and not self._pending[0].tries)
            ):
                work = self._pending.popleft()
                work.slot, work.child_slot = self._free.popleft(), child.free.popleft()
                works.append(work)
            child.send(works)

    def _start(self, index: int) -> None:
        """Start (or restart) child ``index``; a refused fork counts as a failed start (the collector retries)."""
        try:
            self._children[index] = Child.spawn(index, self.size, self._config)
        except OSError as exc:
            self._children[index] = None
            self._start_failed(f"could not start a preprocessing process: {exc}")

    def _start_failed(self, why: str) -> None:
        self._failed_starts += 1
        self._next_start = time.monotonic() + 0.5 * self._failed_starts
        log.warning("preprocess_process_start_failed", reason=why, failed_starts=self._failed_starts)
        if self.broken:
            self._retry_wait = min(2 * self._retry_wait, RETRY_MAX_S)
            self._retry_at = time.monotonic() + self._retry_wait
            log.warning("preprocess_processes_still_unavailable", reason=why, retry_in_s=self._retry_wait)
        elif self._failed_starts >= MAX_FAILED_STARTS:
            self._fall_back(f"{why} ({self._failed_starts} starts in a row failed)")

    def _fall_back(self, why: str) -> None:
        """Preprocess in the worker until a child starts again; what the children held and what is pending goes
        there too."""
        self.broken = why
        self._retry_at = time.monotonic() + self._retry_wait
        log.error("preprocess_processes_unavailable", reason=why, fallback="threads", retry_in_s=self._retry_wait)
        if self._fallback is None:
            self._fallback = ThreadPoolExecutor(max(1, len(self._children)), thread_name_prefix="preprocess-fallback")
        works = list(self._pending)
        self._pending.clear()
        for i, child in enumerate(self._children):
            if child is not None:
                child.stop(kill=True)
                works.extend(child.sent)
                self._children[i] = None
        for w in works:
            if w.slot >= 0:
                self._free.append(w.slot)  # slots of prepared images stay held until their release
                w.slot = -1
        self._moved()
        self._run_here(works)

    def _came_up(self, child: Child) -> None:
        """``child`` is past its start: its deadlines start now; a pool on threads goes back to processes."""
        child.up = True
        child.head_since = max(child.head_since, time.monotonic())
        self._moved()
        if self.broken:
            log.info("preprocess_processes_restored", after=self.broken)
            self.broken = None
            self._failed_starts = 0
            self._retry_wait, self._retry_at = self.retry_s, math.inf

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
        """One pass: read what every child has sent (never blocking on one), enforce the deadlines, start
        children, dispatch."""
        by_fd: dict[int, Child] = {c.answers.fd: c for c in self._children if c is not None}
        if not by_fd:
            time.sleep(0.1)
        for fd in wait(list(by_fd), timeout=0.2) if by_fd else []:
            assert isinstance(fd, int)
            child = by_fd[fd]
            if self._children[child.index] is not child:
                continue  # replaced earlier in this pass
            try:
                frames = child.answers.read()
            except EOFError:
                self._replace(child, "its preprocessing process died (exit code {code})")
                continue
            except ProtocolError as exc:
                self._replace(child, f"its preprocessing process broke the protocol ({exc})")
                continue
            for frame in frames:
                try:
                    answers = parse_answers(frame)
                except ValueError as exc:
                    self._replace(child, f"its preprocessing process broke the protocol ({exc})")
                    break
                if not self._answer(child, answers):
                    break
        with self._lock:
            self._watchdog()
            now = time.monotonic()
            if self.broken and now >= self._retry_at and not self._closed and self._children[0] is None:
                self._retry_at = math.inf  # one child on trial; its start or its failure decides
                log.info("preprocess_processes_retry", after=self.broken)
                self._start(0)
            for i, c in enumerate(self._children):
                if c is None and not self.broken and not self._closed and now >= self._next_start:
                    self._start(i)
            self._dispatch()
        self._beat = time.monotonic()

    def _answer(self, child: Child, answers: list[Answer]) -> bool:
        """Take ``child``'s answer to its oldest chunk: copy the inputs into the worker's ring, resolve the futures.
        Returns False when the answer was refused (the child is replaced)."""
        done: list[tuple[Work, PreparedImage | JobFailure]] = []
        with self._lock:
            if self._children[child.index] is not child:
                return False
            head = list(itertools.islice(child.sent, child.chunks[0])) if child.chunks else []
            if not head or [slot for slot, _, _ in answers] != [w.child_slot for w in head]:
                self._replace(child, "its preprocessing process answered images it was not given")
                return False
            if not child.up:
                self._came_up(child)
            self._failed_starts = 0
            for work, (_, ms, error) in zip(child.answered(), answers, strict=True):
                if error:
                    self._free.append(work.slot)
                    done.append((work, JobFailure(*error)))
                else:
                    self._ring[work.slot] = child.segment.images[work.child_slot]
                    done.append((work, self._prepared(work.slot, ms)))
            self._moved()
            self._dispatch()
        for work, outcome in done:
            if not _resolve(work.future, outcome) and isinstance(outcome, PreparedImage):
                self._release(work.slot)  # nobody waits for it any more (the worker gave up: decode timeout)
        return True

    def _prepared(self, slot: int, ms: float) -> PreparedImage:
        """The image in ``slot`` as a view (no copy: the engine batch is its next copy); ``release`` frees the
        slot."""
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
            self._moved()
            self._dispatch()

    def _watchdog(self) -> None:
        """Replace (holds the lock) a child that did not start within ``start_timeout_s``; one whose progress word
        stayed on one image (that image fails) or between two (stopped, say: nothing fails, its images go to the
        others) for longer than ``timeout_s`` while it has images; and one that has not answered its oldest chunk
        within ``timeout_s`` an image, plus one, whatever its progress word says."""
        now = time.monotonic()
        for child in [c for c in self._children if c is not None]:
            if self._children[child.index] is not child:
                continue  # the pool fell back to threads while this pass replaced another
            on = child.progress()
            if not child.up:
                if on == STARTING:
                    if now - child.started > self.start_timeout_s:
                        self._replace(child, f"it did not start within {self.start_timeout_s:g}s")
                    continue
                self._came_up(child)
            if on != child.seen[0] or not child.sent:
                if child.sent:
                    self._moved()
                child.seen = (on, now)
            elif now - child.seen[1] > self.timeout_s:
                self._replace(child, f"it took over {self.timeout_s:g}s to decode (ARCFACE_DECODE_TIMEOUT_S)")
                continue
            if child.chunks and now - child.head_since > (child.chunks[0] + 1) * self.timeout_s:
                self._replace(child, f"it answered nothing for {now - child.head_since:.0f}s")

    def _replace(self, child: Child, why: str) -> None:
        """Kill ``child``, fail the image it was on and those that ``MAX_TRIES`` killed children had, give the rest
        of its images back, start a new child. ``why`` may name the child's ``{code}`` (its exit code)."""
        failed: list[tuple[Work, str]] = []
        with self._lock:
            if self._closed or self._children[child.index] is not child:
                return
            on = child.progress()
            child.stop(kill=True)
            why = why.replace("{code}", str(child.proc.returncode))
            culprit = next((w for w in child.sent if w.child_slot == on), None) if child.up and on >= 0 else None
            retried = 0
            for w in reversed(child.sent):
                self._free.append(w.slot)
                w.slot = w.child_slot = -1
                w.tries += child.up  # a child that never started never tried it
                if w is culprit:
                    failed.append((w, f"the image failed: {why}"))
                elif w.tries >= MAX_TRIES:
                    failed.append((w, f"the image failed: {w.tries} preprocessing processes that had it were killed"))
                else:
                    self._pending.appendleft(w)
                    retried += 1
            self._children[child.index] = None
            self.replaced += 1
            log.warning(
                "preprocess_process_replaced",
                reason=why,
                exit_code=child.proc.returncode,
                images_failed=len(failed),
                images_retried=retried,
            )
            if failed:
                self._moved()
            if not child.up:
                self._start_failed(f"a preprocessing process failed before its first image: {why}")
            if not self.broken and time.monotonic() >= self._next_start:
                self._start(child.index)
            self._dispatch()
        for work, message in failed:
            _resolve(work.future, JobFailure(ErrorCode.IMAGE_DECODE_ERROR, message))

    def close(self) -> None:
        """Stop the children (images still pending fail with ``internal_error``)."""
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


FAST_MODEL_IMAGES_PER_S = 150.0


def preprocess_processes(settings: Any, gpu: bool = False, model_images_per_s: float | None = None) -> int:
    """How many preprocessing processes ``ARCFACE_PREPROCESS_PROCESSES`` asks for; 0 keeps preprocessing on threads.

    ``auto`` is one a usable core (at most 8) where the model is fast enough for preprocessing to matter (a GPU
    serves it, or it measured at least :data:`FAST_MODEL_IMAGES_PER_S`), there are two or more cores and JPEGs
    decode with Pillow (the tensorflow decoder would load TensorFlow into every child). A model on the CPU at tens
    of images/s spends 1-3 % of an image's CPU time preprocessing: there threads do as well (docs/benchmarks.md:
    end to end 0.94x of the raw engine on threads against 0.82x in processes; 64-image jobs 0.78x in processes on
    an AVX-512 machine) without extra processes competing with TensorFlow for the cores.
    """
    value = settings.preprocess_processes
    if value != "auto":
        return int(value)
    fast = gpu or (model_images_per_s is not None and model_images_per_s >= FAST_MODEL_IMAGES_PER_S)
    cores = usable_cores()
    fits = fast and cores >= 2 and settings.jpeg_decoder == "pillow" and hasattr(os, "memfd_create")
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
        stall_s=getattr(settings, "preprocess_stall_s", None),
    )
    log.info("preprocess_processes", processes=n, ring_slots=pool.slots)
    return pool
