"""Enrolled identities (issue 16): the worker-side gallery store on a real Redis, two stores standing for two
workers; 1:N search checked against a brute-force computation. :func:`worker.gallery.complete` is tested in
tests/test_gallery_complete.py, the rq path, the CLI and real faces in tests/test_gallery_rq.py."""

from __future__ import annotations

import numpy as np
import pytest

import worker.gallery as wg
import worker.gallery.index as gi
from producer.contract.codes import JobFailure
from producer.contract.gallery import EnrollRequest, enrollment_id_for
from producer.contract.keys import (
    EVENTS_KEY,
    EVENTS_SEQ_KEY,
    embeddings_key,
    enrollments_key,
    gallery_key,
    subject_key,
    subjects_key,
)
from producer.contract.metric import cosine_distance
from producer.contract.requests import ImageRef
from tests.gallery_support import DIM, IMG, near, top_subjects, unit, wait_until

pytest_plugins = ["tests.gallery_fixtures"]  # fixtures: model_name, stores (each test starts with no galleries)


def brute_force(
    vectors: np.ndarray, subjects: list[str], eids: list[str], q: np.ndarray, k: int, threshold: float
) -> list[tuple[str, float, str]]:
    """Best enrollment per subject by exhaustive float64 distances, within the threshold, closest first."""
    d = 1.0 - vectors.astype(np.float64) @ q.astype(np.float64)
    best: dict[str, tuple[float, str]] = {}
    for dist, s, e in zip(d, subjects, eids, strict=True):
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


def _second_worker_caught_up(stores, model_name: str, seed: int, gallery: str, n: int):
    """Two stores (two workers) and ``n`` random unit vectors: ``x`` enrolled as ``x1`` with ``v[0]`` through the
    first, and the second has applied that event."""
    a, b = stores(model_name), stores(model_name)
    v = unit(np.random.default_rng(seed), n)
    a.enroll(gallery, "x", "x1", v[0])
    wait_until(lambda: b.seq == a.seq)
    return a, b, v


def test_a_lost_event_makes_the_worker_reload(stores, model_name, redis_server):
    a, b, v = _second_worker_caught_up(stores, model_name, 4, "gap", 3)
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
    a, b, v = _second_worker_caught_up(stores, model_name, 5, "back", 2)
    redis_server.client().incrby(EVENTS_SEQ_KEY, -1)  # the next event repeats a number b has applied
    a.enroll("back", "y", "y1", v[1])
    wait_until(lambda: b.reloads == 2)
    assert sorted(b.index_for("back", DIM).eids) == ["x1", "y1"]


def test_sync_applies_every_change_written_before_it_without_the_follower(stores, model_name, redis_server):
    """What an identify job does first: a change whose result is out is in the search, whichever worker made
    it, even when this worker's events follower is behind (here stopped)."""
    a, b, v = _second_worker_caught_up(stores, model_name, 7, "sync", 3)
    b.stop()
    a.enroll("sync", "y", "y1", v[1])
    a.enroll("sync", "z", "z1", v[2])
    a.forget("sync", "x")
    assert sorted(b.index_for("sync", DIM).eids) == ["x1"]
    b.sync()
    written = int(redis_server.client().get(EVENTS_SEQ_KEY))
    assert (sorted(b.index_for("sync", DIM).eids), b.seq, b.reloads) == (["y1", "z1"], written, 1)


def test_gallery_keys_lost_in_redis_are_dropped_by_sync_and_by_the_follower(stores, model_name, redis_server):
    """Redis lost the data (FLUSHALL, a restart without persistence, deleted keys): no worker keeps serving it."""
    a, b, v = _second_worker_caught_up(stores, model_name, 8, "lost", 2)
    conn = redis_server.client()
    b.stop()
    conn.delete(*conn.scan_iter(match="arcface:galler*", count=1000))
    b.sync()
    assert (b.stats(), b.seq, b.reloads) == ({}, 0, 2)
    with pytest.raises(JobFailure) as exc:
        b.identify("lost", v[0])
    assert exc.value.code.value == "unknown_gallery"
    wait_until(lambda: a.reloads == 2)  # a, following the events, notices by itself with no change made
    assert (a.stats(), a.seq) == ({}, 0)


def test_a_retried_enroll_whose_reply_was_lost_answers_as_the_first_try(stores, model_name):
    """The same script call run twice (a reply lost to a dropped connection, then retried) says created both
    times; the same enrollment sent again by another job (a re-run) says it existed."""
    from worker.gallery.redis_io import enroll_keys, enroll_outcome

    a = stores(model_name)
    vec = unit(np.random.default_rng(9), 1)[0]
    args = ["retry", "alice", "e1", model_name, DIM, vec.tobytes(), '{"subject":"alice","enrolled_at":1.5,"meta":null}']
    args += [1000, "1.500000"]
    first = a._enroll(keys=enroll_keys("retry", "alice"), args=args)
    retried = a._enroll(keys=enroll_keys("retry", "alice"), args=args)
    args[6] = '{"subject":"alice","enrolled_at":2.5,"meta":null}'
    rerun = a._enroll(keys=enroll_keys("retry", "alice"), args=args)
    assert [enroll_outcome("retry", model_name, "e1", DIM, r) for r in (first, retried, rerun)] == [
        wg.EnrollOutcome("e1", True, 1),
        wg.EnrollOutcome("e1", True, 1),
        wg.EnrollOutcome("e1", False, 1),
    ]
    assert int(retried[2]) == 0  # no new event: the first try wrote it


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
    for call in (
        lambda: other.enroll("bound", "bob", "e2", unit(rng, 1)[0]),
        lambda: other.identify("bound", unit(rng, 1)),
        lambda: other.verify_subject("bound", "alice", unit(rng, 1)[0]),
        lambda: a.enroll("bound", "bob", "e3", unit(rng, 1, DIM * 2)[0]),  # same name, other dimension
        lambda: a.identify("bound", unit(rng, 1, DIM * 2)),
    ):
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


