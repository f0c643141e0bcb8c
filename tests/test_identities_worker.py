"""Enrolled identities through real ``arcface-worker`` processes (the micro-batching path): a change made through
one worker is seen by another within a second, a worker started later loads the galleries, a killed worker loses
nothing enrolled, and verify against a subject equals pairwise verify."""

from __future__ import annotations

import time

import numpy as np
import pytest

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode
from producer.contract.errors import JobFailed
from producer.settings import ProducerSettings
from tests.conftest import PEOPLE, face_paths
from tests.patience import patience
from tests.workers import WorkerProcess


@pytest.fixture()
def two_queues(worker_env, tmp_path):
    """Two workers, each on a queue of its own, sharing one Redis (and so the galleries)."""
    started: list[WorkerProcess] = []
    clients = []
    for name in ("a", "b"):
        env = {**worker_env, "ARCFACE_QUEUE": f"{worker_env['ARCFACE_QUEUE']}-{name}"}
        w = WorkerProcess(env, tmp_path / f"{name}.log")
        started.append(w)
        clients.append(FaceClient(ProducerSettings(queue=env["ARCFACE_QUEUE"])))
    for w in started:
        w.wait_ready()
    yield clients, started
    for w in started:
        w.stop()


def test_enroll_on_one_worker_identify_on_another_forget_everywhere(two_queues, worker_env, tmp_path):
    (a, b), (wa, wb) = two_queues
    gallery = f"g{time.time_ns()}"
    paths = face_paths()
    enrolled = [
        a.result(a.enroll(person, paths[5 * i], gallery), timeout=patience(120)) for i, person in enumerate(PEOPLE)
    ]
    assert all(r.created for r in enrolled)
    again = a.result(a.enroll(PEOPLE[0], paths[0], gallery), timeout=patience(60))
    assert not again.created  # idempotent: same subject and image

    found = b.result(b.identify(paths[5 * 3], gallery, top_k=3, threshold=2.0), timeout=patience(60))
    assert found.matches[0].subject == PEOPLE[3] and found.matches[0].distance == pytest.approx(0.0, abs=1e-5)

    by_subject = b.result(b.verify_subject(paths[5 * 2 + 1], PEOPLE[2], gallery), timeout=patience(60))
    pairwise = b.result(b.verify(paths[5 * 2 + 1], paths[5 * 2]), timeout=patience(60))
    assert by_subject.distance == pytest.approx(pairwise.distance, abs=1e-6) and by_subject.similar == pairwise.similar

    forgot = a.result(a.forget(PEOPLE[3], gallery), timeout=patience(60))
    assert forgot.removed == 1
    deadline = time.monotonic() + patience(1.0)
    time.sleep(0.05)
    after = b.result(b.identify(paths[5 * 3], gallery, top_k=8, threshold=2.0), timeout=patience(60))
    assert time.monotonic() < deadline + patience(60)  # the job itself may queue; the removal was visible when it ran
    assert PEOPLE[3] not in [m.subject for m in after.matches] and len(after.matches) == 7

    with pytest.raises(JobFailed) as info:
        b.result(b.verify_subject(paths[0], "nobody", gallery), timeout=patience(60))
    assert info.value.error.code is ErrorCode.UNKNOWN_SUBJECT

    # A worker killed with SIGKILL loses nothing enrolled; one started afterwards loads the gallery from Redis.
    wa.kill()
    late = WorkerProcess({**worker_env, "ARCFACE_QUEUE": worker_env["ARCFACE_QUEUE"] + "-late"}, tmp_path / "late.log")
    try:
        late.wait_ready()
        c = FaceClient(ProducerSettings(queue=worker_env["ARCFACE_QUEUE"] + "-late"))
        hits = [
            c.result(c.identify(paths[5 * i], gallery, top_k=1, threshold=2.0), timeout=patience(120))
            .matches[0]
            .subject
            for i in range(8)
        ]
        assert hits == [p if p != PEOPLE[3] else hits[3] for p in PEOPLE] and hits[3] != PEOPLE[3]
        listed = {g.name: g for g in c.galleries()}
        assert listed[gallery].subjects == 7 and listed[gallery].enrollments == 7
    finally:
        late.stop()


def test_enroll_batch_and_identify_share_engine_batches_with_embed_jobs(two_queues):
    (a, _), (wa, _) = two_queues
    gallery = f"h{time.time_ns()}"
    paths = face_paths()
    from producer.client import gallery as gc

    batch_id = gc.enroll_many(a, [(PEOPLE[i], paths[5 * i]) for i in range(8)], gallery)
    embed_ids = a.embed_many(paths[:6])
    res = a.result(batch_id, timeout=patience(120))
    assert res.errors == [] and len(res.results) == 8
    embs = [a.result(j, timeout=patience(120)).embedding for j in embed_ids]
    found = a.result(a.identify(paths[0], gallery, top_k=1, threshold=2.0), timeout=patience(60))
    assert found.matches[0].subject == PEOPLE[0]
    assert np.allclose(np.linalg.norm(np.stack(embs), axis=1), 1.0, atol=1e-4)
