"""Pair-list readers for bulk runs: CSV (``a,b[,label]``), JSONL, and LFW's ``pairs.txt``.

Every reader yields :class:`Pair` in file order and raises :class:`PairsFormatError` with the line number
of the first broken line. :meth:`PairFile.validate` reads the whole file once, so a broken line is
reported before anything is enqueued; the run then streams the file again.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from producer.contract.errors import ArcFaceError

_TRUE = {"1", "yes", "true", "same", "y", "t"}
_FALSE = {"0", "no", "false", "different", "n", "f", "diff"}


class PairsFormatError(ArcFaceError, ValueError):
    """A pair file that cannot be read; the message names the file and line."""

    exit_code = 2


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    label: bool | None = None  # True = same person
    fold: int | None = None  # LFW 10-fold protocol


def parse_label(value: object, where: str) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise PairsFormatError(f"{where}: label {value!r} is not one of yes/no, 1/0, true/false, same/different")


def _csv(path: Path) -> Iterator[Pair]:
    with path.open(
        newline="", encoding="utf-8-sig"
    ) as f:  # -sig: a byte-order mark (Excel's CSV) is not part of the header
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["a", "b"] or len(header) > 3 or (len(header) == 3 and header[2] != "label"):
            raise PairsFormatError(f"{path}:1: CSV header must be 'a,b' or 'a,b,label', got {','.join(header)!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header) or not row[0].strip() or not row[1].strip():
                raise PairsFormatError(f"{where}: expected {len(header)} non-empty columns, got {row!r}")
            yield Pair(row[0].strip(), row[1].strip(), parse_label(row[2], where) if len(header) == 3 else None)


def _jsonl(path: Path) -> Iterator[Pair]:
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise PairsFormatError(f"{where}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("a"), str) or not isinstance(obj.get("b"), str):
                raise PairsFormatError(f"{where}: each line must be an object with string fields 'a' and 'b'")
            yield Pair(obj["a"], obj["b"], parse_label(obj.get("label"), where))


def lfw_image(name: str, number: str, where: str) -> str:
    if not number.isdigit():
        raise PairsFormatError(f"{where}: image number {number!r} is not a number")
    return f"{name}/{name}_{int(number):04d}.jpg"


def _lfw(path: Path) -> Iterator[Pair]:
    """LFW ``pairs.txt``: an optional ``folds pairs_per_fold`` header (10-fold form: each fold holds that
    many same pairs then that many different pairs), then ``name n1 n2`` (same) or ``name1 n1 name2 n2``."""
    with path.open(encoding="utf-8-sig") as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    per_fold = None
    if lines and len(lines[0][1]) in (1, 2) and all(t.isdigit() for t in lines[0][1]):
        head = lines.pop(0)[1]
        per_fold = int(head[-1]) * 2  # same + different pairs per fold
        folds = int(head[0]) if len(head) == 2 else 1
        if folds * per_fold != len(lines):
            raise PairsFormatError(
                f"{path}:1: header promises {folds} folds x {per_fold} pairs, the file has {len(lines)} pair lines"
            )
    for i, (n, parts) in enumerate(lines):
        where = f"{path}:{n}"
        fold = i // per_fold if per_fold else None
        if len(parts) == 3:
            yield Pair(lfw_image(parts[0], parts[1], where), lfw_image(parts[0], parts[2], where), True, fold)
        elif len(parts) == 4:
            yield Pair(lfw_image(parts[0], parts[1], where), lfw_image(parts[2], parts[3], where), False, fold)
        else:
            raise PairsFormatError(
                f"{where}: LFW lines are 'name n1 n2' or 'name1 n1 name2 n2', got {len(parts)} fields"
            )


def detect_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``lfw``, from the extension or, failing that, the first line."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    try:
        with path.open(encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
    except OSError as exc:
        raise PairsFormatError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PairsFormatError(f"{path}: not a text file") from None
    if first.lstrip().startswith("{"):
        return "jsonl"
    if first.strip().lower().replace(" ", "").startswith("a,b"):
        return "csv"
    tokens = first.split()
    if tokens and (all(t.isdigit() for t in tokens) or len(tokens) in (3, 4)):
        return "lfw"
    raise PairsFormatError(
        f"{path}:1: unknown pair-file format (expected CSV with header a,b[,label], JSONL, or LFW pairs.txt)"
    )


class PairFile:
    """A pair file, read lazily: iterate it as many times as needed (memory stays flat)."""

    def __init__(self, path: str | Path, fmt: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise PairsFormatError(f"{self.path}: no such file")
        self.format = fmt or detect_format(self.path)
        self._reader = {"csv": _csv, "jsonl": _jsonl, "lfw": _lfw}[self.format]

    def __iter__(self) -> Iterator[Pair]:
        try:
            yield from self._reader(self.path)
        except UnicodeDecodeError:
            raise PairsFormatError(f"{self.path}: not a UTF-8 text file") from None

    def validate(self) -> int:
        """Read the whole file once; returns the pair count or raises at the first broken line."""
        return sum(1 for _ in self)


def read_pairs(path: str | Path, fmt: str | None = None) -> list[Pair]:
    """All pairs of ``path`` as a list (format detected unless given); raises :class:`PairsFormatError`."""
    return list(PairFile(path, fmt))
