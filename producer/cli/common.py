"""What every ``arcface-producer`` command shares: the exit codes, the argument types (each refusing a bad
value in one line), the options several subcommands take, and the one-line error report.

"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from producer.contract.errors import EXIT_USAGE, ArcFaceError, JobFailed, JobNotFound, ResultTimeout

PROG = "arcface-producer"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("arcface-service")
    except PackageNotFoundError:
        return "unknown (not installed)"


# --- argument types ----------------------------------------------------------------------------------
def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def threshold_argument(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..2 (a cosine distance: 0 identical, 2 opposite)")
    return value


def seconds_argument(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give seconds >= 0")
    return value


def positive_int_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def bounded_text(text: str) -> str:
    if len(text) > 1024:
        raise argparse.ArgumentTypeError(f"{len(text)} characters, over the 1024-character limit")
    return text


def job_id_argument(text: str) -> str:
    from producer.client.face_client import JOB_ID

    if not JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a job id (1-128 letters, digits, '_' or '-')")
    return text


# --- options several subcommands take -------------------------------------------------------------------
def add_command(sub: Any, name: str, about: Mapping[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """Add subcommand ``name``; ``about[name]`` is its line in the command list and the description atop its help."""
    summary, description = about[name]
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description)
    return parser


def add_json(sp: argparse.ArgumentParser) -> None:
    """``--json``: the result (or the error) as one JSON object on stdout."""
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout (errors too)")


def add_wait(sp: argparse.ArgumentParser, flag: bool = True) -> None:
    """``--wait`` (unless ``flag`` is false) and ``--timeout S``."""
    if flag:
        sp.add_argument("--wait", action="store_true", help="wait for the result and print it")
    sp.add_argument(
        "--timeout",
        type=seconds_argument,
        default=None,
        metavar="S",
        help="seconds to wait for the result (default: ARCFACE_WAIT_TIMEOUT, 60)",
    )


def add_image_options(sp: argparse.ArgumentParser, path_help: str, detect_help: str) -> None:
    """``--model``, ``--path`` and ``--detect``: how a job's images are sent and read."""
    sp.add_argument(
        "--model", default=None, help="the model the job needs; a worker serving another fails it with unknown_model"
    )
    sp.add_argument("--path", action="store_true", help=path_help)
    sp.add_argument("--detect", choices=["none", "blazeface"], default=None, help=detect_help)


# --- errors --------------------------------------------------------------------------------------------
def print_error(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def fail(message: str, exit_code: int, as_json: bool, **extra: Any) -> int:
    print_error(message)
    if as_json:
        print(json.dumps({"error": message, "exit_code": exit_code, **extra}))
    return exit_code


def report(exc: ArcFaceError, as_json: bool) -> int:
    """One line on stderr (and, with ``--json``, a JSON object on stdout) for a library error; its exit code."""
    if isinstance(exc, JobFailed):
        return fail(str(exc), exc.exit_code, as_json, job_id=exc.job_id, code=exc.code.value)
    if isinstance(exc, (JobNotFound, ResultTimeout)):
        return fail(exc.message, exc.exit_code, as_json, job_id=exc.job_id)
    code = getattr(exc, "code", None)
    return fail(exc.message, exc.exit_code, as_json, **({"code": code.value} if code is not None else {}))


def print_verify(job_id: str, result: Any, whom: str = "") -> None:
    """The line for a finished verify job (``whom``: who ``b`` is, for a verify against a subject)."""
    verdict = "same person" if result.similar else "different people"
    op = "<=" if result.similar else ">"
    print(
        f"job {job_id} finished: {verdict}{whom}: distance {result.distance:.4f} {op} "
        f"threshold {result.threshold:.2f} ({result.model})"
    )
