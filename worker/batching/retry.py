"""Waiting out a Redis that is unreachable, loading, read-only or full: which errors pass by themselves
(:func:`transient`) and running a call until Redis takes it (:func:`until_redis_takes`). The batching worker
(taking, registering, completing) and the gallery store (enroll, forget, lookups) both use these, so a job is
never failed because Redis restarted, stalled or filled up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import structlog

T = TypeVar("T")
_log = structlog.get_logger("arcface.batcher")

TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def transient(exc: BaseException) -> bool:
    """Redis errors that pass by themselves: unreachable, loading, read-only replica, or full (OOM). redis-py
    raises OOM as ``OutOfMemoryError`` with the code stripped ("command not allowed when used memory >
    'maxmemory'"), and prefixes an error inside a pipeline with "Command # n (...) of pipeline caused error: "."""
    if isinstance(exc, TRANSIENT):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc).rsplit("of pipeline caused error: ", 1)[-1]
    return text.startswith(("OOM", "LOADING", "READONLY", "MISCONF", "BUSY")) or "maxmemory" in text


def until_redis_takes(
    what: str,
    fn: Callable[[], T],
    *,
    on_refused: Callable[[], None] | None = None,
    logger: Any = None,
) -> T:
    """Run ``fn`` until it returns without a :func:`transient` error: backoff from 0.5 s to 30 s, one
    ``redis_unreachable`` line (``during=what``) per refused attempt, ``on_refused()`` after each. Any other
    error is raised at once."""
    log = logger or _log
    backoff = FIRST_BACKOFF_S
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            if on_refused is not None:
                on_refused()
            log.error("redis_unreachable", during=what, error=str(exc)[:300], retry_in_s=backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


class RedisRetry:
    """:func:`until_redis_takes` for one worker: it remembers that Redis refused a call, and says once when Redis
    answers again (``redis_reachable_again``)."""

    def __init__(self, logger: Any = None) -> None:
        self._log = logger or _log
        self.outage = False

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` until Redis takes it; results in hand are never dropped because Redis restarted, stalled
        or filled up: the worker waits for it."""
        out = until_redis_takes(what, fn, on_refused=self.refused, logger=self._log)
        self.answered(what)
        return out

    def refused(self) -> None:
        """Redis refused a call (logged by the caller)."""
        self.outage = True

    def answered(self, during: str) -> None:
        """Redis answered a call: log the end of an outage once."""
        if self.outage:
            self.outage = False
            self._log.info("redis_reachable_again", during=during)