def _enroll_alice(store, gallery: str, vectors: np.ndarray) -> None:
    """Enroll ``alice`` once per vector, as ``a0``, ``a1``, ..."""
    for i, vector in enumerate(vectors):
        store.enroll(gallery, "alice", f"a{i}", vector)


def test_forget_one_enrollment_or_the_subject(stores, model_name):
    rng = np.random.default_rng(8)
    a = stores(model_name)
    v = unit(rng, 4)
    _enroll_alice(a, "f", v[:3])
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
    monkeypatch.setattr(gi, "PAGE_ROWS", 97)  # several pages, uneven last one: the per-page top-k merge is exercised
    monkeypatch.setattr(gi, "F16_BLOCK_ROWS", 13)  # and float16 conversion slices within a page
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
    for e, s, v in zip(eids, subjects, vectors, strict=True):
        writer.enroll("bf", s, e, v)
    for e in eids[5:40:3]:  # some forgotten: rows moved around inside the matrix
        writer.forget("bf", subjects[eids.index(e)], e)
    kept = [i for i, e in enumerate(eids) if e not in set(eids[5:40:3])]
    vectors, subjects, eids = vectors[kept], [subjects[i] for i in kept], [eids[i] for i in kept]
    store = stores(model_name, dtype=dtype, device=device)
    stored = vectors.astype(np.float16).astype(np.float32) if dtype == "float16" else vectors  # what the worker holds
    queries = np.concatenate([near(rng, base[:20], noise) for noise in (0.2, 0.8, 1.2)] + [unit(rng, 8)])
    for top_k, threshold in ((5, 2.0), (3, 0.3), (10, 0.6), (1, 0.05)):
        found = store.identify("bf", queries, top_k, threshold)
        assert len(found) == len(queries)
        total = 0
        for q, matches in zip(queries, found, strict=True):
            expected = brute_force(stored, subjects, eids, q, top_k, threshold)
            assert [(m.subject, m.enrollment_id) for m in matches] == [(s, e) for s, _, e in expected]
            np.testing.assert_allclose([m.distance for m in matches], [d for _, d, _ in expected], rtol=0, atol=1e-12)
            assert all(m.distance <= threshold for m in matches)
            total += len(matches)
        assert total > 0  # every setting returns matches somewhere: the comparison is not vacuous
    # per-query top_k / threshold in one product
    mixed = store.identify("bf", queries[:4], [1, 2, 3, 4], [0.3, 0.4, 2.0, 0.05])
    for i, (k, t) in enumerate(zip([1, 2, 3, 4], [0.3, 0.4, 2.0, 0.05], strict=True)):
        assert [m.subject for m in mixed[i]] == [s for s, _, _ in brute_force(stored, subjects, eids, queries[i], k, t)]


def test_paged_index_matches_a_plain_model_through_adds_and_removes(monkeypatch):
    """Pages of 7 rows: growing, moving the last row into a freed one across pages, overwriting, reading back."""
    monkeypatch.setattr(gi, "PAGE_ROWS", 7)
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
            model.update({e: ("bulk", v) for e, v in zip(eids, vecs, strict=True)})
        assert index.n == len(model) and index.capacity >= index.n and all(len(p) <= 7 for p in index.pages)
    rows = np.array([index.row_of[e] for e in model])
    np.testing.assert_array_equal(index.vectors(rows), np.stack([v for _, v in model.values()]))
    assert [index.subjects[index.row_subject[r]] for r in rows] == [s for s, _ in model.values()]
    for subject in {s for s, _ in model.values()}:
        theirs = sorted(e for e, (s, _) in model.items() if s == subject)
        assert sorted(index.eids[r] for r in index.rows_of(subject)) == theirs
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
    _enroll_alice(a, "vs", v)
    q = near(rng, v[1:2], 0.3)[0]
    got = a.verify_subject("vs", "alice", q)
    assert got.distance == pytest.approx(min(cosine_distance(q, v[i]) for i in range(3)), abs=1e-6)
    assert got.enrollment_id == "a1" and got.enrollments == 3
    with pytest.raises(JobFailure) as exc:
        a.verify_subject("vs", "mallory", q)
    assert exc.value.code.value == "unknown_subject" and "'mallory'" in exc.value.message
