"""JSON-only output for the worker process: whatever reaches file descriptors 1 and 2 becomes a log event.

TensorFlow's C++ code logs through absl straight to file descriptor 2, partly before ``TF_CPP_MIN_LOG_LEVEL`` is
read ("All log messages before absl::InitializeLog() is called are written to STDERR", oneDNN and CUDA probing
lines), and libraries may print. In JSON log mode :func:`capture_stdio` points descriptors 1 and 2 at pipes read
by two threads that turn every line into a structlog event, so a log pipeline reading the process's output line
by line sees only JSON. absl's ``I0000 00:00:... 123 port.cc:153] text`` prefix is parsed into the event's level
and ``source`` (its INFO lines become DEBUG events); other lines become ``stray_output`` events. Uncaught
exceptions are logged as one ``uncaught_exception`` event instead of a multi-line traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TextIO

import structlog

_ABSL = re.compile(r"^(?P<sev>[IWEF])\d{4} [\d:.]+\s+\d+ (?P<source>[^\]\s]+)\] ?(?P<message>.*)$")
_ABSL_LEVELS = {"I": "debug", "W": "warning", "E": "error", "F": "critical"}
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# TensorFlow probing for CUDA on a machine without a GPU logs at ERROR ("failed call to cuInit"): not an error here.
_NO_GPU = "failed call to cuInit"

log = structlog.get_logger("arcface.stdio")


def _emit(line: str, stream: str) -> None:
    if not line.strip():
        return
    if line.startswith(_ABSL_PREINIT):
        log.debug("tensorflow_log", message=line, stream=stream)
        return
    m = _ABSL.match(line)
    if m and _NO_GPU in m["message"]:
        log.debug("tensorflow_log", message=m["message"], source=m["source"], stream=stream)
    elif m:
        getattr(log, _ABSL_LEVELS[m["sev"]])("tensorflow_log", message=m["message"], source=m["source"], stream=stream)
    else:
        (log.info if stream == "stdout" else log.warning)("stray_output", message=line, stream=stream)


class StdioCapture:
    """Descriptors 1 and 2 redirected into pipes whose lines are logged; :meth:`stop` restores them."""

    def __init__(self) -> None:
        self.saved: dict[int, int] = {}
        self.readers: list[threading.Thread] = []
        self.log_stream: TextIO | None = None

    def start(self, fds: tuple[int, ...] = (1, 2)) -> TextIO:
        """Redirect ``fds`` (1 stdout, 2 stderr); return a stream on the original stderr for the log renderer."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # Line-buffered so each rendered event is written (and visible) as soon as it is logged.
        self.log_stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)
        for fd in fds:
            name = {1: "stdout", 2: "stderr"}[fd]
            self.saved[fd] = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            reader = threading.Thread(target=self._read, args=(read_end, name), name=f"capture-{name}", daemon=True)
            reader.start()
            self.readers.append(reader)
        # A native crash (SIGSEGV, SIGABRT) still leaves its trace on the real stderr.
        faulthandler.enable(file=self.log_stream)
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(
            args.exc_type, args.exc_value, args.exc_traceback, args.thread
        )
        atexit.register(self.stop)
        return self.log_stream

    @staticmethod
    def _read(fd: int, name: str) -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    _emit(raw.decode("utf-8", "replace").rstrip("\r"), name)
            if pending:
                _emit(pending.decode("utf-8", "replace"), name)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Restore descriptors 1 and 2 and log what is still in the pipes (runs at exit)."""
        if not self.saved:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, original in self.saved.items():
            os.dup2(original, fd)  # drops this process's write end: the reader sees end of file
            os.close(original)
        self.saved.clear()
        for reader in self.readers:
            reader.join(timeout_s)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None, thread: Any = None
) -> None:
    if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
        return
    log.critical(
        "uncaught_exception",
        thread=getattr(thread, "name", None) or threading.current_thread().name,
        exc_info=(exc_type, exc, tb),
    )


def capture_stdio(fds: tuple[int, ...] = (1, 2)) -> TextIO:
    """Start capturing ``fds`` (see the module docstring); returns the stream the log renderer must write to."""
    return StdioCapture().start(fds)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Descriptor 2 into a temporary file for the block (TensorFlow's import writes its absl banner there before
    ``TF_CPP_MIN_LOG_LEVEL`` is read); what was written is replayed on stderr if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
