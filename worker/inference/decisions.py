"""Measured start-up decisions (precision, batch cap) remembered per model and machine, so restarts skip measuring.

One JSON file per decision key under ``<cache dir>/decisions/``. The key is the sha256 of everything the
measurement depends on: the model's weights, the TensorFlow and Keras versions, the CPU (model name and flags),
the GPUs, the usable cores and the settings that change speed or fidelity. A changed model, TensorFlow or CPU is
a different key, so the old decision is simply never read. Files are written atomically (a temporary file in the
same folder, then a rename) and checked when read (their own key and a checksum of their content); a file that
fails the check is ignored, measured again and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("arcface.worker")
FORMAT = 1


def weights_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a model's files: the file itself, or every file of a folder (SavedModel, TF.js) with its relative
    name; a TF.js ``model.json`` counts with the files of its folder (its shards)."""
    p = Path(path)
    root = p.parent if p.suffix == ".json" else p
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [p]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decision_key(inputs: dict[str, Any]) -> str:
    """The key of a decision: sha256 of its inputs (weights digest, versions, CPU, GPUs, settings)."""
    return hashlib.sha256(_canonical({"format": FORMAT, **inputs})).hexdigest()


class DecisionCache:
    """Decisions on disk under ``directory``, one file per key."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The decision stored under ``key``, or None when there is none or the file fails its check (logged)."""
        path = self.path(key)
        try:
            record = json.loads(path.read_bytes())
            decision = record["decision"]
            ok = (
                record.get("format") == FORMAT
                and record.get("key") == key
                and isinstance(decision, dict)
                and record.get("checksum") == hashlib.sha256(_canonical(decision)).hexdigest()
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("decision_cache_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
            return None
        if not ok:
            log.warning("decision_cache_unreadable", path=str(path), error="format, key or checksum mismatch")
            return None
        return decision

    def store(self, key: str, decision: dict[str, Any], inputs: dict[str, Any]) -> Path | None:
        """Write ``decision`` (with the ``inputs`` it was measured for, to read by eye) atomically; a cache folder
        that cannot be written is logged and otherwise ignored (the next start measures again)."""
        record = {
            "format": FORMAT,
            "key": key,
            "inputs": inputs,
            "decision": decision,
            "checksum": hashlib.sha256(_canonical(decision)).hexdigest(),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key[:16]}-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(record, handle, indent=1, sort_keys=True)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("decision_cache_unwritable", directory=str(self.directory), error=str(exc))
            return None
        return self.path(key)
