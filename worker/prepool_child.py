"""One preprocessing process of :mod:`worker.prepool` (run as ``python -m worker.prepool_child``; never by hand).

It loads numpy, Pillow and the worker's decode/preprocess modules: never TensorFlow, rq or Redis. A reader thread
keeps the request pipe drained (so the worker's sends never wait on a busy child); the main thread takes each
chunk ``[(slot, data_b64, path), ...]`` in order, writes the model input into ``slot`` of the shared ring and
answers the chunk with one list of ``(slot, ms, None)`` or ``(slot, 0.0, (code, message))`` (one message a chunk:
each message costs the worker a GIL hand-over). While it works on an image, the slot stands in its entry of the
progress array after the ring, so the worker knows which image a stuck or dead child was on. The child exits when
the worker closes the pipe, or dies with it.
"""

from __future__ import annotations

import json
import mmap
import queue
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from producer.codes import ErrorCode, JobFailure, inline_bytes
from worker.decode_checks import DecodeLimits
from worker.files import read_shared_file
from worker.preprocess import preprocess


def _read(conn: Connection, inbox: queue.SimpleQueue[Any]) -> None:
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):
        inbox.put(None)


def _prepare(item: tuple[int, str | None, str | None], ring: np.ndarray, config: dict[str, Any]) -> tuple:
    slot, data_b64, path = item
    start = time.perf_counter()
    try:
        limit, root = config["max_inline_bytes"], config["shared_root"]
        if data_b64 is not None:
            data = inline_bytes(data_b64, limit)
        else:
            data = read_shared_file(Path(root) if root else None, path or "", limit)
        ring[slot] = preprocess(data, ring.shape[1], config["limits"])
    except JobFailure as failure:
        return slot, 0.0, (failure.code.value, failure.message)
    except Exception as exc:  # a bug, not bad input: this image fails, the child goes on
        return slot, 0.0, (ErrorCode.INTERNAL_ERROR.value, f"preprocessing crashed: {type(exc).__name__}: {exc}")
    return slot, (time.perf_counter() - start) * 1000.0, None


def main(argv: list[str]) -> int:
    """``argv``: the ring's file descriptor, this child's index, the request and answer pipe descriptors, the
    JSON config."""
    ring_fd, index, request_fd, answer_fd = (int(a) for a in argv[:4])
    config = json.loads(argv[4])
    limits: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config["limits"].items()}
    config["limits"] = DecodeLimits(**limits)
    size, slots = config["size"], config["slots"]
    ring_map = mmap.mmap(ring_fd, config["ring_bytes"])
    ring = np.ndarray((slots, size, size, 3), np.float32, buffer=ring_map)
    on = np.ndarray((config["max_children"],), np.int64, buffer=ring_map, offset=ring.nbytes)  # slot in hand
    requests, answers = Connection(request_fd, writable=False), Connection(answer_fd, readable=False)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(requests, inbox), name="requests", daemon=True).start()
    try:
        while (chunk := inbox.get()) is not None:
            done = []
            for item in chunk:
                on[index] = item[0]
                done.append(_prepare(item, ring, config))
            on[index] = -1
            answers.send(done)
    except (BrokenPipeError, OSError):  # the worker is gone
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
