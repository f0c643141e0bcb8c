"""The batch policy, alone: which waiting images go into the next engine batch, how many more to take from the
queue now, and how long to wait for them. No Redis, no rq, no TensorFlow: the worker asks, this answers.

Vocabulary (TF Serving's batching options): ``max_batch_size`` is the most images one engine call takes;
``batch_timeout_s`` is how long a partial batch may wait to fill once its first image is in hand. Images are
opaque items here (the worker's ``Item``: one image of one job), so the images of many jobs share a batch and a
large job spans several.

Invariants:

- every engine batch holds between 1 and ``max_batch_size`` items, oldest first (first in, first out across jobs:
  a job's images stay in order, and no image waits behind images taken after it);
- while the model is idle, taking stops once ``max_batch_size`` images wait; while it runs, once
  ``lookahead_batches x max_batch_size`` wait, so the next batch is being preprocessed while the model works;
- a partial batch waits at most ``batch_timeout_s`` after the worker started filling it, and never while the
  model is busy (the batch would only wait for the model anyway);
- with nothing waiting and the model idle, the worker may block on the queue for ``idle_block_s``; in a burst,
  or with work in hand, it never blocks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """The knobs of the policy, in the units their names say."""

    max_batch_size: int
    batch_timeout_s: float
    lookahead_batches: int = 2  # batches taken ahead while the model runs
    idle_block_s: float = 1.0  # how long an idle worker blocks on the queue for a first job
    busy_poll_s: float = 0.05  # how long one blocking pop waits while the model runs (wakes when a job comes)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {self.max_batch_size}")
        if self.batch_timeout_s < 0 or self.lookahead_batches < 1:
            raise ValueError("batch_timeout_s must be >= 0 and lookahead_batches >= 1")


class Scheduler(Generic[T]):
    """The queue of images waiting for the engine, and the decisions made on it (see the module docstring)."""

    def __init__(self, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._waiting: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, items: Iterable[T]) -> None:
        """Images ready to be scheduled, in the order they should run."""
        self._waiting.extend(items)

    def room(self, model_busy: bool) -> int:
        """How many more images to take now (0: enough wait)."""
        ahead = self.policy.lookahead_batches if model_busy else 1
        return max(0, self.policy.max_batch_size * ahead - len(self._waiting))

    def pop_size(self) -> int:
        """How many job ids one non-blocking round trip asks the queue for: the rest of the next batch, at least 1
        (a job may carry several images; taking stops once :meth:`room` says enough)."""
        return max(1, self.policy.max_batch_size - len(self._waiting))

    def first_block_s(self, burst: bool, model_running: bool) -> float:
        """How long to block on the queue for a first job: only when idle, with nothing waiting, outside a burst."""
        if burst or model_running or self._waiting:
            return 0.0
        return self.policy.idle_block_s

    def fill_deadline(self) -> float:
        """When a partial batch stops waiting to fill, on the scheduler's clock."""
        return self._clock() + self.policy.batch_timeout_s

    def fill_wait_s(self, deadline: float) -> float:
        """How long to wait before asking the queue again (0: stop filling, run what waits)."""
        return max(0.0, deadline - self._clock())

    def next_batch(self) -> list[T]:
        """The next engine batch: up to ``max_batch_size`` waiting images, oldest first (empty when none wait)."""
        out: list[T] = []
        while self._waiting and len(out) < self.policy.max_batch_size:
            out.append(self._waiting.popleft())
        return out
