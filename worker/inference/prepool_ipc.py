"""The worker's end of one preprocessing process (:mod:`worker.inference.prepool_child`): starting it, sending it chunks
of images (JSON over a pipe, from a sender thread of its own, in-flight bytes counted), reading its answers (JSON,
checked field by field: a child runs decoders on untrusted images and is not trusted either), and stopping it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from producer.contract.codes import ErrorCode
from worker.inference.prepool_child import STARTING

Answer = tuple[int, float, tuple[ErrorCode, str] | None]


@dataclasses.dataclass
class Work:
    """One image on its way through a preprocessing process."""

    future: Future
    data_b64: str | None
    path: str | None
    slot: int = -1

    @property
    def nbytes(self) -> int:
        return len(self.data_b64 or "") + len(self.path or "")


class Child:
    """One preprocessing process, its pipes and the images sent to it, oldest (the one it is on) first."""

    def __init__(self, index: int, proc: subprocess.Popen, requests: Connection, answers: Connection) -> None:
        self.index, self.proc, self.requests, self.answers = index, proc, requests, answers
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sent: deque[Work] = deque()
        self.in_flight_bytes = 0
        self.started = time.monotonic()
        self.seen: tuple[int, float] = (STARTING, self.started)  # (progress entry, since when), by the watchdog
        threading.Thread(target=self._send_loop, name="prepool-send", daemon=True).start()

    @classmethod
    def spawn(cls, index: int, ring_fd: int, config: str) -> Child:
        """Start child ``index``; raises ``OSError`` (fork refused: a pids limit, memory) with no descriptor leaked.

        ``PYTHONSAFEPATH``: ``-m`` would put the working directory first on the child's ``sys.path`` (a
        ``numpy.py`` where the worker was started would run in it). The child gets no ``ARCFACE_*`` variables (the
        Redis URL and its password): its config comes in ``config``."""
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
        env["PYTHONSAFEPATH"] = "1"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.inference.prepool_child"]
                + [str(ring_fd), str(index), str(request_r), str(answer_w), config],
                pass_fds=(ring_fd, request_r, answer_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            for fd in (request_r, request_w, answer_r, answer_w):
                os.close(fd)
            raise
        os.close(request_r)
        os.close(answer_w)
        return cls(index, proc, Connection(request_w, readable=False), Connection(answer_r, writable=False))

    def _send_loop(self) -> None:
        try:
            while (chunk := self.outbox.get()) is not None:
                self.requests.send_bytes(json.dumps(chunk).encode())
        except OSError:  # the child died: the collector sees its answers pipe close
            pass
        finally:
            self.requests.close()

    def send(self, works: list[Work]) -> None:
        self.sent.extend(works)
        self.in_flight_bytes += sum(w.nbytes for w in works)
        self.outbox.put([[w.slot, w.data_b64, w.path] for w in works])

    def answered(self) -> Work:
        work = self.sent.popleft()
        self.in_flight_bytes -= work.nbytes
        return work

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
        if not isinstance(ms, (int, float)):
            raise ValueError("ms is not a number")
        if error is None:
            out.append((slot, float(ms), None))
        elif isinstance(error, list) and len(error) == 2 and isinstance(error[1], str):
            out.append((slot, 0.0, (ErrorCode(error[0]), error[1])))
        else:
            raise ValueError(f"not an error: {str(error)[:80]}")
    return out
