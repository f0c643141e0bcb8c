"""One preprocessing process of :mod:`worker.inference.prepool` (``python -m worker.inference.prepool_child``; never by
hand).

It loads numpy, Pillow and the worker's decode/preprocess modules: never TensorFlow, rq or Redis. A reader thread
keeps the request pipe drained (so the worker's sends never wait on a busy child); the main thread takes each
chunk ``[[slot, data_b64, path], ...]`` in order, writes the model input into ``slot`` of its own memory (a memfd the
worker made for this child alone: ``child_slots`` inputs, then the progress word) and answers the chunk with one
length-prefixed JSON frame, a list of ``[slot, ms, null]`` or ``[slot, 0, [code, message]]`` (one frame a chunk: each
costs the worker a GIL hand-over; messages are cut to fit the worker's frame limit). Both directions are JSON, never
pickle: a child runs decoders on untrusted images, and what it says must not be able to run code in the worker.

The progress word says what the child is doing: -2 starting, -1 between images, else the slot in hand, so the
worker knows which image a stuck or dead child was on. SIGINT and SIGTERM are ignored (a Ctrl-C or a systemd stop
reaches the whole process group; the worker's warm shutdown decides, and finishes the images in hand); the child
exits when the worker closes the pipe, and is killed by the kernel when the worker dies.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from producer.contract.codes import ErrorCode, JobFailure, inline_bytes
from worker.inference.decode_checks import DecodeLimits
from worker.inference.files import read_shared_file
from worker.inference.preprocess import preprocess

STARTING, IDLE = -2, -1
MESSAGE_CHARS = 1000  # an error message in an answer (the worker's frame limit holds a chunk of them)
_PR_SET_PDEATHSIG = 1


def model_input(data_b64: str | None, path: str | None, size: int, config: dict[str, Any]) -> np.ndarray:
    """An inline or shared-root image -> the ``size`` x ``size`` x 3 float32 model input; raises :class:`JobFailure`."""
    limit, root = config["max_inline_bytes"], config["shared_root"]
    if data_b64 is not None:
        data = inline_bytes(data_b64, limit)
    else:
        data = read_shared_file(Path(root) if root else None, path or "", limit)
    return preprocess(data, size, config["limits"])


def limits_from(config: dict[str, Any]) -> DecodeLimits:
    """The :class:`DecodeLimits` of a JSON config (lists back to tuples)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config["limits"].items()}
    return DecodeLimits(**fields)


def _prepare(item: list[Any], ring: np.ndarray, config: dict[str, Any]) -> list[Any]:
    slot, data_b64, path = item
    start = time.perf_counter()
    try:
        ring[slot] = model_input(data_b64, path, ring.shape[1], config)
    except JobFailure as failure:
        return [slot, 0.0, [failure.code.value, failure.message[:MESSAGE_CHARS]]]
    except Exception as exc:  # a bug, not bad input: this image fails, the child goes on
        message = f"preprocessing crashed: {type(exc).__name__}: {exc}"
        return [slot, 0.0, [ErrorCode.INTERNAL_ERROR.value, message[:MESSAGE_CHARS]]]
    return [slot, (time.perf_counter() - start) * 1000.0, None]


def _read(conn: Connection, inbox: queue.SimpleQueue[Any], closed: threading.Event) -> None:
    try:
        while True:
            inbox.put(json.loads(conn.recv_bytes()))
    except (EOFError, OSError, ValueError):
        closed.set()  # the worker is done with this child: stop between two images, not after the queue
        inbox.put(None)


def _die_with_the_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def main(argv: list[str]) -> int:
    """``argv``: this child's memory (a memfd), its index, the request and answer pipe descriptors, the JSON
    config."""
    _die_with_the_worker()
    worker = os.getppid()
    memory_fd, _index, request_fd, answer_fd = (int(a) for a in argv[:4])
    config = json.loads(argv[4])
    config["limits"] = limits_from(config)
    size, slots = config["size"], config["child_slots"]
    memory = mmap.mmap(memory_fd, os.fstat(memory_fd).st_size)
    ring = np.ndarray((slots, size, size, 3), np.float32, buffer=memory)
    on = np.ndarray((1,), np.int64, buffer=memory, offset=ring.nbytes)
    requests, answers = Connection(request_fd, writable=False), Connection(answer_fd, readable=False)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    closed = threading.Event()
    threading.Thread(target=_read, args=(requests, inbox, closed), name="requests", daemon=True).start()
    on[0] = IDLE  # up: the worker's start timeout no longer applies
    try:
        while (chunk := inbox.get()) is not None:
            done = []
            for item in chunk:
                if closed.is_set() or os.getppid() != worker:
                    return 0
                on[0] = item[0]
                done.append(_prepare(item, ring, config))
            on[0] = IDLE
            answers.send_bytes(json.dumps(done).encode())
    except OSError:  # the worker is gone
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
