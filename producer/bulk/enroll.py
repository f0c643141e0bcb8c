"""Bulk enrollment from a folder ``root/<subject>/<image>``: ``enroll_batch`` jobs with a bounded window, one
CSV row per image appended as results arrive, resumable (``arcface-producer enroll --folder``).

:mod:`producer.client.gallery` re-exports every name.
"""

from __future__ import annotations

import csv
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from producer.client.options import build
from producer.contract.codes import ErrorCode
from producer.contract.errors import InputError, JobFailed, JobNotFound, ResultTimeout
from producer.contract.gallery import EnrollBatchRequest, EnrollItem, EnrollRequest, GalleryRequest
from producer.contract.gallery_results import EnrollBatchResult, EnrollResult
from producer.contract.keys import DEFAULT_GALLERY
from producer.contract.requests import ImageRef

if TYPE_CHECKING:
    from producer.client.face_client import FaceClient

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BULK_COLUMNS = ["subject", "image", "enrollment_id", "created", "subject_enrollments", "error", "message"]
Item = tuple[str, str]  # (subject, image path relative to the root: also the enrollment id)


@dataclass
class BulkEnrollOptions:
    gallery: str = DEFAULT_GALLERY
    per_job: int = 32  # images per enroll_batch job (1: one enroll job per image)
    window: int = 8  # jobs in flight
    shared_root: bool = False  # send paths relative to the workers' ARCFACE_SHARED_ROOT instead of bytes
    detect: str | None = None
    job_timeout_s: float = 600.0


@dataclass
class BulkEnrollStats:
    images: int = 0  # images found in the folder
    skipped: int = 0  # enrolled by an earlier run (rows in --out without an error)
    enrolled: int = 0  # newly stored by this run
    already: int = 0  # stored before (same enrollment id): nothing changed
    failed: int = 0
    seconds: float = 0.0


def scan_folder(root: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Item]:
    """``(subject, image)`` for every ``root/<subject>/<image>`` with an image suffix, sorted; ``image`` is the
    path relative to ``root`` (``alice/1.jpg``), also the enrollment id. Hidden entries and directories are
    skipped; anything else with an image suffix is listed (a FIFO or a device named ``x.jpg`` gets a failed row
    when it is read, rather than being passed over in silence)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(ErrorCode.INVALID_PAYLOAD, f"{root}: not a directory (expected root/<subject>/<image>)")
    found = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(subject_dir.iterdir()):
            if not image.is_dir() and not image.name.startswith(".") and image.suffix.lower() in suffixes:
                found.append((subject_dir.name, f"{subject_dir.name}/{image.name}"))
    return found


def _done_images(out: Path) -> set[str]:
    """Images with a row without an error in ``out`` (a torn last line is cut off so appending stays valid)."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        out.write_bytes(data[: data.rfind(b"\n") + 1])
    with out.open(newline="") as f:
        return {row["image"] for row in csv.DictReader(f) if not row.get("error")}


