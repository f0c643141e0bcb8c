"""Multi-image jobs (``embed_batch``, ``verify_batch``) and ``faces: "all"``, through a real worker and real Redis:
a bad image fails only its item, rows equal single-image embeddings, a job larger than the engine batch spans
several engine calls, and many small jobs share one."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from producer.contract.codes import ErrorCode
from producer.contract.requests import ImageRef
from producer.contract.results import EmbedBatchResult, VerifyBatchResult
from tests.conftest import FACES, SHARED, face_paths, needs_shared
from tests.patience import patience
from tests.workers import WorkerProcess

BLAZEFACE = SHARED / "models" / "tfjs" / "blazeface-front.json"


@pytest.fixture()
def worker(worker_env, tmp_path):
    w = WorkerProcess(worker_env, tmp_path / "worker.log", ARCFACE_MAX_BATCH_SIZE="16")
    w.wait_ready()
    yield w
    w.stop()


def test_a_corrupt_item_fails_alone_and_every_other_row_equals_the_single_image_embedding(client, worker, direct):
    paths = face_paths()[:12]
    images: list = list(paths)
    images.insert(5, b"this is not an image")
    job_id = client.embed_batch(images, ref="batch-1")
    result = client.result(job_id, timeout=patience(120))
    assert isinstance(result, EmbedBatchResult)
    assert (result.count, result.dim, result.ref) == (13, 512, "batch-1")
    assert [(e.index, e.code) for e in result.errors] == [(5, ErrorCode.IMAGE_DECODE_ERROR)]
    emb = result.embeddings
    assert emb.shape == (13, 512) and emb.dtype == np.float32
    assert not emb[5].any() and result.ok.tolist() == [i != 5 for i in range(13)]
    rows = [i for i in range(13) if i != 5]
    for i, path in zip(rows, paths, strict=True):
        np.testing.assert_allclose(emb[i], direct[path], atol=1e-5)
    single = client.result(client.embed(paths[0]), timeout=patience(60))
    np.testing.assert_allclose(emb[0], single.embedding, atol=1e-5)


def test_a_two_hundred_fifty_six_image_job_spans_engine_batches_in_order(client, worker, direct):
    paths = face_paths()
    order = [paths[(7 * i) % len(paths)] for i in range(256)]  # each row's image is known; a misplaced row shows
    job_id = client.embed_batch(order)
    result = client.result(job_id, timeout=patience(600))
    assert result.count == 256 and result.errors == []
    expected = np.stack([direct[p] for p in order])
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)
    deadline = time.monotonic() + patience(10)  # a batch's log line comes right after its outcomes are written
    while sum(b["images"] for b in worker.batches()) < 256 and time.monotonic() < deadline:
        time.sleep(0.05)
    batches = worker.batches()
    assert all(b["images"] <= 16 for b in batches) and sum(b["images"] for b in batches) >= 256


def test_small_jobs_share_engine_batches_and_pairs_fail_alone(client, worker, direct):
    paths = face_paths()
    ids = [client.embed_batch(paths[i : i + 3]) for i in range(0, 12, 3)]
    pairs = [(paths[0], paths[1]), (paths[2], b"garbage"), (paths[5], paths[30])]
    pair_id = client.verify_batch(pairs, threshold=0.5)
    for k, jid in enumerate(ids):
        r = client.result(jid, timeout=patience(120))
        np.testing.assert_allclose(r.embeddings, np.stack([direct[p] for p in paths[3 * k : 3 * k + 3]]), atol=1e-5)
    v = client.result(pair_id, timeout=patience(120))
    assert isinstance(v, VerifyBatchResult) and v.count == 3 and v.threshold == 0.5
    assert [(e.index, e.code) for e in v.errors] == [(1, ErrorCode.IMAGE_DECODE_ERROR)]
    assert "image b" in v.errors[0].message and v.results[1] is None
    for k in (0, 2):
        a, b = pairs[k]
        d = 1.0 - float(direct[a] @ direct[b])
        assert v.results[k].distance == pytest.approx(d, abs=1e-5) and v.results[k].similar == (d <= 0.5)
    assert any(b["jobs"] >= 2 for b in worker.batches())  # several jobs completed by one engine batch


def test_a_job_over_the_image_limit_fails_with_a_clear_code(client, worker_env, tmp_path):
    w = WorkerProcess(worker_env, tmp_path / "w.log", ARCFACE_MAX_IMAGES_PER_JOB="4")
    try:
        w.wait_ready()
        jid = client.embed_batch(face_paths()[:5])
        from producer.contract.errors import JobFailed

        with pytest.raises(JobFailed) as info:
            client.result(jid, timeout=patience(60))
        assert (
            info.value.error.code is ErrorCode.INVALID_PAYLOAD
            and "ARCFACE_MAX_IMAGES_PER_JOB" in info.value.error.message
        )
    finally:
        w.stop()


@needs_shared(BLAZEFACE, "the shared BlazeFace detector")
def test_faces_all_embeds_every_labelled_face_of_a_group_photo_largest_first(client, worker_env, tmp_path):
    labels = json.loads((FACES / "group_labels.json").read_text())["photos"]["bbt1.jpg"]
    w = WorkerProcess(worker_env, tmp_path / "w.log", ARCFACE_DETECT="blazeface", ARCFACE_DETECTOR_PATH=str(BLAZEFACE))
    try:
        w.wait_ready()
        target = FACES / "group" / "bbt1.jpg"
        jid = client.embed(target, detect="blazeface", faces="all")
        r = client.result(jid, timeout=patience(180))
        assert r.faces is not None and len(r.faces) == len(
            labels
        )  # bbt1: four people, no false positive at the default score
        sizes = [f.box[2] - f.box[0] for f in r.faces]
        assert sizes == sorted(sizes, reverse=True)
        np.testing.assert_allclose(r.faces[0].embedding, r.embedding, atol=1e-6)
        assert all(abs(np.linalg.norm(f.embedding) - 1.0) < 1e-4 for f in r.faces)
        single = client.result(client.embed(target, detect="blazeface"), timeout=patience(120))
        assert single.faces is None
    finally:
        w.stop()


def test_inline_ref_objects_are_accepted_in_a_batch(client, worker):
    ref = ImageRef.inline(face_paths()[0].read_bytes())
    r = client.result(client.embed_batch([ref, ref]), timeout=patience(120))
    np.testing.assert_allclose(r.embeddings[0], r.embeddings[1], atol=1e-6)
