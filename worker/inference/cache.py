"""Files kept in the cache directory (downloaded weights, the demo's random weights): built once, checked every
time they are read, rebuilt when corrupt.

A cached file ``name`` is written under ``name.part`` in the same directory, checked, and renamed into place
(``os.replace``: atomic on one file system), so a reader sees either no file or a whole one. Beside it,
``name.sha256`` records the size and sha256 the file had when it was checked; a later read compares the file
with that record, so a file truncated or overwritten in place is noticed, logged and rebuilt. One process at
a time builds a given file: the others wait on ``name.lock`` (an ``flock``, released by the kernel when its
holder dies, so a crashed builder leaves no stale lock) and then use the file the first one made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from worker.inference.weights import WeightsError

log = structlog.get_logger("arcface.cache")

Make = Callable[[Path], object]
"""Writes the file's content to the path it is given (the ``.part`` name; it may already hold a partial
earlier attempt, which a download resumes and anything else overwrites)."""
Check = Callable[[Path], None]
"""Raises :class:`WeightsError` (naming the problem) when the file at the path it is given cannot be used."""


def sha256_of(path: Path) -> str:
    """The file's sha256, hex."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def part_path(dest: Path) -> Path:
    """Where ``dest`` is written before it is renamed into place."""
    return dest.with_name(dest.name + ".part")


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold ``dest.lock`` (blocking until the process holding it finishes or dies)."""
    with dest.with_name(dest.name + ".lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _problem(dest: Path, sha256: str | None, check: Check | None, adopt: bool) -> str | None:
    """Why ``dest`` cannot be used as it is, or None when it can (``""`` when it is simply absent). ``adopt``
    (only under the lock): write the record of a file without one that ``check`` accepts."""
    if not dest.is_file():
        return ""
    try:
        record = json.loads(_sidecar(dest).read_text())
        size, recorded = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        size, recorded = -1, ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its record {_sidecar(dest).name} is unreadable ({exc})"
    have = dest.stat().st_size
    if size >= 0 and have != size:
        return f"it has {have} bytes, {size} were written"
    if recorded or sha256:
        got = sha256_of(dest)
        if recorded and got != recorded:
            return f"its sha256 is {got}, {recorded} was written"
        if sha256 and got != sha256.lower():
            return f"its sha256 is {got}, expected {sha256.lower()}"
    if not recorded and check is not None:
        # No record (made before records were kept, or the process died between rename and record): the
        # content itself decides, and a good file gets its record.
        try:
            check(dest)
        except WeightsError as exc:
            return str(exc)
        if adopt:
            _write_record(dest)
    return None


def _write_record(dest: Path) -> None:
    record = _sidecar(dest)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"bytes": dest.stat().st_size, "sha256": sha256_of(dest)}) + "\n")
    os.replace(tmp, record)


def cached_file(
    dest: Path, make: Make, *, check: Check | None = None, sha256: str | None = None, what: str = "cached file"
) -> Path:
    """``dest``, built by ``make`` unless a usable copy is already there.

    Usable: its size and sha256 match the record written when it was built (and ``sha256`` when given), or,
    with no record, ``check`` accepts it. An unusable file is logged (``cache_file_corrupt``) and rebuilt. A new
    file must pass ``check`` (and match ``sha256``) before it is renamed into place; when it does not, the
    ``.part`` file is removed and :class:`WeightsError` raised. Safe to call from several processes at once:
    one builds, the others wait and use its file.
    """
    if _problem(dest, sha256, check, adopt=False) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest):
        problem = _problem(dest, sha256, check, adopt=True)  # another process may have built it while this one waited
        if problem is None:
            return dest
        if problem:
            log.warning("cache_file_corrupt", path=str(dest), what=what, problem=problem, action="rebuilding it")
        part = part_path(dest)
        make(part)
        try:
            if sha256 and (got := sha256_of(part)) != sha256.lower():
                raise WeightsError(f"{what}: the new file has sha256 {got}, expected {sha256.lower()}")
            if check is not None:
                check(part)
        except WeightsError:
            part.unlink(missing_ok=True)
            raise
        with open(part, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        _sidecar(dest).unlink(missing_ok=True)  # a crash from here on leaves a file without record: checked
        os.replace(part, dest)
        _write_record(dest)
    return dest


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    retries: int = 3,
    timeout_s: float = 30.0,
    check: Check | None = None,
) -> Path:
    """``url``'s file in the cache at ``dest`` (see :func:`cached_file`), downloaded when absent or corrupt:
    resumes a partial ``dest.part`` with an HTTP Range request, retries with backoff, and checks ``sha256``
    when given and ``check`` before the file is moved into place.
    """

    def fetch(part: Path) -> None:
        last_error: Exception | None = None
        for attempt in range(retries):
            try:
                have = part.stat().st_size if part.exists() else 0
                request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    mode = "ab" if have and response.status == 206 else "wb"
                    with part.open(mode) as out:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                return
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last_error = exc
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 416:  # Range past the end: start over
                    part.unlink(missing_ok=True)
                time.sleep(min(2.0**attempt, 10.0))
        raise WeightsError(
            f"could not download ArcFace weights from {url} ({last_error}). Offline? Download the file elsewhere "
            f"and set ARCFACE_MODEL_PATH to its local path (a deepface .h5, a TF.js model.json, or your own model)."
        )

    return cached_file(dest, fetch, check=check, sha256=sha256, what=url)
