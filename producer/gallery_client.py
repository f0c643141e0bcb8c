"""Producer side of enrolled identities: enqueue enroll / identify / verify-against-a-subject / forget jobs with
a :class:`~producer.client.FaceClient`, wait for their typed results, list galleries, and enroll a whole folder.

The functions take the client as their first argument (``FaceClient`` methods wrap them). Enqueueing works
exactly like the client's own embed/verify jobs (same rq options, JSON serializer, retries); listing reads the
gallery hashes straight from Redis (:mod:`producer.gallery` documents the layout). No TensorFlow here.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import redis
from pydantic import ValidationError
from rq import Queue, Retry
from rq.results import Result

from producer.errors import InputError, JobFailed, JobNotFound, RedisUnavailable, ResultTimeout
from producer.gallery import (
    DEFAULT_GALLERY,
    GALLERIES_KEY,
    EmbeddingRef,
    EnrollBatchRequest,
    EnrollBatchResult,
    EnrollItem,
    EnrollRequest,
    ForgetRequest,
    GalleryInfo,
    GalleryJobError,
    GalleryRequest,
    GalleryResult,
    GalleryVerifyRequest,
    IdentifyRequest,
    SubjectInfo,
    SubjectRef,
    embeddings_key,
    gallery_func_for,
    gallery_key,
    parse_gallery_result,
    subjects_key,
)
from producer.jobs import ERROR_META_KEY, ErrorCode, JSONSerializer, SafeJob, encode_embedding
from producer.settings import redact

_BLOCK_CHUNK_MS = 2000
_FINAL_FAILURES = {Result.Type.FAILED, Result.Type.STOPPED, Result.Type.MAX_RETRIES_EXCEEDED}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def Subject(subject: str, gallery: str = DEFAULT_GALLERY) -> SubjectRef:  # noqa: N802  (reads as a type at call sites)
    """``b`` for :func:`verify`: an enrolled subject, e.g. ``verify(client, image, Subject("alice"))``."""
    return _validated(SubjectRef, subject=subject, gallery=gallery)


def Embedding(vector: np.ndarray | Sequence[float]) -> EmbeddingRef:  # noqa: N802
    """``b`` for :func:`verify`: a stored embedding (normalised by the worker)."""
    return _validated(EmbeddingRef, embedding_b64=encode_embedding(np.asarray(vector, np.float32).reshape(-1)))


def _validated(cls: Any, **fields: Any) -> Any:
    try:
        return cls(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise InputError(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']}") from None


def _redis_error(what: str, exc: redis.RedisError) -> RedisUnavailable:
    kind = "unreachable" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) else "refused the command"
    return RedisUnavailable(f"Redis {kind} while {what}: {redact(str(exc)) or type(exc).__name__}")


# --- enqueue ---------------------------------------------------------------------------------------
def _job_options(client: Any, request: GalleryRequest, job_id: str | None) -> dict[str, Any]:
    s = client.settings
    return dict(
        args=(request.model_dump(mode="json", exclude_none=True),),
        timeout=s.job_timeout,
        result_ttl=s.result_ttl,
        failure_ttl=s.failure_ttl,
        retry=Retry(max=s.retries) if s.retries else None,
        job_id=job_id,
        description=request.kind + (f" ref={request.ref}" if request.ref else ""),
    )


def submit(client: Any, request: GalleryRequest, job_id: str | None = None) -> str:
    """Enqueue a ready-made gallery request on the client's queue; returns the job id."""
    try:
        return client.queue.enqueue_call(gallery_func_for(request), **_job_options(client, request, job_id)).id
    except redis.RedisError as exc:
        raise _redis_error("enqueueing", exc) from None


def submit_many(client: Any, requests: Iterable[GalleryRequest]) -> list[str]:
    """Enqueue many gallery requests in one round trip; returns the ids in order."""
    datas = [Queue.prepare_data(gallery_func_for(r), **_job_options(client, r, None)) for r in requests]
    try:
        return [job.id for job in client.queue.enqueue_many(datas)] if datas else []
    except redis.RedisError as exc:
        raise _redis_error("enqueueing", exc) from None


