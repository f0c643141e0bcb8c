"""Enrolled identities: :func:`worker.gallery.complete`, what the batcher calls after the engine, for every
gallery kind, its failures, and :meth:`~worker.gallery.GalleryStore.complete_batch` (one product per gallery)."""

from __future__ import annotations

import numpy as np
import pytest

import worker.gallery as wg
from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.gallery import (
    EmbeddingRef,
    EnrollBatchRequest,
    EnrollItem,
    EnrollRequest,
    ForgetRequest,
    GalleryVerifyRequest,
    IdentifyRequest,
    SubjectRef,
    enrollment_id_for,
)
from producer.contract.gallery_results import (
    EnrollBatchResult,
    EnrollResult,
    ForgetResult,
    IdentifyResult,
    VerifySubjectResult,
    parse_gallery_result,
)
from producer.contract.keys import embeddings_key
from producer.contract.metric import cosine_distance
from producer.contract.requests import ImageRef
from producer.contract.results import Timing, VerifyResult, encode_embedding
from tests.gallery_support import DIM, IMG, near, unit
from worker.gallery import GalleryItem, complete, images_for

pytest_plugins = ["tests.gallery_fixtures"]  # fixtures: model_name, stores (each test starts with no galleries)


def test_complete_every_kind(stores, model_name):
    rng = np.random.default_rng(12)
    store = stores(model_name, threshold=0.4)
    v = unit(rng, 3)
    timing = Timing(queued_ms=1.0, batch_size=3, inference_ms=2.0)
    face = {"box": [1, 2, 3, 4], "score": 0.9}

    enroll = EnrollRequest(image=IMG, subject="alice", gallery="c", meta={"k": 1}, ref="r1")
    assert len(images_for(enroll)) == 1
    out = complete("enroll", enroll, v[:1], store=store, timing=timing, faces=[face])
    res = parse_gallery_result(out)
    assert isinstance(res, EnrollResult) and res.created and res.subject_enrollments == 1 and res.dim == DIM
    expected = (enrollment_id_for(enroll), model_name, "r1", face, timing)
    assert (res.enrollment_id, res.model, res.ref, res.face, res.timing) == expected
    assert parse_gallery_result(complete("enroll", enroll, v[:1], store=store)).created is False

    ident = IdentifyRequest(image=IMG, gallery="c", top_k=3)
    res = parse_gallery_result(complete("identify", ident, near(rng, v[:1], 0.1), store=store, timing=timing))
    assert isinstance(res, IdentifyResult) and [m.subject for m in res.matches] == ["alice"]
    assert (res.threshold, res.searched, res.top_k, res.model) == (0.4, 1, 3, model_name)
    assert parse_gallery_result(complete("identify", ident, v[1:2], store=store)).matches == []  # beyond the threshold

    q = near(rng, v[:1], 0.2)
    by_subject = GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="alice", gallery="c"), threshold=0.5)
    assert len(images_for(by_subject)) == 1
    res = parse_gallery_result(complete("verify", by_subject, q, store=store, faces=[face]))
    assert isinstance(res, VerifySubjectResult) and res.face_a == face
    assert abs(res.distance - cosine_distance(q[0], v[0])) < 1e-12 and res.similar == (res.distance <= 0.5)
    assert (res.subject, res.gallery, res.enrollments, res.threshold) == ("alice", "c", 1, 0.5)

    by_embedding = GalleryVerifyRequest(a=IMG, b=EmbeddingRef(embedding_b64=encode_embedding(v[0] * 3.0)))
    # (normalised on use)
    res = parse_gallery_result(complete("verify", by_embedding, q, store=store))
    assert type(res) is VerifyResult and abs(res.distance - cosine_distance(q[0], v[0])) < 1e-6 and res.threshold == 0.4

    pair = GalleryVerifyRequest(a=IMG, b=ImageRef(path="y.png"))
    assert len(images_for(pair)) == 2
    res = parse_gallery_result(complete("verify", pair, np.stack([q[0], v[0]]), store=store, faces=[face, None]))
    assert abs(res.distance - cosine_distance(q[0], v[0])) < 1e-12 and (res.face_a, res.face_b) == (face, None)

    forget = ForgetRequest(subject="alice", gallery="c")
    assert images_for(forget) == []
    res = parse_gallery_result(complete("forget", forget, np.empty((0, DIM), np.float32), store=store))
    assert isinstance(res, ForgetResult) and (res.removed, res.subject_enrollments) == (1, 0)


TOO_LONG = encode_embedding(np.ones(DIM + 1))


@pytest.mark.parametrize(
    "request_, rows, code",
    [
        (IdentifyRequest(image=IMG, gallery="missing"), 1, "unknown_gallery"),
        (GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="nobody", gallery="e")), 1, "unknown_subject"),
        (GalleryVerifyRequest(a=IMG, b=EmbeddingRef(embedding_b64=TOO_LONG)), 1, "invalid_payload"),
        (ForgetRequest(subject="x", gallery="missing"), 0, "unknown_gallery"),
        # a batcher handing over the wrong rows
        (EnrollRequest(image=IMG, subject="alice", gallery="e"), 2, "internal_error"),
    ],
)
def test_complete_fails_with_codes(stores, model_name, request_, rows, code):
    rng = np.random.default_rng(13)
    store = stores(model_name)
    store.enroll("e", "alice", "a", unit(rng, 1)[0])
    with pytest.raises(JobFailure) as exc:
        complete(request_.kind, request_, unit(rng, rows), store=store)
    assert exc.value.code.value == code
    # what job.meta stores
    assert exc.value.to_error().model_dump(mode="json") == {"code": code, "message": exc.value.message}


