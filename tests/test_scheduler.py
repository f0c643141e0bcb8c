"""The batch policy alone (worker/batching/scheduler.py): no Redis, no model, a clock the test moves."""

from __future__ import annotations

import pytest

from worker.batching.scheduler import BatchPolicy, Scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler(max_batch_size: int = 4, batch_timeout_s: float = 0.005) -> tuple[Scheduler[str], Clock]:
    clock = Clock()
    return Scheduler(BatchPolicy(max_batch_size, batch_timeout_s), clock), clock


def images(job: str, n: int) -> list[str]:
    return [f"{job}/{i}" for i in range(n)]


def test_images_of_many_jobs_share_a_batch_oldest_first() -> None:
    s, _ = scheduler(max_batch_size=4)
    s.add(images("a", 1))
    s.add(images("b", 2))
    s.add(images("c", 3))
    assert s.next_batch() == ["a/0", "b/0", "b/1", "c/0"]
    assert s.next_batch() == ["c/1", "c/2"]
    assert s.next_batch() == []


def test_a_large_job_spans_several_batches_in_order() -> None:
    s, _ = scheduler(max_batch_size=64)
    s.add(images("big", 256))
    batches = [s.next_batch() for _ in range(5)]
    assert [len(b) for b in batches] == [64, 64, 64, 64, 0]
    assert [x for b in batches for x in b] == images("big", 256)


def test_a_later_job_never_overtakes_an_earlier_one() -> None:
    s, _ = scheduler(max_batch_size=3)
    s.add(images("early", 5))
    s.add(images("late", 1))
    assert s.next_batch() == ["early/0", "early/1", "early/2"]
    assert s.next_batch() == ["early/3", "early/4", "late/0"]


def test_taking_stops_at_one_batch_while_idle_and_two_while_the_model_runs() -> None:
    s, _ = scheduler(max_batch_size=4)
    assert s.room(model_busy=False) == 4 and s.room(model_busy=True) == 8
    s.add(images("a", 3))
    assert s.room(model_busy=False) == 1 and s.room(model_busy=True) == 5
    s.add(images("b", 6))
    assert s.room(model_busy=False) == 0 and s.room(model_busy=True) == 0


def test_one_round_trip_asks_for_the_rest_of_the_batch_and_at_least_one() -> None:
    s, _ = scheduler(max_batch_size=16)
    assert s.pop_size() == 16
    s.add(images("a", 10))
    assert s.pop_size() == 6
    s.add(images("b", 20))
    assert s.pop_size() == 1


def test_a_partial_batch_waits_at_most_the_batch_timeout() -> None:
    s, clock = scheduler(batch_timeout_s=0.005)
    deadline = s.fill_deadline()
    assert s.fill_wait_s(deadline) == pytest.approx(0.005)
    clock.now += 0.003
    assert s.fill_wait_s(deadline) == pytest.approx(0.002)
    clock.now += 0.003
    assert s.fill_wait_s(deadline) == 0.0


def test_blocking_for_a_first_job_only_when_idle_with_nothing_waiting_outside_a_burst() -> None:
    s, _ = scheduler()
    assert s.first_block_s(burst=False, model_running=False) == 1.0
    assert s.first_block_s(burst=True, model_running=False) == 0.0
    assert s.first_block_s(burst=False, model_running=True) == 0.0
    s.add(images("a", 1))
    assert s.first_block_s(burst=False, model_running=False) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0, "batch_timeout_s": 0.005}, {"max_batch_size": 4, "batch_timeout_s": -1.0}],
)
def test_a_policy_that_cannot_batch_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)
