"""How long the tests wait. Every wait in the suite (a deadline, a result's timeout, a process's exit, a
subprocess's run) is an upper bound written as ``patience(seconds)``: ``seconds`` is what an idle 2-core machine
needs with a margin, multiplied by one factor, ``ARCFACE_TEST_TIME_SCALE`` (default 3: meant for the whole suite
beside two busy processes, which ``./dev test-busy`` checks). A bound costs time only when the test fails; raise
the factor on a slower or busier machine, never a single wait.

Not scaled: time a test lets pass on purpose (a TTL to expire, an outage to last), a timeout that is the behaviour
under test (it must fire), and poll intervals.
"""

from __future__ import annotations

import math
import os

SCALE_VARIABLE = "ARCFACE_TEST_TIME_SCALE"
DEFAULT_SCALE = 3.0


def time_scale() -> float:
    """The factor from ``ARCFACE_TEST_TIME_SCALE`` (unset or empty: :data:`DEFAULT_SCALE`); anything but a
    finite positive number stops the run with the variable named."""
    raw = os.environ.get(SCALE_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_SCALE
    try:
        scale = float(raw)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{SCALE_VARIABLE}={raw!r}: expected a positive number (a factor on every test wait)")
    return scale


SCALE = time_scale()


def patience(seconds: float) -> float:
    """The longest a test waits for something that takes ``seconds`` at most on an idle machine: ``seconds``
    times ``ARCFACE_TEST_TIME_SCALE``."""
    return seconds * SCALE