def enroll(
    client: Any,
    subject: str,
    image: Any,
    gallery: str = DEFAULT_GALLERY,
    *,
    enrollment_id: str | None = None,
    meta: dict | None = None,
    model: str | None = None,
    detect: str | None = None,
    as_path: bool = False,
    ref: str | None = None,
    job_id: str | None = None,
) -> str:
    """Enqueue an enroll job: ``image``'s embedding is stored under ``subject`` in ``gallery``. Without an
    ``enrollment_id`` the worker derives one from the subject and the image, so enrolling the same image twice
    (or a retried job) stores it once. Returns the job id; its result is an :class:`~producer.gallery.EnrollResult`."""
    req = _validated(
        EnrollRequest,
        image=client.image_ref(image, as_path),
        subject=subject,
        gallery=gallery,
        enrollment_id=enrollment_id,
        meta=meta,
        model=model,
        detect=detect,
        ref=ref,
    )
    return submit(client, req, job_id)


def enroll_many(
    client: Any,
    items: Iterable[tuple[str, Any] | tuple[str, Any, str | None]],
    gallery: str = DEFAULT_GALLERY,
    *,
    model: str | None = None,
    detect: str | None = None,
    as_path: bool = False,
    ref: str | None = None,
    job_id: str | None = None,
) -> str:
    """Enqueue one ``enroll_batch`` job for ``(subject, image[, enrollment_id])`` items (one engine pass for all);
    its result (:class:`~producer.gallery.EnrollBatchResult`) reports each item, failed ones in ``errors``."""
    entries = [
        EnrollItem(image=client.image_ref(it[1], as_path), subject=it[0], enrollment_id=it[2] if len(it) > 2 else None)  # type: ignore[misc]
        for it in items
    ]
    return submit(
        client,
        _validated(EnrollBatchRequest, items=entries, gallery=gallery, model=model, detect=detect, ref=ref),
        job_id,
    )


def identify(
    client: Any,
    image: Any,
    gallery: str = DEFAULT_GALLERY,
    top_k: int = 5,
    *,
    threshold: float | None = None,
    model: str | None = None,
    detect: str | None = None,
    as_path: bool = False,
    ref: str | None = None,
    job_id: str | None = None,
) -> str:
    """Enqueue an identify job (1:N): the ``top_k`` enrolled subjects closest to the face in ``image``, within
    ``threshold`` (default: the worker's). Its result is an :class:`~producer.gallery.IdentifyResult`."""
    req = _validated(
        IdentifyRequest,
        image=client.image_ref(image, as_path),
        gallery=gallery,
        top_k=top_k,
        threshold=threshold,
        model=model,
        detect=detect,
        ref=ref,
    )
    return submit(client, req, job_id)


def verify(
    client: Any,
    image: Any,
    b: Any,
    *,
    threshold: float | None = None,
    model: str | None = None,
    detect: str | None = None,
    as_path: bool = False,
    ref: str | None = None,
    job_id: str | None = None,
) -> str:
    """Enqueue a verify job of ``image`` against ``b``: a :func:`Subject` (the subject's closest enrollment), an
    :func:`Embedding`, or another image. Returns the job id."""
    target = b if isinstance(b, (SubjectRef, EmbeddingRef)) else client.image_ref(b, as_path)
    req = _validated(
        GalleryVerifyRequest,
        a=client.image_ref(image, as_path),
        b=target,
        threshold=threshold,
        model=model,
        detect=detect,
        ref=ref,
    )
    return submit(client, req, job_id)


def verify_subject(client: Any, image: Any, subject: str, gallery: str = DEFAULT_GALLERY, **kwargs: Any) -> str:
    """:func:`verify` against an enrolled subject; the result is a :class:`~producer.gallery.VerifySubjectResult`."""
    return verify(client, image, Subject(subject, gallery), **kwargs)


def forget(
    client: Any,
    subject: str,
    gallery: str = DEFAULT_GALLERY,
    *,
    enrollment_id: str | None = None,
    ref: str | None = None,
    job_id: str | None = None,
) -> str:
    """Enqueue a forget job: delete ``subject`` (or only its ``enrollment_id``) from ``gallery`` in Redis and,
    within a second, from every worker's memory. Its result is a :class:`~producer.gallery.ForgetResult`."""
    return submit(
        client,
        _validated(ForgetRequest, subject=subject, gallery=gallery, enrollment_id=enrollment_id, ref=ref),
        job_id,
    )


# --- results ---------------------------------------------------------------------------------------
def _error(client: Any, job_id: str, latest: Result) -> GalleryJobError:
    try:
        job = SafeJob.fetch(job_id, connection=client.connection, serializer=JSONSerializer)
        stored = job.meta.get(ERROR_META_KEY)
        if stored:
            return GalleryJobError.model_validate(stored)
    except Exception:  # the job hash expired, or meta is not ours: fall back to the client's reading of rq's record
        pass
    err = client.error(job_id, latest)
    return GalleryJobError(code=err.code, message=err.message)


