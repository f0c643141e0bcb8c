"""TensorFlow's native output in the worker and the demo: a CPU-only machine's CUDA probe is no error event, and
what native code writes while the demo loads TensorFlow is hidden unless loading fails."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_a_cpu_only_machines_cuda_probe_is_not_an_error_event():
    import logging

    import structlog
    from structlog.testing import capture_logs

    from worker.stdio import _emit

    saved = structlog.get_config()  # another test in this process may have set the level to info
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            _emit(
                "E0000 00:00:1796698850.665614   18284 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
                "error: Failed call to cuInit: UNKNOWN ERROR (303)",
                "stderr",
            )
            _emit("E0000 00:00:1796698850.665614   18284 other.cc:1] a real error", "stderr")
    finally:
        structlog.configure(**saved)
    assert [(e["log_level"], e["source"]) for e in logs] == [("debug", "cuda_platform.cc:52"), ("error", "other.cc:1")]


QUIET = """
import os, sys
from worker.stdio import quiet_native_stderr
with quiet_native_stderr():
    os.write(2, b"banner from native code\\n")
print("after", file=sys.stderr)
try:
    with quiet_native_stderr():
        os.write(2, b"kept because the block failed\\n")
        raise SystemExit(3)
finally:
    print("restored", file=sys.stderr)
"""


def test_quiet_native_stderr_hides_what_native_code_writes_unless_the_block_fails():
    proc = subprocess.run(
        [sys.executable, "-c", QUIET], cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert proc.returncode == 3
    assert proc.stderr == "after\nkept because the block failed\nrestored\n"
