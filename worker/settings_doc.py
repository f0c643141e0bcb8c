"""The configuration page, docs/configuration.md, rendered from the settings classes so that it cannot drift.

``python -m worker.settings_doc`` prints the page; ``--write`` writes docs/configuration.md; ``--check`` exits 1
when the file differs from what the settings say. One table per process: the settings producers and workers
share (:class:`~producer.settings.CommonSettings`), the producer's own (:class:`~producer.settings.ProducerSettings`)
and the worker's own (:class:`~worker.settings.WorkerSettings`). Each row is a field: its ``ARCFACE_*`` variable,
type with its bounds, default and ``Field(description=...)``; a field may give
``json_schema_extra={"doc_default": ...}`` where its real default depends on the machine (a per-user directory).
It lives under ``worker/`` because it reads the worker's settings, and nothing under ``producer/`` imports
``worker/``.
"""

from __future__ import annotations

import argparse
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from producer.settings import NOT_SETTINGS, CommonSettings, ProducerSettings, accepted_range
from worker.settings import WorkerSettings

PREFIX = "ARCFACE_"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
COMMAND = "python -m worker.settings_doc --write"

INTRO = f"""\
# Configuration

<!-- Generated from the settings classes by `{COMMAND}`: edit the fields' descriptions in
producer/settings.py and worker/settings.py, then regenerate. tests/test_docs.py checks this file. -->

Every setting is an environment variable with the `{PREFIX}` prefix, or a line such as `{PREFIX}QUEUE=faces` in a `.env`
file in the working directory. An empty value (`{PREFIX}QUEUE=`, as compose passes an unset `${{VAR:-}}`) means
unset: the default applies. Each process checks its settings together when it starts: a bad value stops it
with one line on stderr naming the variable and what it accepts (exit code 2, before any model is loaded).
Every number has finite bounds (the type column): a value outside them is a typo or a unit mistake.

A `{PREFIX}*` variable that is no setting (a typo) stops `arcface-worker` and `arcface-producer` the same way,
naming the nearest setting; `FaceClient()`, which runs inside another service, warns instead
(`UnknownSettingWarning`). Producers accept the worker's settings and workers the producer's (one `.env` may serve
both). These are not settings, and accepted: {", ".join(f"`{n}`" for n in sorted(NOT_SETTINGS))} (read by the
tests and the demo, listed in `producer/settings.py`).
Defaults that more than one module needs (threshold, weights URL, batch shapes, image limits, input scale) are
written once, in `producer/contract/defaults.py`. `arcface-worker --help` lists the worker's settings too.
"""

SECTIONS: tuple[tuple[str, type[BaseSettings], type[BaseSettings] | None, str], ...] = (
    (
        "Producer and worker",
        CommonSettings,
        None,
        "Both sides read these (`CommonSettings`): where Redis is, the queue, TTLs and limits they must agree on.",
    ),
    ("Producer", ProducerSettings, CommonSettings, "`ProducerSettings`: the client and `arcface-producer` only."),
    (
        "Worker",
        WorkerSettings,
        CommonSettings,
        "`WorkerSettings`: `arcface-worker` only (model, detection, galleries, engine, batching, liveness).",
    ),
)

_SCALARS = {bool: "bool", int: "int", float: "float", str: "text", Path: "path", SecretStr: "text (secret)"}


def _type(annotation: Any) -> str:
    """A short, readable type: ``int``, ``path``, ```a` | `b```, ``list of int (comma-separated)``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        parts = [_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(parts)
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"list of {_type(item)} (comma-separated)"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    raise TypeError(f"no documented form for the settings type {annotation!r}: add one to worker/settings_doc.py")


def _mib(value: int) -> str:
    return f" ({value // (1024 * 1024)} MiB)" if value >= 1024 * 1024 and value % (1024 * 1024) == 0 else ""


def _default(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return str(extra["doc_default"])
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list):
        return f"`{','.join(str(v) for v in value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, int):
        return f"`{value}`" + (_mib(value) if name.endswith("_bytes") else "")
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fields(cls: type[BaseSettings], base: type[BaseSettings] | None) -> list[tuple[str, FieldInfo]]:
    inherited = set(base.model_fields) if base else set()
    return [(name, f) for name, f in cls.model_fields.items() if name not in inherited]


def variables() -> dict[str, str]:
    """Every ``ARCFACE_*`` variable a settings class reads, with the class that declares it."""
    return {f"{PREFIX}{name.upper()}": cls.__name__ for _, cls, base, _ in SECTIONS for name, _ in _fields(cls, base)}


def render() -> str:
    """The whole page, deterministic: nothing in it depends on this machine or its environment."""
    out = [INTRO.rstrip("\n")]
    for title, cls, base, blurb in SECTIONS:
        out += ["", f"## {title}", "", blurb, "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        for name, field in _fields(cls, base):
            if not field.description:
                raise ValueError(f"{cls.__name__}.{name} has no Field(description=...): every setting needs one")
            bounds = accepted_range(field)
            kind = _type(field.annotation) + (f", {bounds.removeprefix('a finite number ')}" if bounds else "")
            row = (f"`{PREFIX}{name.upper()}`", kind, _default(name, field), field.description)
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.settings_doc", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(PAGE.parents[1])}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the page differs from the settings")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        PAGE.write_text(page, encoding="utf-8")
    elif args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
