"""Enrolled identities (issue 16): the worker-side gallery store on a real Redis, two stores standing for two
workers; 1:N search checked against a brute-force computation; :func:`worker.gallery.complete` for every kind."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest

import worker.gallery as wg
from producer.gallery import (
    GALLERY_FUNCTIONS, EVENTS_KEY, EVENTS_SEQ_KEY, EmbeddingRef, EnrollBatchRequest, EnrollBatchResult, EnrollItem, EnrollRequest, EnrollResult, ForgetRequest, ForgetResult, GalleryVerifyRequest,
    IdentifyRequest, IdentifyResult, SubjectRef, VerifySubjectResult, embeddings_key, enrollment_id_for, enrollments_key, gallery_key,
    parse_gallery_request, parse_gallery_result, subject_key, subjects_key,
)
from producer.jobs import (
    EMBED_FUNC, VERIFY_FUNC, ErrorCode, ImageRef, JobFailure, JSONSerializer, SafeJob, Timing, VerifyResult, cosine_distance, encode_embedding,
    parse_request,
)
from tests.conftest import FACERES_SAVEDMODEL, FACES, TFJS_MODELS, face_paths, needs_shared

BLAZEFACE = TFJS_MODELS / "blazeface-front.json"
from worker.gallery import GalleryItem, GalleryStore, complete, images_for, run_one

DIM = 64
IMG = ImageRef(path="x.png")


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(rng: np.random.Generator, v: np.ndarray, noise: float) -> np.ndarray:
    """Unit vectors near the rows of ``v``: noise of norm about ``noise`` (cosine distance about noise**2 / 2)."""
    w = v + (noise / np.sqrt(v.shape[1])) * rng.normal(size=v.shape).astype(np.float32)
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def model_name() -> str:
    """A model name of this test's own: a store only holds galleries bound to its model, so tests sharing the
    session's Redis never see each other's galleries."""
    return f"m-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def no_galleries(redis_server):
    """Each test starts with no galleries in the session's Redis (only these tests write gallery keys)."""
    conn = redis_server.client()
    keys = list(conn.scan_iter(match="arcface:galler*", count=1000))
    if keys:
        conn.delete(*keys)


@pytest.fixture()
def stores(redis_server):
    """Make started stores (each its own connection: one per 'worker'); all stopped at the end."""
    made: list[GalleryStore] = []

    def make(model: str | None, start: bool = True, **kw) -> GalleryStore:
        store = GalleryStore(redis_server.client(), model, **{"block_ms": 100, **kw})
        made.append(store)
        return store.start() if start else store

    yield make
    for s in made:
        s.stop()


