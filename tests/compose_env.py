"""compose.yaml read the way Docker Compose reads it: YAML anchors and merge keys, then ``${VAR...}`` interpolation
against a given set of host variables (none, for "a fresh host"). Used to run a worker with exactly the environment
compose would give it, without Docker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.conftest import REPO

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def interpolate(text: str, host: dict[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``. An unset plain variable is empty."""

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return host.get(m["named"], "")
        braced = _BRACED.match(m["braced"])
        if braced is None:
            raise ValueError(f"invalid interpolation: ${{{m['braced']}}}")
        name, op, arg = braced["name"], braced["op"], interpolate(braced["arg"] or "", host)
        value = host.get(name)
        empty_counts = op is not None and op.startswith(":")
        unset = value is None or (empty_counts and value == "")
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if unset else value  # type: ignore[return-value]
        if op.endswith("?"):
            if unset:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return value  # type: ignore[return-value]
        return "" if unset else arg  # "+"

    return _VAR.sub(one, text)


def _resolve(node: Any, host: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, host)
    if isinstance(node, dict):
        return {k: _resolve(v, host) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, host) for v in node]
    return node


def load_compose(path: Path = REPO / "compose.yaml", host: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as a plain dict, merge keys applied and every string interpolated with ``host``."""
    from ruamel.yaml import YAML

    data = YAML(typ="safe", pure=True).load(path.read_text())
    return _resolve(data, host or {})


def service_environment(
    service: str, host: dict[str, str] | None = None, path: Path = REPO / "compose.yaml"
) -> dict[str, str]:
    """The ``environment`` compose passes to ``service`` (without ``env_file`` contents: no .env on a fresh host).
    A variable listed without a value takes the host's, and is left out when the host has none."""
    host = host or {}
    env = load_compose(path, host)["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    out: dict[str, str] = {}
    for key, value in env.items():
        if value is None:
            if key in host:
                out[key] = host[key]
        else:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out