def test_complete_fails_with_model_mismatch(stores, model_name):
    rng = np.random.default_rng(14)
    stores(model_name).enroll("mm", "alice", "a", unit(rng, 1)[0])
    other = stores(model_name + "-b")
    req = EnrollRequest(image=IMG, subject="bob", gallery="mm")
    with pytest.raises(JobFailure) as exc:
        complete("enroll", req, unit(rng, 1), store=other)
    assert exc.value.code.value == "gallery_model_mismatch"


def test_complete_batch_searches_each_gallery_once_and_matches_one_by_one(stores, model_name, monkeypatch):
    store = stores(model_name)
    rng = np.random.default_rng(15)
    v = unit(rng, 20)
    for i in range(20):
        store.enroll("b1" if i < 10 else "b2", f"s{i}", f"e{i}", v[i])
    q = near(rng, v, 0.3)
    items = [
        GalleryItem(IdentifyRequest(image=IMG, gallery="b1" if i < 10 else "b2", top_k=1 + i % 3), q[i : i + 1])
        for i in range(20)
    ]
    items.insert(5, GalleryItem(IdentifyRequest(image=IMG, gallery="missing"), q[:1]))
    items.insert(9, GalleryItem(GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="s3", gallery="b1")), q[3:4]))
    one_by_one = [store.complete_batch([it])[0] for it in items]
    products = []
    real = wg.GalleryIndex.candidates

    def counted(self, qs, *a):
        products.append((self.name, len(qs)))
        return real(self, qs, *a)

    monkeypatch.setattr(wg.GalleryIndex, "candidates", counted)
    batched = store.complete_batch(items)
    assert sorted(products) == [("b1", 10), ("b2", 10)]  # one product per gallery for the whole batch
    for x, y in zip(batched, one_by_one, strict=True):
        if isinstance(x, JobFailure):
            assert isinstance(y, JobFailure) and x.code == y.code
        else:
            assert x == y
    assert [type(x).__name__ for x in batched].count("GalleryFailure") == 1
    assert sum(1 for x in batched if isinstance(x, dict) and x["kind"] == "identify" and x["matches"]) >= 15


def test_complete_enroll_batch_enrolls_item_by_item(stores, model_name, redis_server):
    rng = np.random.default_rng(16)
    store = stores(model_name)
    items = [EnrollItem(image=IMG, subject=f"s{i % 3}", enrollment_id=f"e{i}", meta={"i": i}) for i in range(6)]
    items.append(EnrollItem(image=IMG, subject="x", enrollment_id="e0"))  # e0 is s0's: conflict
    req = EnrollBatchRequest(gallery="eb", items=items, ref="bulk-1")
    assert len(images_for(req)) == 7
    rows = unit(rng, 7)
    failures = {2: JobFailure(ErrorCode.NO_FACE_DETECTED, "no face")}
    res = parse_gallery_result(complete("enroll_batch", req, rows, store=store, failures=failures))
    assert isinstance(res, EnrollBatchResult) and (res.count, res.dim, res.ref) == (7, DIM, "bulk-1")
    assert [(e.index, e.code.value) for e in res.errors] == [(2, "no_face_detected"), (6, "enrollment_conflict")]
    assert [r is None for r in res.results] == [False, False, True, False, False, False, True]
    assert [(r.subject, r.created, r.subject_enrollments) for r in res.results if r] == [
        ("s0", True, 1),
        ("s1", True, 1),
        ("s0", True, 2),
        ("s1", True, 2),
        ("s2", True, 1),
    ]
    assert sorted(store.index_for("eb", DIM).eids) == ["e0", "e1", "e3", "e4", "e5"]
    assert redis_server.client().hlen(embeddings_key("eb")) == 5
    again = parse_gallery_result(complete("enroll_batch", req, rows, store=store))  # a re-run: e2 now enrolled
    assert [r.created for r in again.results if r] == [False, False, True, False, False, False]
    with pytest.raises(JobFailure) as exc:  # a gallery of another model fails the whole job
        complete("enroll_batch", req, rows, store=stores(model_name + "-b"))
    assert exc.value.code.value == "gallery_model_mismatch"


def test_complete_passes_an_image_failure_through(stores, model_name):
    rng = np.random.default_rng(17)
    store = stores(model_name)
    bad = JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "not an image")
    for req in (
        EnrollRequest(image=IMG, subject="a", gallery="pf"),
        IdentifyRequest(image=IMG, gallery="pf"),
        GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="a", gallery="pf")),
    ):
        with pytest.raises(JobFailure) as exc:
            complete(req.kind, req, np.zeros((1, DIM), np.float32), store=store, failures={0: bad})
        assert (exc.value.code, exc.value.message) == (bad.code, bad.message)
    pair = GalleryVerifyRequest(a=IMG, b=ImageRef(path="y.png"))
    with pytest.raises(JobFailure) as exc:
        complete("verify", pair, unit(rng, 2), store=store, failures={1: bad})
    assert exc.value.code == bad.code and exc.value.message == "image b: not an image"
    with pytest.raises(JobFailure) as exc:
        complete("identify", EnrollRequest(image=IMG, subject="a", gallery="pf"), unit(rng, 1), store=store)
    assert exc.value.code.value == "internal_error"
    assert "pf" not in store.stats()  # nothing was enrolled by the failed jobs
