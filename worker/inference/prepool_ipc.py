"""The worker's end of one preprocessing process (:mod:`worker.inference.prepool_child`): starting it with memory of its
own, sending it chunks of images (JSON over a pipe, from a sender thread of its own, in-flight bytes counted), reading
its answers without ever blocking on it, and stopping it.

A child runs decoders on untrusted images and is not trusted either, so nothing it sends or writes is taken on
faith:

- answers are length-prefixed frames (a 4-byte big-endian length, then JSON), read from a non-blocking pipe into a
  buffer of at most ``MAX_ANSWER_BYTES`` + 4 bytes: a frame announcing more (or a negative length) is a protocol
  violation at once, and a frame that never completes only holds this child's buffer, never the collector;
- answers are checked field by field (:func:`parse_answers`), never unpickled;
- a child's memory (:class:`Segment`) holds only its own ``CHILD_SLOTS`` image slots and its progress word: it is
  mapped from a ``memfd`` of its own, so a child cannot write into another child's images or the worker's.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from producer.contract.codes import ErrorCode
from worker.inference.prepool_child import STARTING

Answer = tuple[int, float, tuple[ErrorCode, str] | None]

CHILD_SLOTS = 16  # image slots a child's memory holds: the chunk it is on and the next one
MAX_ANSWER_BYTES = 64 << 10  # one answer frame: a chunk's results (the child shortens error messages to fit)
MAX_MESSAGE_CHARS = 1000  # an error message in an answer
_READ_BYTES = 64 << 10  # one read from an answer pipe
_HEADER = struct.Struct("!i")  # multiprocessing.connection's frame header (what the child's send_bytes writes)


class ProtocolError(ValueError):
    """A child sent something that is not an answer frame."""


@dataclasses.dataclass
class Work:
    """One image on its way through a preprocessing process: ``slot`` in the worker's ring (held until the engine
    batch is built), ``child_slot`` in the memory of the child that has it, ``tries``: children it was given to
    that were killed while they had it."""

    future: Future
    data_b64: str | None
    path: str | None
    slot: int = -1
    child_slot: int = -1
    tries: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data_b64 or "") + len(self.path or "")


class Segment:
    """A child's own memory: ``CHILD_SLOTS`` model inputs, then its progress word (-2 starting, -1 between images,
    else the slot it is on). The worker copies an answered image out before it uses it, so what the child writes
    later changes nothing."""

    def __init__(self, size: int, slots: int = CHILD_SLOTS) -> None:
        image_bytes = slots * size * size * 3 * 4
        self.nbytes = image_bytes + 8
        self.fd = os.memfd_create("arcface-preprocess-child")
        try:
            os.ftruncate(self.fd, self.nbytes)
            self._map = mmap.mmap(self.fd, self.nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.images = np.ndarray((slots, size, size, 3), np.float32, buffer=self._map)
        self.progress = np.ndarray((1,), np.int64, buffer=self._map, offset=image_bytes)
        self.progress[0] = STARTING

    def close(self) -> None:
        """Unmap and close (the worker's copies of the images are its own); twice is harmless."""
        if self.fd < 0:
            return
        del self.images, self.progress
        self._map.close()
        os.close(self.fd)
        self.fd = -1


class AnswerReader:
    """Frames from a child's answer pipe, read without blocking: :meth:`read` takes what the pipe holds and returns
    the complete frames; ``EOFError`` when the child closed it (died), :class:`ProtocolError` on a frame over
    ``MAX_ANSWER_BYTES``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._buffer = bytearray()

    def read(self, max_reads: int = 4) -> list[bytes]:
        """The frames completed by up to ``max_reads`` reads of what is in the pipe now (bounded, so that one chatty
        child cannot hold the collector)."""
        for _ in range(max_reads):
            try:
                data = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise EOFError(str(exc)) from exc
            if not data:
                raise EOFError("the answer pipe closed")
            self._buffer += data
            if len(self._buffer) >= _HEADER.size:
                self._check_header()
            if len(data) < _READ_BYTES:
                break
        return self._frames()

    def _check_header(self) -> None:
        (length,) = _HEADER.unpack_from(self._buffer)
        if length < 0 or length > MAX_ANSWER_BYTES:
            raise ProtocolError(f"a frame of {length} bytes announced (at most {MAX_ANSWER_BYTES})")

    def _frames(self) -> list[bytes]:
        frames: list[bytes] = []
        while len(self._buffer) >= _HEADER.size:
            self._check_header()
            (length,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_HEADER.size : end]))
            del self._buffer[:end]
        return frames

    @property
    def partial(self) -> bool:
        """Whether part of a frame is waiting for the rest."""
        return bool(self._buffer)

    def close(self) -> None:
        os.close(self.fd)


class Child:
    """One preprocessing process, its pipes, its memory and the images sent to it, oldest (the one it is on) first,
    in chunks of ``chunks`` images (it answers each chunk in one frame)."""

    def __init__(
        self, index: int, proc: subprocess.Popen, requests: Connection, answers: AnswerReader, segment: Segment
    ) -> None:
        self.index, self.proc, self.requests, self.answers, self.segment = index, proc, requests, answers, segment
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sent: deque[Work] = deque()
        self.chunks: deque[int] = deque()
        self.free: deque[int] = deque(range(segment.images.shape[0]))
        self.in_flight_bytes = 0
        self.started = time.monotonic()
        self.up = False  # seen past its start (its progress word left STARTING, or it answered): latched
        self.seen: tuple[int, float] = (STARTING, self.started)  # (progress word, since when), by the watchdog
        self.head_since = self.started  # since when the oldest chunk has been the one it should be on
        threading.Thread(target=self._send_loop, name="prepool-send", daemon=True).start()

    @classmethod
    def spawn(cls, index: int, size: int, config: str) -> Child:
        """Start child ``index`` with memory of its own for ``size`` x ``size`` inputs; raises ``OSError`` (fork
        refused: a pids limit, memory) with no descriptor leaked.

        ``PYTHONSAFEPATH``: ``-m`` would put the working directory first on the child's ``sys.path`` (a
        ``numpy.py`` where the worker was started would run in it). The child gets no ``ARCFACE_*`` variables (the
        Redis URL and its password): its config comes in ``config``."""
        segment = Segment(size)
        fds: list[int] = []
        try:
            request_r, request_w = os.pipe()
            fds += [request_r, request_w]
            answer_r, answer_w = os.pipe()
            fds += [answer_r, answer_w]
            env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
            env["PYTHONSAFEPATH"] = "1"
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.inference.prepool_child"]
                + [str(segment.fd), str(index), str(request_r), str(answer_w), config],
                pass_fds=(segment.fd, request_r, answer_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            segment.close()
            raise
        os.close(request_r)
        os.close(answer_w)
        return cls(index, proc, Connection(request_w, readable=False), AnswerReader(answer_r), segment)

    def _send_loop(self) -> None:
        try:
            while (chunk := self.outbox.get()) is not None:
                self.requests.send_bytes(json.dumps(chunk).encode())
        except OSError:  # the child died: the collector sees its answers pipe close
            pass
        finally:
            self.requests.close()

    def send(self, works: list[Work]) -> None:
        """Hand ``works`` (their ``child_slot`` taken from :attr:`free`) to the child as one chunk."""
        if not self.sent:
            self.head_since = time.monotonic()
        self.sent.extend(works)
        self.chunks.append(len(works))
        self.in_flight_bytes += sum(w.nbytes for w in works)
        self.outbox.put([[w.child_slot, w.data_b64, w.path] for w in works])

    def answered(self) -> list[Work]:
        """The oldest chunk, answered: its images leave the child's hands (their child slots are free again)."""
        works = [self.sent.popleft() for _ in range(self.chunks.popleft())]
        for work in works:
            self.in_flight_bytes -= work.nbytes
            self.free.append(work.child_slot)
        self.head_since = time.monotonic()
        return works

    def progress(self) -> int:
        """The child's progress word (it may lie: only its own images depend on it)."""
        return int(self.segment.progress[0])

    def close_pipe(self) -> None:
        """Ask the child to stop (it exits between two images)."""
        self.outbox.put(None)

    def stop(self, kill: bool = False, wait_s: float = 5.0) -> None:
        """Stop the child (``kill``: at once), waiting at most ``wait_s`` for it to go: a child stuck in the kernel
        (a hung network file system) is left for the kernel to reap, never waited on forever."""
        self.close_pipe()
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=1.0 if kill else wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.answers.close()
        self.segment.close()


def parse_answers(data: bytes) -> list[Answer]:
    """A child's answer to a chunk: ``[[slot, ms, null | [code, message]], ...]``; ``ValueError`` on anything else."""
    out: list[Answer] = []
    items = json.loads(data)
    if not isinstance(items, list):
        raise ValueError("not a list")
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int):
            raise ValueError(f"not an answer: {str(item)[:80]}")
        slot, ms, error = item
        if type(ms) not in (int, float) or not 0 <= ms < 1e9:  # also refuses NaN and a 400-digit int
            raise ValueError(f"ms is not a duration: {str(ms)[:80]}")
        if error is None:
            out.append((slot, float(ms), None))
        elif isinstance(error, list) and len(error) == 2 and isinstance(error[1], str):
            out.append((slot, 0.0, (ErrorCode(error[0]), error[1][:MAX_MESSAGE_CHARS])))
        else:
            raise ValueError(f"not an error: {str(error)[:80]}")
    return out
