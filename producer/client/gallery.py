"""Producer side of enrolled identities: enqueue enroll / identify / verify-against-a-subject / forget jobs with
a :class:`~producer.client.FaceClient`, wait for their typed results, list galleries, and enroll a whole folder.

The functions take the client as their first argument (``FaceClient`` methods wrap them). Enqueueing works
exactly like the client's own embed/verify jobs (:meth:`FaceClient.submit <producer.client.FaceClient.submit>`:
same rq options, JSON serializer, retries); listing reads the gallery hashes straight from Redis
(:mod:`producer.contract.gallery` documents the layout). No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Unpack

import numpy as np

from producer.client.options import JobOptions, Options, build
from producer.contract.codes import ErrorCode
from producer.contract.errors import InputError
from producer.contract.gallery import (
    EmbeddingRef,
    EnrollBatchRequest,
    EnrollItem,
    EnrollRequest,
    ForgetRequest,
    GalleryRequest,
    GalleryVerifyRequest,
    IdentifyRequest,
    SubjectRef,
)
from producer.contract.gallery_results import GalleryInfo, SubjectInfo, result
from producer.contract.keys import DEFAULT_GALLERY, GALLERIES_KEY, embeddings_key, gallery_key, subjects_key
from producer.contract.results import encode_embedding
from producer.redisconn import redis_errors

if TYPE_CHECKING:
    from producer.client.face_client import FaceClient
    from producer.client.images import ImageInput


def Subject(subject: str, gallery: str = DEFAULT_GALLERY) -> SubjectRef:  # noqa: N802  (reads as a type at call sites)
    """``b`` for :func:`verify`: an enrolled subject, e.g. ``verify(client, image, Subject("alice"))``."""
    return build(SubjectRef, subject=subject, gallery=gallery)


def Embedding(vector: np.ndarray[Any, Any] | Sequence[float]) -> EmbeddingRef:  # noqa: N802
    """``b`` for :func:`verify`: a stored embedding (normalised by the worker)."""
    return build(EmbeddingRef, embedding_b64=encode_embedding(np.asarray(vector, np.float32).reshape(-1)))


# --- enqueue ---------------------------------------------------------------------------------------
def submit(client: FaceClient, request: GalleryRequest, job_id: str | None = None) -> str:
    """Enqueue a ready-made gallery request on the client's queue; returns the job id."""
    return client.submit(request, job_id)


def submit_many(client: FaceClient, requests: Iterable[GalleryRequest]) -> list[str]:
    """Enqueue many gallery requests in one round trip; returns the ids in order."""
    return client.submit_many(requests)


def enroll(
    client: FaceClient,
    subject: str,
    image: ImageInput,
    gallery: str = DEFAULT_GALLERY,
    *,
    enrollment_id: str | None = None,
    meta: dict[str, Any] | None = None,
    **options: Unpack[JobOptions],
) -> str:
    """Enqueue an enroll job: ``image``'s embedding is stored under ``subject`` in ``gallery``. Without an
    ``enrollment_id`` the worker derives one from the subject and the image, so enrolling the same image twice
    (or a retried job) stores it once. Returns the job id; its result
    is an :class:`~producer.contract.gallery.EnrollResult`."""
    o = Options(**options)
    image_ref = client.image_ref(image, o.as_path)
    fields = dict(subject=subject, gallery=gallery, enrollment_id=enrollment_id, meta=meta, **o.request_fields())
    return client.submit(build(EnrollRequest, image=image_ref, **fields), o.job_id)


def enroll_many(
    client: FaceClient,
    items: Iterable[tuple[str, ImageInput] | tuple[str, ImageInput, str | None]],
    gallery: str = DEFAULT_GALLERY,
    **options: Unpack[JobOptions],
) -> str:
    """Enqueue one ``enroll_batch`` job for ``(subject, image[, enrollment_id])`` items (one engine pass for all);
    its result (:class:`~producer.contract.gallery.EnrollBatchResult`) reports each item, failed ones in ``errors``."""
    o = Options(**options)
    entries = [
        build(EnrollItem, image=client.image_ref(it[1], o.as_path), subject=it[0], enrollment_id=_enrollment_id(it))
        for it in items
    ]
    return client.submit(build(EnrollBatchRequest, items=entries, gallery=gallery, **o.request_fields()), o.job_id)


def _enrollment_id(item: tuple[str, ImageInput] | tuple[str, ImageInput, str | None]) -> str | None:
    return item[2] if len(item) == 3 else None


