"""The jobs a worker holds: registered, not yet completed. One owner (the worker) and one lock, because the
heartbeat thread reads what the loop adds and the completer removes.

``nbytes`` (the inflated payloads held) bounds taking: it pauses at twice ``ARCFACE_MAX_JOB_BYTES``.
"""

from __future__ import annotations

import threading

from worker.batching.reading import Taken


class InHand:
    """Registered jobs by id, with the bytes they hold."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._jobs: dict[str, Taken] = {}
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def add(self, jobs: list[Taken]) -> None:
        """Jobs about to be registered (in hand before Redis knows: heartbeats and recovery count them now)."""
        with self.lock:
            for t in jobs:
                self._jobs[t.id] = t
                self._nbytes += t.nbytes

    def release(self, jobs: list[Taken]) -> None:
        """The jobs are no longer in hand (completed, or registered by another worker)."""
        with self.lock:
            for t in jobs:
                if self._jobs.pop(t.id, None) is not None:
                    self._nbytes -= t.nbytes

    def ids(self) -> set[str]:
        with self.lock:
            return set(self._jobs)

    def members(self) -> set[str]:
        """The started-registry members (``<id>:<execution id>``) of the jobs in hand."""
        with self.lock:
            return self.members_unlocked()

    def members_unlocked(self) -> set[str]:
        """:meth:`members` for a caller that holds :attr:`lock` (the heartbeat, across its write)."""
        return {t.member for t in self._jobs.values()}
