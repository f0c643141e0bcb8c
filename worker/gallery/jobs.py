"""Gallery jobs: turning a job's embeddings into its result with a :class:`worker.gallery.store.GalleryStore`
(:func:`complete`, :func:`complete_batch`, called after the engine by the batching worker and, one job at a time,
by :meth:`worker.runtime.Runtime.run_one`, the plain-rq path)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.gallery import (
    EmbeddingRef,
    EnrollBatchRequest,
    EnrollRequest,
    ForgetRequest,
    GalleryVerifyRequest,
    IdentifyRequest,
    SubjectRef,
    enrollment_id_for,
)
from producer.contract.gallery_results import (
    EnrollBatchResult,
    Enrolled,
    EnrollResult,
    ForgetResult,
    GalleryItemError,
    IdentifyResult,
    VerifySubjectResult,
)
from producer.contract.requests import VerifyRequest
from producer.contract.results import Timing, VerifyResult

if TYPE_CHECKING:
    from worker.gallery.store import GalleryStore

Result = dict[str, Any]


@dataclass
class GalleryItem:
    """One job handed to :meth:`GalleryStore.complete_batch`: its request, its rows of the batch's embeddings
    (in :func:`images_for` order; rows of failed images are ignored), the detected faces (``Face.as_dict()`` or
    None per image), its timing, and the failures of its images by index."""

    request: Any
    embeddings: np.ndarray
    faces: list[dict[str, Any] | None] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    failures: dict[int, JobFailure] = field(default_factory=dict)  # by image index: images that could not be embedded


def _matrix(item: GalleryItem, n: int) -> np.ndarray:
    emb = np.asarray(item.embeddings, np.float32)
    emb = emb.reshape(1, -1) if emb.ndim == 1 else emb
    if len(emb) != n:
        raise JobFailure(ErrorCode.INTERNAL_ERROR, f"{item.request.kind} job expects {n} embedding(s), got {len(emb)}")
    return emb


def _single(item: GalleryItem, n: int) -> np.ndarray:
    """The rows of a job that fails as a whole when one of its images failed (all but enroll_batch)."""
    for i in sorted(item.failures):
        failure = item.failures[i]
        if n == 2:
            raise JobFailure(failure.code, f"image {'ab'[i]}: {failure.message}")
        raise failure
    return _matrix(item, n)


def _face(item: GalleryItem, i: int) -> dict[str, Any] | None:
    return item.faces[i] if i < len(item.faces) else None


def complete(
    kind: str,
    request: Any,
    embeddings: np.ndarray,
    *,
    store: GalleryStore,
    failures: dict[int, JobFailure] | None = None,
    faces: Sequence[dict[str, Any] | None] = (),
    timing: Timing | None = None,
) -> Result:
    """The JSON-ready result of one gallery job, called by the batcher after the engine.

    ``embeddings``: the job's rows, one per :func:`images_for` image, in that order (rows of failed images are
    ignored: zeros will do). ``failures``: the images that could not be read, decoded or had no face, by index.
    Single-image kinds (and verify) raise their image's failure; ``enroll_batch`` reports failed items in
    ``errors``. Raises :class:`~producer.contract.codes.JobFailure` (gallery codes
    as :class:`~producer.contract.gallery.GalleryFailure`). For a whole batch use
    :meth:`GalleryStore.complete_batch`, which     searches all identify jobs of one gallery with one matrix product.
    """
    if getattr(request, "kind", None) != kind:
        sent = getattr(request, "kind", type(request).__name__)
        raise JobFailure(ErrorCode.INTERNAL_ERROR, f"a {sent!r} request completed as {kind!r}")
    item = GalleryItem(request, embeddings, list(faces), timing or Timing(), dict(failures or {}))
    out = complete_batch(store, [item])[0]
    if isinstance(out, JobFailure):
        raise out
    return out


def complete_batch(store: GalleryStore, items: Sequence[GalleryItem]) -> list[Result | JobFailure]:
    """Results (or failures) for a batch's gallery jobs, in order; all identify queries on one gallery are
    searched with one matrix product. A batch that searches (identify, verify against a subject) first brings
    the store up to what Redis holds now (:meth:`GalleryStore.sync`): a change whose result was readable when
    a job was taken is in its search, whichever worker made it, and subjects Redis lost are not."""
    if any(_searches(item.request) for item in items):
        store.sync()
    out: list[Result | JobFailure | None] = [None] * len(items)
    searches: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        try:
            if isinstance(item.request, IdentifyRequest):
                _single(item, 1)
                searches.setdefault(item.request.gallery, []).append(i)
            else:
                out[i] = _complete_one(store, item)
        except JobFailure as failure:
            out[i] = failure
    for gallery, members in searches.items():
        found = _identify(store, gallery, [items[i] for i in members])
        for i, result in zip(members, found, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]


def _searches(request: Any) -> bool:
    """Whether the job reads enrolled subjects: identify, or verify against a subject."""
    return isinstance(request, IdentifyRequest) or isinstance(getattr(request, "b", None), SubjectRef)


def _identify(store: GalleryStore, gallery: str, items: list[GalleryItem]) -> list[Result | JobFailure]:
    """The identify jobs on one gallery, searched with one matrix product."""
    reqs = [item.request for item in items]
    queries = np.stack([_single(item, 1)[0] for item in items])
    try:
        found = store.identify(gallery, queries, [r.top_k for r in reqs], [store.threshold_for(r) for r in reqs])
        searched = len(store.index_for(gallery, queries.shape[1]))
    except JobFailure as failure:
        return [failure] * len(items)
    return [
        IdentifyResult(
            gallery=gallery,
            matches=matches,
            top_k=req.top_k,
            threshold=store.threshold_for(req),
            searched=searched,
            model=store.model_name,
            ref=req.ref,
            face=_face(item, 0),
            timing=item.timing,
        ).model_dump(mode="json")
        for item, req, matches in zip(items, reqs, found, strict=True)
    ]


def _complete_one(store: GalleryStore, item: GalleryItem) -> Result:
    req = item.request
    if isinstance(req, EnrollRequest):
        return _enroll(store, item)
    if isinstance(req, EnrollBatchRequest):
        return _enroll_batch(store, item)
    if isinstance(req, ForgetRequest):
        _single(item, 0)
        store.check_model(req.gallery)  # the gallery belongs to its model's workers, for forgetting too
        forgot = store.forget(req.gallery, req.subject, req.enrollment_id)
        named: dict[str, Any] = {"gallery": req.gallery, "subject": req.subject, "enrollment_id": req.enrollment_id}
        return ForgetResult(**named, ref=req.ref, **asdict(forgot)).model_dump(mode="json")
    if isinstance(req, (GalleryVerifyRequest, VerifyRequest)):
        return _verify(store, item)
    raise JobFailure(ErrorCode.UNSUPPORTED_JOB, f"{type(req).__name__} is not a gallery job")


def _enroll(store: GalleryStore, item: GalleryItem) -> Result:
    req = item.request
    model = store.model_name
    vec = _single(item, 1)[0]
    outcome = store.enroll(req.gallery, req.subject, enrollment_id_for(req), vec, model, req.meta)
    return EnrollResult(
        gallery=req.gallery,
        subject=req.subject,
        model=model,
        dim=int(vec.size),
        ref=req.ref,
        face=_face(item, 0),
        timing=item.timing,
        **asdict(outcome),
    ).model_dump(mode="json")


def _verify(store: GalleryStore, item: GalleryItem) -> Result:
    """Verify against an enrolled subject, a given embedding, or a second image."""
    req = item.request
    threshold = store.threshold_for(req)
    model = store.model_name
    common: dict[str, Any] = dict(
        threshold=threshold, model=model, ref=req.ref, face_a=_face(item, 0), timing=item.timing
    )
    if isinstance(req.b, SubjectRef):
        found = store.verify_subject(req.b.gallery, req.b.subject, _single(item, 1)[0])
        return VerifySubjectResult(
            distance=found.distance,
            similar=found.distance <= threshold,
            subject=req.b.subject,
            gallery=req.b.gallery,
            enrollment_id=found.enrollment_id,
            enrollments=found.enrollments,
            **common,
        ).model_dump(mode="json")
    if isinstance(req.b, EmbeddingRef):
        a = _single(item, 1)[0]
        b = req.b.vector
        if b.size != a.size:
            raise JobFailure(
                ErrorCode.INVALID_PAYLOAD,
                f"b.embedding_b64 has {b.size} values; this worker's model ({model}) gives {a.size}",
            )
    else:
        a, b = _single(item, 2)
        common["face_b"] = _face(item, 1)
    d = float(1.0 - np.dot(a.astype(np.float64), b.astype(np.float64)))
    return VerifyResult(distance=d, similar=d <= threshold, **common).model_dump(mode="json")


def _enroll_batch(store: GalleryStore, item: GalleryItem) -> Result:
    req: EnrollBatchRequest = item.request
    rows = _matrix(item, len(req.items))
    store.check_gallery(req.gallery, rows.shape[1])  # a gallery of another model fails the whole job, not each item
    errors = [GalleryItemError(index=i, code=f.code, message=f.message) for i, f in sorted(item.failures.items())]
    todo = [i for i in range(len(req.items)) if i not in item.failures]
    entries = [(req.items[i].subject, enrollment_id_for(req.items[i]), rows[i], req.items[i].meta) for i in todo]
    results: list[Enrolled | None] = [None] * len(req.items)
    for i, outcome in zip(todo, store.enroll_many(req.gallery, entries, store.model_name), strict=True):
        if isinstance(outcome, JobFailure):
            errors.append(GalleryItemError(index=i, code=outcome.code, message=outcome.message))
        else:
            results[i] = Enrolled(subject=req.items[i].subject, **asdict(outcome))
    errors.sort(key=lambda e: e.index)
    faces = [_face(item, i) for i in range(len(req.items))]
    return EnrollBatchResult(
        gallery=req.gallery,
        count=len(req.items),
        results=results,
        errors=errors,
        model=store.model_name,
        dim=int(rows.shape[1]),
        ref=req.ref,
        faces=faces if any(faces) else None,
        timing=item.timing,
    ).model_dump(mode="json")