class _EnrollRun:
    """The jobs in flight and the CSV rows of one :func:`bulk_enroll` run."""

    def __init__(
        self,
        client: FaceClient,
        root: Path,
        options: BulkEnrollOptions,
        f: IO[str],
        stats: BulkEnrollStats,
        on_progress: Callable[[BulkEnrollStats], None] | None,
    ) -> None:
        self.client, self.root, self.options = client, root, options
        self.f, self.writer = f, csv.writer(f)
        self.stats = stats
        self.on_progress = on_progress
        self.in_flight: deque[tuple[str, list[Item]]] = deque()  # (job id, its items), oldest first

    def write(self, item: Item, eid: str, created: Any, count: Any, code: str = "", message: str = "") -> None:
        self.writer.writerow([*item, eid, created, count, code, message])
        if code:
            self.stats.failed += 1
        elif created:
            self.stats.enrolled += 1
        else:
            self.stats.already += 1

    def fail(self, items: list[Item], code: str, message: str) -> None:
        for item in items:
            self.write(item, item[1], "", "", code, message)

    def send(self, chunk: list[Item]) -> None:
        """Enqueue one job for the images of ``chunk`` that can be sent; a row for each that cannot."""
        refs: list[ImageRef] = []
        sendable: list[Item] = []
        for subject, image in chunk:
            path = image if self.options.shared_root else self.root / image
            try:
                refs.append(self.client.image_ref(path, as_path=self.options.shared_root))
                sendable.append((subject, image))
            except InputError as exc:
                self.fail([(subject, image)], exc.code.value, exc.message)
        if sendable:
            self.in_flight.append((self.client.submit(self._request(refs, sendable)), sendable))

    def _request(self, refs: list[ImageRef], items: list[Item]) -> GalleryRequest:
        o = self.options
        if o.per_job == 1:
            (subject, image), image_ref = items[0], refs[0]
            return build(
                EnrollRequest, image=image_ref, subject=subject, enrollment_id=image, gallery=o.gallery, detect=o.detect
            )
        pairs = zip(refs, items, strict=True)
        entries = [build(EnrollItem, image=r, subject=s, enrollment_id=im) for r, (s, im) in pairs]
        return build(EnrollBatchRequest, gallery=o.gallery, detect=o.detect, items=entries)

    def collect(self) -> None:
        """Wait for the oldest job in flight and write its rows."""
        job_id, items = self.in_flight.popleft()
        try:
            res = self.client.result(job_id, timeout=self.options.job_timeout_s)
            if not isinstance(res, (EnrollResult, EnrollBatchResult)):
                raise JobNotFound(job_id, f"job {job_id} finished with a value that is not an enroll result")
        except JobFailed as exc:
            self.fail(items, exc.error.code.value, exc.error.message)
        except ResultTimeout as exc:
            self.fail(items, ErrorCode.JOB_TIMEOUT.value, exc.message)
        else:
            self._write_results(items, res)
        self.f.flush()
        if self.on_progress:
            self.on_progress(self.stats)

    def _write_results(self, items: list[Item], res: EnrollResult | EnrollBatchResult) -> None:
        rows = res.results if isinstance(res, EnrollBatchResult) else [res]
        errors = {e.index: e for e in getattr(res, "errors", [])}
        for k, item in enumerate(items):
            error, row = errors.get(k), rows[k]
            if error is not None:
                self.write(item, item[1], "", "", error.code.value, error.message)
            elif row is None:
                self.write(item, item[1], "", "", ErrorCode.INTERNAL_ERROR.value, "the job reported nothing for it")
            else:
                self.write(item, row.enrollment_id, int(row.created), row.subject_enrollments)


def bulk_enroll(
    client: FaceClient,
    root: Path,
    out: Path,
    options: BulkEnrollOptions | None = None,
    on_progress: Callable[[BulkEnrollStats], None] | None = None,
) -> BulkEnrollStats:
    """Enroll every ``root/<subject>/<image>`` into ``options.gallery``: ``enroll_batch`` jobs of ``per_job``
    images, at most ``window`` in flight, one CSV row per image appended to ``out`` as results arrive.

    Resume: rerunning with the same ``out`` skips the images already enrolled (their rows have no error) and
    tries the failed ones again. Enrollment ids are the image paths (``alice/1.jpg``), so even a repeated image
    is stored once.
    """
    options = options or BulkEnrollOptions()
    start = time.monotonic()
    root, out = Path(root), Path(out)
    images = scan_folder(root)
    done = _done_images(out)
    todo = [(s, im) for s, im in images if im not in done]
    stats = BulkEnrollStats(images=len(images), skipped=len(images) - len(todo))
    new_file = not out.exists() or out.stat().st_size == 0
    per_job = max(1, options.per_job)
    with out.open("a", newline="") as f:
        run = _EnrollRun(client, root, options, f, stats, on_progress)
        if new_file:
            run.writer.writerow(BULK_COLUMNS)
            f.flush()
        for i in range(0, len(todo), per_job):
            run.send(todo[i : i + per_job])
            while len(run.in_flight) >= options.window:
                run.collect()
        while run.in_flight:
            run.collect()
    stats.seconds = time.monotonic() - start
    return stats


def progress_printer(total: int, stream: Any = None) -> Callable[[BulkEnrollStats], None] | None:
    """A one-line progress display on stderr (a terminal only)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None
    t0 = time.monotonic()

    def show(stats: BulkEnrollStats) -> None:
        n = stats.enrolled + stats.already + stats.failed
        rate = n / max(time.monotonic() - t0, 1e-6)
        left = total - n
        stream.write(
            f"\r{n}/{total} images ({stats.enrolled} new, {stats.already} already, {stats.failed} failed), "
            f"{rate:.1f} img/s, ETA {left / rate:.0f}s "
            if rate
            else ""
        )
        stream.flush()

    return show
