"""Warm-up: the precision and batch cap a worker serves with, decided by measurement or taken from the settings,
remembered per model and machine (:mod:`worker.inference.decisions`), and every batch shape it will run warmed.

Budget on 2 cores: the probe faces (8 images) once per path plus :data:`~worker.inference.precision.TIMING_ROUNDS`
interleaved rounds, then at most three batch sizes (8, 16, 32 on a CPU) for :data:`BATCH_ROUNDS` interleaved rounds;
a restart with a remembered decision measures nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from worker.inference.decisions import DecisionCache, decision_key
from worker.inference.engine import Engine, batch_candidates, batch_rates, choose_batch_size
from worker.inference.precision import (
    PRECISION_NAMES,
    CpuInfo,
    PrecisionChoice,
    ReducedUnavailable,
    choose_precision,
    reduced_policy,
    reduced_variant,
)

BATCH_ROUNDS = 2  # of the fastest of 2 runs; a third round cost 1.6 s of a 10 s start on 2 cores


@dataclass
class Tuned:
    """The engine to serve and how its precision and batch cap were decided."""

    engine: Engine
    precision: PrecisionChoice
    max_batch_size: int
    batch_chosen: str  # setting / measured / cached / only candidate
    batch_images_per_s: dict[int, float] = field(default_factory=dict)
    cache: str = "unused"  # unused / hit / written / unwritable
    warm_up_s: float = 0.0


def _policy_of(precision: str) -> str:
    return next(policy for policy, name in PRECISION_NAMES.items() if name == precision)


def _from_cache(full: Engine, decision: dict[str, Any]) -> tuple[Engine, PrecisionChoice, int] | None:
    """The engine and choices a remembered decision describes, or None when it no longer applies."""
    try:
        choice = PrecisionChoice(**{**decision["precision"], "measured": False})
        cap = int(decision["max_batch_size"])
        if cap not in full.allowed_batch_sizes or choice.precision not in PRECISION_NAMES.values():
            return None
        engine = full
        if choice.precision != full.precision:
            engine = Engine(reduced_variant(full.model, _policy_of(choice.precision)), full.allowed_batch_sizes)
    except (KeyError, TypeError, ValueError, StopIteration, ReducedUnavailable):
        return None
    return engine, choice, cap


def tune(
    full: Engine,
    *,
    precision_setting: str,
    max_batch_setting: int | str,
    cpu: CpuInfo,
    gpu: bool,
    cache: DecisionCache | None = None,
    key_inputs: dict[str, Any] | None = None,
) -> Tuned:
    """Decide precision (``auto``: :func:`~worker.inference.precision.choose_precision`) and batch cap (``auto``:
    the sizes of :func:`~worker.inference.engine.batch_candidates` timed in interleaved rounds,
    :func:`~worker.inference.engine.choose_batch_size`) for ``full`` (float32, or the explicitly chosen precision),
    then warm every allowed size up to the cap. With ``cache`` and ``key_inputs`` (what the decision depends on) a
    remembered decision is used instead of measuring, and a new one is remembered."""
    start = time.perf_counter()
    measure_precision = precision_setting == "auto" and reduced_policy(cpu, gpu) is not None
    measure_batch = max_batch_setting == "auto"
    key = decision_key(key_inputs) if cache is not None and key_inputs is not None else None
    if key is not None and (measure_precision or measure_batch):
        decision = cache.load(key) if cache is not None else None
        remembered = _from_cache(full, decision) if decision is not None else None
        if remembered is not None:
            engine, choice, cap = remembered
            engine.warm_up_to(cap)
            return Tuned(engine, choice, cap, "cached", cache="hit", warm_up_s=time.perf_counter() - start)
    engine, choice = choose_precision(full, precision_setting, cpu, gpu)
    rates: dict[int, float] = {}
    if not measure_batch:
        cap, how = int(max_batch_setting), "setting"
    else:
        sizes = batch_candidates(engine.allowed_batch_sizes, gpu)
        if len(sizes) == 1:
            cap, how = sizes[0], "only candidate"
        else:
            seconds = engine.batch_seconds(sizes, BATCH_ROUNDS)
            cap, how, rates = choose_batch_size(seconds), "measured", batch_rates(seconds)
    engine.warm_up_to(cap)
    state = "unused"
    if key is not None and cache is not None and (measure_precision or measure_batch):
        decision = {"precision": {**choice.to_json(), "measured": False}, "max_batch_size": cap}
        state = "written" if cache.store(key, decision, key_inputs or {}) else "unwritable"
    shown = {size: round(rate, 1) for size, rate in rates.items()}
    return Tuned(engine, choice, cap, how, shown, state, time.perf_counter() - start)