def result(client: Any, job_id: str, timeout: float | None = None) -> GalleryResult:
    """Block until a gallery job (or a verify job) finishes and return its typed result (an XREAD on rq's result
    stream). Raises :class:`~producer.errors.JobFailed` (``.code`` may be a gallery code), ``ResultTimeout``,
    ``JobNotFound`` or ``RedisUnavailable``, like :meth:`FaceClient.result`."""
    client.status(job_id)  # JobNotFound for an unknown id
    timeout = client.settings.wait_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    key, last_id = Result.get_key(job_id), "0-0"
    backoff = 0.0
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        try:
            block = {"block": min(remaining_ms, _BLOCK_CHUNK_MS)} if remaining_ms > 0 else {}
            response = client.connection.xread({key: last_id}, **block)
            backoff = 0.0
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise _redis_error("waiting for the result", exc) from None
            backoff = min(backoff * 2, 5.0) if backoff else 0.25
            time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            continue
        if not response:
            if remaining_ms <= 0:
                raise ResultTimeout(
                    job_id, f"job {job_id} has no result after {timeout:g}s (status {client.status(job_id)})"
                )
            continue
        latest: Result | None = None
        for rid, payload in response[0][1]:
            last_id = rid
            latest = Result.restore(
                job_id, rid.decode(), payload, connection=client.connection, serializer=JSONSerializer
            )
        if latest is None:
            continue
        if latest.type == Result.Type.SUCCESSFUL:
            try:
                return parse_gallery_result(latest.return_value)
            except (ValueError, ValidationError):
                raise JobNotFound(
                    job_id, f"job {job_id} finished with a value that is not a gallery or verify result"
                ) from None
        if latest.type in _FINAL_FAILURES:
            raise JobFailed(job_id, _error(client, job_id, latest))  # type: ignore[arg-type]


# --- listing ---------------------------------------------------------------------------------------
def list_galleries(client: Any) -> list[GalleryInfo]:
    """Every gallery in Redis with its model, dimension, subject and enrollment counts (one round trip for all)."""
    conn = client.connection
    try:
        names = sorted(n.decode() for n in conn.smembers(GALLERIES_KEY))
        with conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(gallery_key(name))
                pipe.hlen(subjects_key(name))
                pipe.hlen(embeddings_key(name))
            replies = pipe.execute()
    except redis.RedisError as exc:
        raise _redis_error("listing galleries", exc) from None
    out = []
    for i, name in enumerate(names):
        info, subjects, enrollments = replies[3 * i : 3 * i + 3]
        if b"model" not in info:
            continue
        out.append(
            GalleryInfo(
                name=name,
                model=info[b"model"].decode(),
                dim=int(info[b"dim"]),
                created_at=float(info.get(b"created_at", 0)),
                subjects=subjects,
                enrollments=enrollments,
            )
        )
    return out


def list_subjects(client: Any, gallery: str = DEFAULT_GALLERY, limit: int | None = None) -> list[SubjectInfo]:
    """The subjects of ``gallery`` with their enrollment counts, sorted by subject (at most ``limit``, read with
    HSCAN so a large gallery is not read in one reply). :class:`~producer.errors.InputError` for an unknown gallery."""
    conn = client.connection
    try:
        if not conn.exists(gallery_key(gallery)):
            known = sorted(n.decode() for n in conn.smembers(GALLERIES_KEY))
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"no gallery {gallery!r} (galleries: {', '.join(known) or 'none yet'})"
            )
        found: list[SubjectInfo] = []
        for subject, count in conn.hscan_iter(subjects_key(gallery), count=1000):
            found.append(SubjectInfo(subject=subject.decode(), enrollments=int(count)))
            if limit is not None and len(found) >= limit:
                break
    except redis.RedisError as exc:
        raise _redis_error("listing subjects", exc) from None
    return sorted(found, key=lambda s: s.subject)


# --- bulk enrollment from a folder --------------------------------------------------------------------------
BULK_COLUMNS = ["subject", "image", "enrollment_id", "created", "subject_enrollments", "error", "message"]


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