def wait_until(predicate, timeout: float = 1.0) -> float:
    """Seconds until ``predicate()`` held; fails the test past ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not visible within {timeout}s")
        time.sleep(0.002)
    return time.monotonic() - start


def top_subjects(store: GalleryStore, gallery: str, q: np.ndarray, k: int = 5, threshold: float = 2.0) -> list[str]:
    return [m.subject for m in store.identify(gallery, q[None], k, threshold)[0]]


def brute_force(vectors: np.ndarray, subjects: list[str], eids: list[str], q: np.ndarray, k: int, threshold: float) -> list[tuple[str, float, str]]:
    """Best enrollment per subject by exhaustive float64 distances, within the threshold, closest first."""
    d = 1.0 - vectors.astype(np.float64) @ q.astype(np.float64)
    best: dict[str, tuple[float, str]] = {}
    for dist, s, e in zip(d, subjects, eids):
        if dist <= threshold and (s not in best or dist < best[s][0]):
            best[s] = (float(dist), e)
    ranked = sorted(best.items(), key=lambda kv: kv[1][0])[:k]
    return [(s, dist, e) for s, (dist, e) in ranked]


# --- two workers -----------------------------------------------------------------------------------
def test_enroll_and_forget_reach_the_other_worker_within_a_second(stores, model_name):
    rng = np.random.default_rng(1)
    a, b = stores(model_name), stores(model_name)
    v = unit(rng, 3)
    a.enroll("g1", "alice", "a1", v[0])
    assert top_subjects(a, "g1", v[0], 1) == ["alice"]  # the enrolling worker sees its own change at once
    seen = wait_until(lambda: a.seq == b.seq and top_subjects(b, "g1", v[0], 1) == ["alice"])
    a.enroll("g1", "bob", "b1", v[1])
    seen = max(seen, wait_until(lambda: top_subjects(b, "g1", v[1], 1) == ["bob"]))
    b.enroll("g1", "carol", "c1", v[2])  # and the other way round
    seen = max(seen, wait_until(lambda: top_subjects(a, "g1", v[2], 1) == ["carol"]))
    a.forget("g1", "alice")
    seen = max(seen, wait_until(lambda: "alice" not in top_subjects(b, "g1", v[0], 5)))
    assert "alice" not in top_subjects(a, "g1", v[0], 5)
    assert seen < 1.0
    with pytest.raises(JobFailure) as exc:
        b.verify_subject("g1", "alice", v[0])
    assert exc.value.code.value == "unknown_subject"


def test_a_new_worker_loads_the_galleries_from_redis(stores, model_name, redis_server):
    rng = np.random.default_rng(2)
    a = stores(model_name)
    v = unit(rng, 40)
    for i in range(40):
        a.enroll("people", f"s{i % 13}", f"e{i}", v[i], meta={"i": i})
    a.enroll("other", "x", "x1", v[0])
    a.forget("people", "s3")
    a.forget("people", "s4", "e4")
    a.stop()
    c = stores(model_name)  # started after all of it: nothing but Redis to learn from
    assert c.reloads == 1 and c.seq == int(redis_server.client().get(EVENTS_SEQ_KEY))
    kept = [i for i in range(40) if i % 13 != 3 and i != 4]
    index = c.index_for("people", DIM)
    assert sorted(index.eids) == sorted(f"e{i}" for i in kept)
    for i in kept:
        np.testing.assert_array_equal(index.vector(index.row_of[f"e{i}"]), v[i])
        assert index.subjects[index.row_subject[index.row_of[f"e{i}"]]] == f"s{i % 13}"
    assert c.stats()["other"]["enrollments"] == 1
    conn = redis_server.client()
    assert int(conn.hget(subjects_key("people"), "s4")) == conn.scard(subject_key("people", "s4")) == 3 - 1
    assert conn.hget(subjects_key("people"), "s3") is None and not conn.exists(subject_key("people", "s3"))
    assert conn.hlen(embeddings_key("people")) == conn.hlen(enrollments_key("people")) == len(kept)


def test_float16_worker_holds_half_the_bytes_and_ranks_the_same(stores, model_name):
    rng = np.random.default_rng(3)
    a = stores(model_name)
    v = unit(rng, 300)
    for i in range(300):
        a.enroll("h", f"s{i}", f"e{i}", v[i])
    h, f = stores(model_name, dtype="float16"), stores(model_name)  # both loaded from Redis: same capacity
    assert h.index_for("h", DIM).dtype == np.float16 and h.index_for("h", DIM).pages[0].dtype == np.float16
    assert h.index_for("h", DIM).nbytes() < 0.6 * f.index_for("h", DIM).nbytes()
    q = near(rng, v[:20], 0.3)
    for i in range(20):
        assert top_subjects(h, "h", q[i], 1) == top_subjects(a, "h", q[i], 1) == [f"s{i}"]
    # verify against a subject stays exact on a float16 worker (it reads the subject's float32 rows from Redis)
    assert h.verify_subject("h", "s5", q[5]).distance == pytest.approx(cosine_distance(q[5], v[5]), abs=1e-12)


def test_a_lost_event_makes_the_worker_reload(stores, model_name, redis_server):
    rng = np.random.default_rng(4)
    a, b = stores(model_name), stores(model_name)
    v = unit(rng, 3)
    a.enroll("gap", "x", "x1", v[0])
    wait_until(lambda: b.seq == a.seq)
    b.stop()
    a.enroll("gap", "y", "y1", v[1])
    lost = redis_server.client().xrevrange(EVENTS_KEY, count=1)[0][0]
    a.enroll("gap", "z", "z1", v[2])
    redis_server.client().xdel(EVENTS_KEY, lost)  # as if trimmed away while b was disconnected
    b.start(load=False)
    wait_until(lambda: b.reloads == 2 and b.seq == a.seq)
    assert sorted(b.index_for("gap", DIM).eids) == ["x1", "y1", "z1"]


def test_a_sequence_that_runs_backwards_also_reloads(stores, model_name, redis_server):
    """A Redis restored from an older AOF restarts the sequence: the worker notices and reloads."""
    rng = np.random.default_rng(5)
    a, b = stores(model_name), stores(model_name)
    v = unit(rng, 2)
    a.enroll("back", "x", "x1", v[0])
    wait_until(lambda: b.seq == a.seq)
    redis_server.client().incrby(EVENTS_SEQ_KEY, -1)  # the next event repeats a number b has applied
    a.enroll("back", "y", "y1", v[1])
    wait_until(lambda: b.reloads == 2)
    assert sorted(b.index_for("back", DIM).eids) == ["x1", "y1"]


# --- the gallery's rules -----------------------------------------------------------------------------
def test_enroll_is_idempotent_by_enrollment_id(stores, model_name, redis_server):
    rng = np.random.default_rng(6)
    a = stores(model_name)
    v = unit(rng, 2)
    first = a.enroll("idem", "alice", "e1", v[0], meta={"source": "signup"})
    again = a.enroll("idem", "alice", "e1", v[1])  # a re-run job: nothing changes, not even the vector
    assert (first.created, first.subject_enrollments, again.created, again.subject_enrollments) == (True, 1, False, 1)
    index = a.index_for("idem", DIM)
    assert index.n == 1
    np.testing.assert_array_equal(index.vector(0), v[0])
    seq = a.seq
    with pytest.raises(JobFailure) as exc:
        a.enroll("idem", "bob", "e1", v[1])
    assert exc.value.code.value == "enrollment_conflict" and "'alice'" in exc.value.message
    assert a.seq == seq and redis_server.client().hlen(embeddings_key("idem")) == 1  # refused changes write no event


def test_enrollment_id_derived_from_subject_and_image():
    req = EnrollRequest(image=ImageRef.inline(b"abc"), subject="alice")
    assert enrollment_id_for(req) == enrollment_id_for(EnrollRequest(image=ImageRef.inline(b"abc"), subject="alice"))
    assert enrollment_id_for(req) != enrollment_id_for(EnrollRequest(image=ImageRef.inline(b"abd"), subject="alice"))
    assert enrollment_id_for(req) != enrollment_id_for(EnrollRequest(image=ImageRef.inline(b"abc"), subject="bob"))
    assert enrollment_id_for(EnrollRequest(image=IMG, subject="a", enrollment_id="mine")) == "mine"


def test_a_gallery_is_bound_to_one_model_and_dimension(stores, model_name, redis_server):
    rng = np.random.default_rng(7)
    a = stores(model_name)
    a.enroll("bound", "alice", "e1", unit(rng, 1)[0])
    assert redis_server.client().hgetall(gallery_key("bound"))[b"model"] == model_name.encode()
    other = stores(model_name + "-other")
    for call in (lambda: other.enroll("bound", "bob", "e2", unit(rng, 1)[0]),
                 lambda: other.identify("bound", unit(rng, 1)),
                 lambda: other.verify_subject("bound", "alice", unit(rng, 1)[0]),
                 lambda: a.enroll("bound", "bob", "e3", unit(rng, 1, DIM * 2)[0]),  # same name, other dimension
                 lambda: a.identify("bound", unit(rng, 1, DIM * 2))):
        with pytest.raises(JobFailure) as exc:
            call()
        assert exc.value.code.value == "gallery_model_mismatch"
        assert "bound" in exc.value.message and model_name in exc.value.message
    assert "bound" not in other.stats()  # a worker never holds another model's galleries
    with pytest.raises(JobFailure) as exc:
        a.identify("nope", unit(rng, 1))
    assert exc.value.code.value == "unknown_gallery" and "'nope'" in exc.value.message
    with pytest.raises(JobFailure) as exc:
        a.forget("nope", "alice")
    assert exc.value.code.value == "unknown_gallery"


def test_forget_one_enrollment_or_the_subject(stores, model_name):
    rng = np.random.default_rng(8)
    a = stores(model_name)
    v = unit(rng, 4)
    for i in range(3):
        a.enroll("f", "alice", f"a{i}", v[i])
    a.enroll("f", "bob", "b0", v[3])
    assert (a.forget("f", "alice", "a1").removed, a.verify_subject("f", "alice", v[1]).enrollments) == (1, 2)
    assert a.forget("f", "alice", "a1").removed == 0  # already gone: idempotent
    assert a.forget("f", "alice", "b0").removed == 0  # not alice's
    out = a.forget("f", "alice")
    assert (out.removed, out.subject_enrollments) == (2, 0)
    assert top_subjects(a, "f", v[0]) == ["bob"]


# --- search ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,device", [("float32", "cpu"), ("float16", "cpu"), ("float32", "tf"), ("float16", "tf")])
def test_identify_is_exactly_the_brute_force_answer(stores, model_name, monkeypatch, dtype, device):
    monkeypatch.setattr(wg, "PAGE_ROWS", 97)  # several pages, uneven last one: the per-page top-k merge is exercised
    monkeypatch.setattr(wg, "F16_BLOCK_ROWS", 13)  # and float16 conversion slices within a page
    rng = np.random.default_rng(9)
    writer = stores(model_name)
    base = unit(rng, 120)
    vectors, subjects, eids = [], [], []
    for s in range(120):  # 1 to 4 enrollments per subject, close to the subject's base vector
        for j in range(1 + s % 4):
            vectors.append(near(rng, base[s : s + 1], 0.15)[0])
            subjects.append(f"s{s:03d}")
            eids.append(f"s{s:03d}-{j}")
    vectors = np.stack(vectors)
    for e, s, v in zip(eids, subjects, vectors):
        writer.enroll("bf", s, e, v)
    for e in eids[5:40:3]:  # some forgotten: rows moved around inside the matrix
        writer.forget("bf", subjects[eids.index(e)], e)
    kept = [i for i, e in enumerate(eids) if e not in set(eids[5:40:3])]
    vectors, subjects, eids = vectors[kept], [subjects[i] for i in kept], [eids[i] for i in kept]
    store = stores(model_name, dtype=dtype, device=device)
    stored = vectors.astype(np.float16).astype(np.float32) if dtype == "float16" else vectors  # what the worker holds
    queries = np.concatenate([near(rng, base[:20], 0.2), near(rng, base[:20], 0.8), near(rng, base[:20], 1.2), unit(rng, 8)])
    for top_k, threshold in ((5, 2.0), (3, 0.3), (10, 0.6), (1, 0.05)):
        found = store.identify("bf", queries, top_k, threshold)
        assert len(found) == len(queries)
        total = 0
        for q, matches in zip(queries, found):
            expected = brute_force(stored, subjects, eids, q, top_k, threshold)
            assert [(m.subject, m.enrollment_id) for m in matches] == [(s, e) for s, _, e in expected]
            np.testing.assert_allclose([m.distance for m in matches], [d for _, d, _ in expected], rtol=0, atol=1e-12)
            assert all(m.distance <= threshold for m in matches)
            total += len(matches)
        assert total > 0  # every setting returns matches somewhere: the comparison is not vacuous
    # per-query top_k / threshold in one product
    mixed = store.identify("bf", queries[:4], [1, 2, 3, 4], [0.3, 0.4, 2.0, 0.05])
    for i, (k, t) in enumerate(zip([1, 2, 3, 4], [0.3, 0.4, 2.0, 0.05])):
        assert [m.subject for m in mixed[i]] == [s for s, _, _ in brute_force(stored, subjects, eids, queries[i], k, t)]


def test_paged_index_matches_a_plain_model_through_adds_and_removes(monkeypatch):
    """Pages of 7 rows: growing, moving the last row into a freed one across pages, overwriting, reading back."""
    monkeypatch.setattr(wg, "PAGE_ROWS", 7)
    rng = np.random.default_rng(18)
    index = wg.GalleryIndex("p", "m", DIM, "float32")
    model: dict[str, tuple[str, np.ndarray]] = {}
    for step in range(400):
        op = rng.integers(0, 4)
        if op < 2 or not model:
            eid, subject, vec = f"e{rng.integers(0, 60)}", f"s{rng.integers(0, 12)}", unit(rng, 1)[0]
            assert index.add(eid, subject, vec) == (eid not in model)
            model[eid] = (subject, vec)
        elif op == 2:
            eid = sorted(model)[rng.integers(0, len(model))]
            assert index.remove(eid) and not index.remove(eid)
            del model[eid]
        else:
            eids = [f"b{step}-{i}" for i in range(int(rng.integers(1, 20)))]
            vecs = unit(rng, len(eids))
            assert index.add_many(eids, ["bulk"] * len(eids), vecs) == len(eids)
            model.update({e: ("bulk", v) for e, v in zip(eids, vecs)})
        assert index.n == len(model) and index.capacity >= index.n and all(len(p) <= 7 for p in index.pages)
    rows = np.array([index.row_of[e] for e in model])
    np.testing.assert_array_equal(index.vectors(rows), np.stack([v for _, v in model.values()]))
    assert [index.subjects[index.row_subject[r]] for r in rows] == [s for s, _ in model.values()]
    for subject in {s for s, _ in model.values()}:
        assert sorted(index.eids[r] for r in index.rows_of(subject)) == sorted(e for e, (s, _) in model.items() if s == subject)
    for k, page in enumerate(index.pages):  # rows past n are zero
        assert not page[max(0, index.n - k * 7) :].any()
    e, (s, v) = next(iter(model.items()))
    assert index.search(v[None], 1, 0.01)[0][0].enrollment_id == e


def test_one_subject_with_many_enrollments_does_not_crowd_out_the_others(stores, model_name):
    rng = np.random.default_rng(10)
    a = stores(model_name)
    q = unit(rng, 1)[0]
    for j in range(50):  # 50 near-copies of the query under one subject
        a.enroll("crowd", "many", f"m{j}", near(rng, q[None], 0.05)[0])
    others = near(rng, np.repeat(q[None], 4, 0), 0.6)
    for j, v in enumerate(others):
        a.enroll("crowd", f"o{j}", f"o{j}", v)
    matches = a.identify("crowd", q[None], 5, 2.0)[0]
    assert [m.subject for m in matches][0] == "many" and len(matches) == 5
    assert sorted(m.subject for m in matches[1:]) == ["o0", "o1", "o2", "o3"]


def test_verify_subject_is_the_closest_enrollment(stores, model_name):
    rng = np.random.default_rng(11)
    a = stores(model_name)
    v = unit(rng, 3)
    for i in range(3):
        a.enroll("vs", "alice", f"a{i}", v[i])
    q = near(rng, v[1:2], 0.3)[0]
    got = a.verify_subject("vs", "alice", q)
    assert got.distance == min(cosine_distance(q, v[i]) for i in range(3)) and got.enrollment_id == "a1" and got.enrollments == 3
    with pytest.raises(JobFailure) as exc:
        a.verify_subject("vs", "mallory", q)
    assert exc.value.code.value == "unknown_subject" and "'mallory'" in exc.value.message


# --- complete(): what the batcher calls after the engine ----------------------------------------------------
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
    assert (res.enrollment_id, res.model, res.ref, res.face, res.timing) == (enrollment_id_for(enroll), model_name, "r1", face, timing)
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

    by_embedding = GalleryVerifyRequest(a=IMG, b=EmbeddingRef(embedding_b64=encode_embedding(v[0] * 3.0)))  # normalised on use
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


@pytest.mark.parametrize("request_, rows, code", [
    (IdentifyRequest(image=IMG, gallery="missing"), 1, "unknown_gallery"),
    (GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="nobody", gallery="e")), 1, "unknown_subject"),
    (GalleryVerifyRequest(a=IMG, b=EmbeddingRef(embedding_b64=encode_embedding(np.ones(DIM + 1)))), 1, "invalid_payload"),
    (ForgetRequest(subject="x", gallery="missing"), 0, "unknown_gallery"),
    (EnrollRequest(image=IMG, subject="alice", gallery="e"), 2, "internal_error"),  # a batcher handing over the wrong rows
])
def test_complete_fails_with_codes(stores, model_name, request_, rows, code):
    rng = np.random.default_rng(13)
    store = stores(model_name)
    store.enroll("e", "alice", "a", unit(rng, 1)[0])
    with pytest.raises(JobFailure) as exc:
        complete(request_.kind, request_, unit(rng, rows), store=store)
    assert exc.value.code.value == code
    assert exc.value.to_error().model_dump(mode="json") == {"code": code, "message": exc.value.message}  # what job.meta stores


def test_complete_fails_with_model_mismatch(stores, model_name):
    rng = np.random.default_rng(14)
    stores(model_name).enroll("mm", "alice", "a", unit(rng, 1)[0])
    other = stores(model_name + "-b")
    req = EnrollRequest(image=IMG, subject="bob", gallery="mm")
    with pytest.raises(JobFailure) as exc:
        complete("enroll", req, unit(rng, 1), store=other)
    assert exc.value.code.value == "gallery_model_mismatch"


def test_complete_batch_searches_each_gallery_once_and_matches_one_by_one(stores, model_name, monkeypatch):
    rng = np.random.default_rng(15)
    store = stores(model_name)
    v = unit(rng, 20)
    for i in range(20):
        store.enroll("b1" if i < 10 else "b2", f"s{i}", f"e{i}", v[i])
    q = near(rng, v, 0.3)
    items = [GalleryItem(IdentifyRequest(image=IMG, gallery="b1" if i < 10 else "b2", top_k=1 + i % 3), q[i : i + 1]) for i in range(20)]
    items.insert(5, GalleryItem(IdentifyRequest(image=IMG, gallery="missing"), q[:1]))
    items.insert(9, GalleryItem(GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="s3", gallery="b1")), q[3:4]))
    one_by_one = [store.complete_batch([it])[0] for it in items]
    products = []
    real = wg.GalleryIndex.candidates
    monkeypatch.setattr(wg.GalleryIndex, "candidates", lambda self, qs, *a: products.append((self.name, len(qs))) or real(self, qs, *a))
    batched = store.complete_batch(items)
    assert sorted(products) == [("b1", 10), ("b2", 10)]  # one product per gallery for the whole batch
    for x, y in zip(batched, one_by_one):
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
        ("s0", True, 1), ("s1", True, 1), ("s0", True, 2), ("s1", True, 2), ("s2", True, 1)]
    assert sorted(store.index_for("eb", DIM).eids) == ["e0", "e1", "e3", "e4", "e5"]
    assert redis_server.client().hlen(embeddings_key("eb")) == 5
    again = parse_gallery_result(complete("enroll_batch", req, rows, store=store))  # a re-run: nothing new, e2 now enrolled
    assert [r.created for r in again.results if r] == [False, False, True, False, False, False]
    with pytest.raises(JobFailure) as exc:  # a gallery of another model fails the whole job
        complete("enroll_batch", req, rows, store=stores(model_name + "-b"))
    assert exc.value.code.value == "gallery_model_mismatch"


def test_complete_passes_an_image_failure_through(stores, model_name):
    rng = np.random.default_rng(17)
    store = stores(model_name)
    bad = JobFailure(ErrorCode.IMAGE_DECODE_ERROR, "not an image")
    for req in (EnrollRequest(image=IMG, subject="a", gallery="pf"), IdentifyRequest(image=IMG, gallery="pf"),
                GalleryVerifyRequest(a=IMG, b=SubjectRef(subject="a", gallery="pf"))):
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


# --- through rq: the client functions, the CLI and bulk enrollment ---------------------------------------------
_SERVING: dict[str, Any] = {}


def _serve_job(*args: Any, **kwargs: Any) -> dict:
    """The plain-rq path for the gallery kinds (what worker/jobs.py's functions do for embed/verify)."""
    from rq import get_current_job

    from worker.jobs import record_failure

    job = get_current_job()
    b = args[0].get("b") if args and isinstance(args[0], dict) else None
    try:
        if job.func_name == EMBED_FUNC or (job.func_name == VERIFY_FUNC and not (isinstance(b, dict) and ({"subject", "embedding_b64"} & set(b)))):
            return _SERVING["runtime"].run_one(parse_request(job.func_name, list(args), kwargs))  # embed and pairwise verify as they are
        return run_one(_SERVING["runtime"], _SERVING["store"], parse_gallery_request(job.func_name, list(args), kwargs))
    except JobFailure as failure:
        record_failure(job, failure)
        raise


class _GalleryJob(SafeJob):
    """SafeJob resolving the gallery functions (and embed/verify) to :func:`_serve_job`."""

    @property
    def func(self) -> Any:
        if self.func_name not in GALLERY_FUNCTIONS | {EMBED_FUNC, VERIFY_FUNC}:
            raise JobFailure(ErrorCode.UNSUPPORTED_JOB, f"function {self.func_name!r} is not an ArcFace job")
        return _serve_job


def drive(connection: Any, queue: str, fn: Any) -> Any:
    """Run ``fn`` (the producer side) in a thread while a real rq SimpleWorker serves ``queue`` in this one."""
    from rq import Queue, SimpleWorker

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    q = Queue(queue, connection=connection, serializer=JSONSerializer, job_class=_GalleryJob)
    while thread.is_alive():
        SimpleWorker([q], connection=connection, serializer=JSONSerializer, job_class=_GalleryJob).work(burst=True, logging_level="WARNING")
        thread.join(0.02)
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture()
def serving(worker_env, engine, redis_server, stores):
    """A FaceClient on this test's queue, served through rq by a runtime on the session's ArcFace engine and a
    gallery store (random weights: the same image gives the same embedding, which is all these tests need)."""
    from producer.client import FaceClient
    from worker.runtime import Runtime
    from worker.settings import WorkerSettings

    _SERVING["runtime"] = Runtime(WorkerSettings(), engine)
    _SERVING["store"] = stores(engine.model.name, threshold=engine.model.threshold)
    yield FaceClient(), redis_server.client(), worker_env["ARCFACE_QUEUE"]
    _SERVING.clear()


def test_client_functions_through_rq(serving):
    from producer import gallery_client as gc
    from producer.errors import JobFailed

    client, conn, queue = serving
    faces = face_paths()  # amy1..5, bernadette1..5, ...

    def producer() -> dict:
        out: dict[str, Any] = {}
        out["enroll"] = gc.result(client, gc.enroll(client, "amy", faces[0], "c", meta={"source": "test"}))
        out["again"] = gc.result(client, gc.enroll(client, "amy", faces[0], "c"))
        out["batch"] = gc.result(client, gc.enroll_many(client, [("amy", faces[1]), ("bernadette", faces[5]), ("bernadette", b"not an image")], "c"))
        out["identify"] = gc.result(client, gc.identify(client, faces[5], "c", top_k=2, threshold=2.0))
        out["subject"] = gc.result(client, gc.verify_subject(client, faces[2], "amy", "c"))
        out["pairs"] = [gc.result(client, gc.verify(client, faces[2], faces[i])) for i in (0, 1)]
        embedded = client.result(client.embed(faces[0]))
        out["embedding"] = gc.result(client, gc.verify(client, faces[2], gc.Embedding(embedded.embedding)))
        out["galleries"] = gc.list_galleries(client)
        out["subjects"] = gc.list_subjects(client, "c")
        for name, call in (("unknown_gallery", lambda: gc.identify(client, faces[0], "nope")),
                           ("unknown_subject", lambda: gc.verify_subject(client, faces[0], "mallory", "c"))):
            with pytest.raises(JobFailed) as exc:
                gc.result(client, call())
            out[name] = exc.value
        out["forget"] = gc.result(client, gc.forget(client, "amy", "c"))
        out["after"] = gc.result(client, gc.identify(client, faces[0], "c", threshold=2.0))
        return out

    out = drive(conn, queue, producer)
    assert isinstance(out["enroll"], EnrollResult) and out["enroll"].created and not out["again"].created
    assert out["enroll"].enrollment_id == out["again"].enrollment_id  # derived from subject + image: the same image is one enrollment
    batch = out["batch"]
    assert [r is not None for r in batch.results] == [True, True, False]
    assert [(e.index, e.code.value) for e in batch.errors] == [(2, "image_decode_error")]
    assert [(m.subject, round(m.distance, 5)) for m in out["identify"].matches][0] == ("bernadette", 0.0)
    subject = out["subject"]
    assert isinstance(subject, VerifySubjectResult) and subject.enrollments == 2
    assert abs(subject.distance - min(p.distance for p in out["pairs"])) < 1e-6  # = pairwise verify with the closer enrollment
    assert abs(out["embedding"].distance - out["pairs"][0].distance) < 1e-6
    assert [(g.name, g.subjects, g.enrollments) for g in out["galleries"]] == [("c", 2, 3)]
    assert [(s.subject, s.enrollments) for s in out["subjects"]] == [("amy", 2), ("bernadette", 1)]
    assert out["unknown_gallery"].code.value == "unknown_gallery" and "'nope'" in str(out["unknown_gallery"])
    assert out["unknown_subject"].code.value == "unknown_subject"
    assert out["forget"].removed == 2 and [m.subject for m in out["after"].matches] == ["bernadette"]


def test_bulk_enrollment_from_a_folder_and_the_cli(serving, tmp_path, capsys):
    import csv
    import json
    import shutil

    from producer.gallery_cli import run

    client, conn, queue = serving
    root = tmp_path / "people"
    for path in face_paths():
        if path.stem[-1] in "12":  # two images of each of the 8 people
            (root / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / path.parent.name / path.name)
    (root / "amy" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "amy" / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "enrolled.csv"
    folder = ["enroll", "--folder", str(root), "--out", str(out), "--gallery", "bulk", "--window", "2", "--json"]

    err: list[str] = []

    def cli(*argv: str) -> tuple[int, str]:
        code = drive(conn, queue, lambda: run(list(argv)))
        captured = capsys.readouterr()
        err.append(captured.err)
        return code, captured.out

    code, text = cli(*folder, "--per-job", "4")
    assert code == 1 and json.loads(text) | {"seconds": 0} == {"images": 17, "skipped": 0, "enrolled": 16, "already": 0, "failed": 1,
                                                              "seconds": 0, "gallery": "bulk", "out": str(out)}
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 17 and [r["image"] for r in rows if r["error"]] == ["amy/broken.jpg"]
    assert {r["error"] for r in rows} == {"", "image_decode_error"} and all(r["enrollment_id"] == r["image"] for r in rows)

    shutil.copy(face_paths()[2], root / "amy" / "broken.jpg")  # fixed: a rerun enrolls only that one (single enroll jobs here)
    code, text = cli(*folder, "--per-job", "1")
    assert code == 0 and (json.loads(text)["skipped"], json.loads(text)["enrolled"], json.loads(text)["failed"]) == (16, 1, 0)
    code, text = cli(*folder)
    assert code == 0 and (json.loads(text)["skipped"], json.loads(text)["enrolled"]) == (17, 0)
    assert sum(1 for _ in csv.DictReader(out.open())) == 18  # the failed row stays, the retry appended its own

    code, text = cli("gallery", "--json")
    assert code == 0 and [(g["name"], g["subjects"], g["enrollments"]) for g in json.loads(text)["galleries"]] == [("bulk", 8, 17)]
    code, text = cli("gallery", "bulk")
    assert code == 0 and text.splitlines()[0] == "amy: 3 enrollment(s)" and len(text.splitlines()) == 8
    code, text = cli("identify", str(face_paths()[5]), "--gallery", "bulk", "--top-k", "2", "--threshold", "2", "--wait", "--json")
    matches = json.loads(text)["result"]["matches"]
    assert code == 0 and len(matches) == 2 and matches[0]["subject"] == "bernadette" and matches[0]["distance"] < 1e-5
    code, text = cli("forget", "amy", "--gallery", "bulk", "--wait")
    assert code == 0 and "forgot amy in gallery bulk: 3 enrollment(s) removed, 0 left" in text
    code, text = cli("enroll", "bob", str(face_paths()[0]), "--gallery", "bulk", "--wait")
    assert code == 0 and "bob enrolled in gallery bulk (new;" in text
    code, text = cli("identify", str(face_paths()[0]), "--gallery", "nowhere", "--wait", "--json")
    assert code == 1 and json.loads(text)["code"] == "unknown_gallery"
    code, _ = cli("enroll", "--gallery", "bulk")
    assert code == 2 and "enroll needs SUBJECT" in err[-1]


@needs_shared(BLAZEFACE, "the shared BlazeFace detector")
@needs_shared(FACERES_SAVEDMODEL)
def test_real_faces_enroll_one_image_each_and_identify_the_others(redis_server, stores, monkeypatch, capsys):
    """The shared face model behind BlazeFace (the README's faceres settings): image 1 of each of the 8 people
    enrolled in one enroll_batch job, images 2-5 identified; verify against the subject equals pairwise verify;
    a worker started afterwards finds the same people."""
    from producer import gallery_client as gc
    from producer.client import FaceClient
    from tests.conftest import PEOPLE
    from worker.runtime import Runtime, load_detector, load_engine
    from worker.settings import WorkerSettings

    queue = f"faceres-{uuid.uuid4().hex[:6]}"
    env = {"ARCFACE_REDIS_URL": redis_server.url, "ARCFACE_QUEUE": queue, "ARCFACE_MODEL_PATH": str(FACERES_SAVEDMODEL),
           "ARCFACE_MODEL_NAME": "faceres", "ARCFACE_INPUT_SCALE": "1", "ARCFACE_INPUT_MEAN": "103.939,116.779,123.68",
           "ARCFACE_CHANNEL_ORDER": "BGR", "ARCFACE_THRESHOLD": "0.45", "ARCFACE_DETECT": "blazeface", "ARCFACE_DETECTOR_PATH": str(BLAZEFACE),
           "ARCFACE_CROP": "square", "ARCFACE_ALLOWED_BATCH_SIZES": "1,8"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = WorkerSettings()
    engine = load_engine(settings)
    _SERVING["runtime"] = Runtime(settings, engine, load_detector(settings))
    _SERVING["store"] = stores("faceres", threshold=0.45)
    client = FaceClient()
    paths = face_paths()
    try:
        def producer() -> tuple:
            enrolled = gc.result(client, gc.enroll_many(client, [(person, paths[5 * i]) for i, person in enumerate(PEOPLE)], "cast"), 300)
            ids = [gc.identify(client, paths[5 * i + j], "cast", top_k=8, threshold=2.0) for i in range(8) for j in range(1, 5)]
            found = [gc.result(client, jid, 300) for jid in ids]
            by_subject = [gc.result(client, gc.verify_subject(client, paths[5 * i + 1], PEOPLE[i], "cast"), 300) for i in range(3)]
            pairwise = [client.result(client.verify(paths[5 * i + 1], paths[5 * i]), 300) for i in range(3)]
            return enrolled, found, by_subject, pairwise

        enrolled, found, by_subject, pairwise = drive(redis_server.client(), queue, producer)
        assert enrolled.errors == [] and all(r.created for r in enrolled.results) and enrolled.faces and all(enrolled.faces)
        truth = [PEOPLE[i] for i in range(8) for _ in range(4)]
        assert all([m.subject for m in res.matches] and len(res.matches) == 8 for res in found)  # threshold 2: every subject, ranked
        top1 = sum(1 for res, who in zip(found, truth) if res.matches[0].subject == who) / len(truth)
        genuine = [m.distance for res, who in zip(found, truth) for m in res.matches if m.subject == who]
        impostor = sorted((round(m.distance, 3), who, m.subject) for res, who in zip(found, truth) for m in res.matches if m.subject != who)
        within = [x for x in impostor if x[0] <= 0.45]
        with capsys.disabled():
            print(f"\nfaceres, gallery of 8 (image 1 each), 32 queries (images 2-5): top-1 {top1:.3f}; genuine distance max "
                  f"{max(genuine):.3f}, {sum(d <= 0.45 for d in genuine)}/32 within 0.45; impostor distance min {impostor[0][0]:.3f}, "
                  f"{len(within)}/{len(impostor)} within 0.45: {within}")
        assert top1 >= 0.9
        for s_res, p_res in zip(by_subject, pairwise):
            assert abs(s_res.distance - p_res.distance) < 1e-6 and s_res.similar == p_res.similar
        later = stores("faceres", threshold=0.45)  # a worker started after the enrollments
        queries = np.stack([later.index_for("cast", engine.model.embedding_dim).vector(later.index_for("cast", engine.model.embedding_dim).row_of[r.enrollment_id])
                            for r in enrolled.results])
        assert [m[0].subject for m in later.identify("cast", queries, 1)] == PEOPLE
    finally:
        _SERVING.clear()