def identify(
    client: FaceClient,
    image: ImageInput,
    gallery: str = DEFAULT_GALLERY,
    top_k: int = 5,
    *,
    threshold: float | None = None,
    **options: Unpack[JobOptions],
) -> str:
    """Enqueue an identify job (1:N): the ``top_k`` enrolled subjects closest to the face in ``image``, within
    ``threshold`` (default: the worker's). Its result is an :class:`~producer.contract.gallery.IdentifyResult`."""
    o = Options(**options)
    image_ref = client.image_ref(image, o.as_path)
    fields = dict(gallery=gallery, top_k=top_k, threshold=threshold, **o.request_fields())
    return client.submit(build(IdentifyRequest, image=image_ref, **fields), o.job_id)


def verify(
    client: FaceClient,
    image: ImageInput,
    b: SubjectRef | EmbeddingRef | ImageInput,
    *,
    threshold: float | None = None,
    **options: Unpack[JobOptions],
) -> str:
    """Enqueue a verify job of ``image`` against ``b``: a :func:`Subject` (the subject's closest enrollment), an
    :func:`Embedding`, or another image. Returns the job id."""
    o = Options(**options)
    target = b if isinstance(b, (SubjectRef, EmbeddingRef)) else client.image_ref(b, o.as_path)
    a = client.image_ref(image, o.as_path)
    request = build(GalleryVerifyRequest, a=a, b=target, threshold=threshold, **o.request_fields())
    return client.submit(request, o.job_id)


def verify_subject(
    client: FaceClient, image: ImageInput, subject: str, gallery: str = DEFAULT_GALLERY, **kwargs: Any
) -> str:
    """:func:`verify` against an enrolled subject (``kwargs``: :func:`verify`'s ``threshold`` and
    :class:`~producer.client.JobOptions`); the result is a :class:`~producer.contract.gallery.VerifySubjectResult`."""
    return verify(client, image, Subject(subject, gallery), **kwargs)


def forget(
    client: FaceClient,
    subject: str,
    gallery: str = DEFAULT_GALLERY,
    *,
    enrollment_id: str | None = None,
    ref: str | None = None,
    job_id: str | None = None,
) -> str:
    """Enqueue a forget job: delete ``subject`` (or only its ``enrollment_id``) from ``gallery`` in Redis and,
    within a second, from every worker's memory. Its result is a :class:`~producer.contract.gallery.ForgetResult`."""
    request = build(ForgetRequest, subject=subject, gallery=gallery, enrollment_id=enrollment_id, ref=ref)
    return client.submit(request, job_id)


# --- listing ---------------------------------------------------------------------------------------
def list_galleries(client: FaceClient) -> list[GalleryInfo]:
    """Every gallery in Redis with its model, dimension, subject and enrollment counts (one round trip for all)."""
    conn = client.connection
    with redis_errors("listing galleries"):
        names = sorted(n.decode() for n in conn.smembers(GALLERIES_KEY))  # type: ignore[union-attr]  # sync client
        with conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(gallery_key(name))
                pipe.hlen(subjects_key(name))
                pipe.hlen(embeddings_key(name))
            replies = pipe.execute()
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


def list_subjects(client: FaceClient, gallery: str = DEFAULT_GALLERY, limit: int | None = None) -> list[SubjectInfo]:
    """The subjects of ``gallery`` with their enrollment counts, sorted by subject (at most ``limit``, read with
    HSCAN so a large gallery is not read in one reply).
    :class:`~producer.contract.errors.InputError` for an unknown gallery."""
    conn = client.connection
    with redis_errors("listing subjects"):
        if not conn.exists(gallery_key(gallery)):
            known = sorted(n.decode() for n in conn.smembers(GALLERIES_KEY))  # type: ignore[union-attr]  # sync client
            raise InputError(
                ErrorCode.INVALID_PAYLOAD, f"no gallery {gallery!r} (galleries: {', '.join(known) or 'none yet'})"
            )
        found: list[SubjectInfo] = []
        for subject, count in conn.hscan_iter(subjects_key(gallery), count=1000):
            found.append(SubjectInfo(subject=subject.decode(), enrollments=int(count)))
            if limit is not None and len(found) >= limit:
                break
    return sorted(found, key=lambda s: s.subject)


__all__ = [
    "result",
    "Embedding",
    "Subject",
    "enroll",
    "enroll_many",
    "forget",
    "identify",
    "list_galleries",
    "list_subjects",
    "submit",
    "submit_many",
    "verify",
    "verify_subject",
]