def scan_folder(root: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[tuple[str, str]]:
    """``(subject, image)`` for every ``root/<subject>/<image>`` with an image suffix, sorted; ``image`` is the
    path relative to ``root`` (``alice/1.jpg``), also the enrollment id. Hidden entries are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(ErrorCode.INVALID_PAYLOAD, f"{root}: not a directory (expected root/<subject>/<image>)")
    found = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(subject_dir.iterdir()):
            if image.is_file() and not image.name.startswith(".") and image.suffix.lower() in suffixes:
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


def bulk_enroll(
    client: Any,
    root: Path,
    out: Path,
    options: BulkEnrollOptions = BulkEnrollOptions(),
    on_progress: Callable[[BulkEnrollStats], None] | None = None,
) -> BulkEnrollStats:
    """Enroll every ``root/<subject>/<image>`` into ``options.gallery``: ``enroll_batch`` jobs of ``per_job``
    images, at most ``window`` in flight, one CSV row per image appended to ``out`` as results arrive.

    Resume: rerunning with the same ``out`` skips the images already enrolled (their rows have no error) and
    tries the failed ones again. Enrollment ids are the image paths (``alice/1.jpg``), so even a repeated image
    is stored once.
    """
    start = time.monotonic()
    root, out = Path(root), Path(out)
    stats = BulkEnrollStats()
    images = scan_folder(root)
    stats.images = len(images)
    done = _done_images(out)
    todo = [(s, im) for s, im in images if im not in done]
    stats.skipped = len(images) - len(todo)
    new_file = not out.exists() or out.stat().st_size == 0
    in_flight: list[tuple[str, list[tuple[str, str]]]] = []  # (job id, its items), oldest first
    with out.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(BULK_COLUMNS)
            f.flush()

        def write(
            subject: str, image: str, eid: str, created: Any, count: Any, code: str = "", message: str = ""
        ) -> None:
            writer.writerow([subject, image, eid, created, count, code, message])
            if code:
                stats.failed += 1
            elif created:
                stats.enrolled += 1
            else:
                stats.already += 1

        def collect() -> None:
            job_id, items = in_flight.pop(0)
            try:
                res = result(client, job_id, timeout=options.job_timeout_s)
            except JobFailed as exc:
                for subject, image in items:
                    write(subject, image, image, "", "", exc.error.code.value, exc.error.message)
            except ResultTimeout as exc:
                for subject, image in items:
                    write(subject, image, image, "", "", ErrorCode.JOB_TIMEOUT.value, exc.message)
            else:
                rows = res.results if isinstance(res, EnrollBatchResult) else [res]
                errors = {e.index: e for e in getattr(res, "errors", [])}
                for k, (subject, image) in enumerate(items):
                    if k in errors:
                        write(subject, image, image, "", "", errors[k].code.value, errors[k].message)
                    else:
                        r = rows[k]
                        write(subject, image, r.enrollment_id, int(r.created), r.subject_enrollments)  # type: ignore[union-attr]
            f.flush()
            if on_progress:
                on_progress(stats)

        for i in range(0, len(todo), max(1, options.per_job)):
            chunk = todo[i : i + max(1, options.per_job)]
            refs, sendable = [], []
            for subject, image in chunk:
                try:
                    refs.append(
                        client.image_ref(image if options.shared_root else root / image, as_path=options.shared_root)
                    )
                    sendable.append((subject, image))
                except InputError as exc:
                    write(subject, image, image, "", "", exc.code.value, exc.message)
            if not sendable:
                continue
            if options.per_job == 1:
                req: GalleryRequest = EnrollRequest(
                    image=refs[0],
                    subject=sendable[0][0],
                    enrollment_id=sendable[0][1],
                    gallery=options.gallery,
                    detect=options.detect,
                )  # type: ignore[arg-type]
            else:
                req = EnrollBatchRequest(
                    gallery=options.gallery,
                    detect=options.detect,  # type: ignore[arg-type]
                    items=[EnrollItem(image=r, subject=s, enrollment_id=im) for r, (s, im) in zip(refs, sendable)],
                )
            in_flight.append((submit(client, req), sendable))
            while len(in_flight) >= options.window:
                collect()
        while in_flight:
            collect()
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
            f"\r{n}/{total} images ({stats.enrolled} new, {stats.already} already, {stats.failed} failed), {rate:.1f} img/s, "
            f"ETA {left / rate:.0f}s "
            if rate
            else ""
        )
        stream.flush()

    return show


__all__ = [
    "BULK_COLUMNS",
    "BulkEnrollOptions",
    "BulkEnrollStats",
    "Embedding",
    "Subject",
    "bulk_enroll",
    "enroll",
    "enroll_many",
    "forget",
    "identify",
    "list_galleries",
    "list_subjects",
    "result",
    "scan_folder",
    "submit",
    "submit_many",
    "verify",
    "verify_subject",
]
