"""Enrolled identities through rq: the client functions served by a real rq worker, the ``arcface-producer``
gallery CLI with bulk enrollment from a folder, and the shared face model on real faces."""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.contract.gallery_results import EnrollResult, VerifySubjectResult
from tests.conftest import FACERES_ENV as CONFTEST_FACERES_ENV
from tests.conftest import FACERES_SAVEDMODEL, TFJS_MODELS, face_paths, needs_shared
from tests.patience import patience
from tests.workers import ready_worker

BLAZEFACE = TFJS_MODELS / "blazeface-front.json"

pytest_plugins = ["tests.gallery_fixtures"]  # fixtures: model_name, stores (each test starts with no galleries)


@pytest.fixture()
def serving(worker_env, redis_server, no_galleries, tmp_path):
    """A FaceClient on this test's queue, served by a real arcface-worker on the session's random-weight ArcFace
    (the same image gives the same embedding, which is all these tests need); starts with no galleries."""
    from producer.client.face_client import FaceClient

    with ready_worker(worker_env, tmp_path / "worker.log"):
        yield FaceClient(), redis_server.client(), worker_env["ARCFACE_QUEUE"]


def _client_calls(client: Any, faces: list[Path]) -> dict[str, Any]:
    """Every gallery call of the producer API once, with the results (and two refusals) by name."""
    from producer.client import gallery as gc
    from producer.contract.errors import JobFailed

    out: dict[str, Any] = {}
    out["enroll"] = gc.result(client, gc.enroll(client, "amy", faces[0], "c", meta={"source": "test"}))
    out["again"] = gc.result(client, gc.enroll(client, "amy", faces[0], "c"))
    many = [("amy", faces[1]), ("bernadette", faces[5]), ("bernadette", b"not an image")]
    out["batch"] = gc.result(client, gc.enroll_many(client, many, "c"))
    out["identify"] = gc.result(client, gc.identify(client, faces[5], "c", top_k=2, threshold=2.0))
    out["subject"] = gc.result(client, gc.verify_subject(client, faces[2], "amy", "c"))
    out["pairs"] = [gc.result(client, gc.verify(client, faces[2], faces[i])) for i in (0, 1)]
    embedded = client.result(client.embed(faces[0]))
    out["embedding"] = gc.result(client, gc.verify(client, faces[2], gc.Embedding(embedded.embedding)))
    out["galleries"] = gc.list_galleries(client)
    out["subjects"] = gc.list_subjects(client, "c")
    for name, call in (
        ("unknown_gallery", lambda: gc.identify(client, faces[0], "nope")),
        ("unknown_subject", lambda: gc.verify_subject(client, faces[0], "mallory", "c")),
    ):
        with pytest.raises(JobFailed) as exc:
            gc.result(client, call())
        out[name] = exc.value
    out["forget"] = gc.result(client, gc.forget(client, "amy", "c"))
    out["after"] = gc.result(client, gc.identify(client, faces[0], "c", threshold=2.0))
    return out


def test_client_functions_through_rq(serving):
    client, conn, queue = serving
    faces = face_paths()  # amy1..5, bernadette1..5, ...
    out = _client_calls(client, faces)
    assert isinstance(out["enroll"], EnrollResult) and out["enroll"].created and not out["again"].created
    # derived from subject + image: the same image is one enrollment
    assert out["enroll"].enrollment_id == out["again"].enrollment_id
    batch = out["batch"]
    assert [r is not None for r in batch.results] == [True, True, False]
    assert [(e.index, e.code.value) for e in batch.errors] == [(2, "image_decode_error")]
    assert [(m.subject, round(m.distance, 5)) for m in out["identify"].matches][0] == ("bernadette", 0.0)
    subject = out["subject"]
    assert isinstance(subject, VerifySubjectResult) and subject.enrollments == 2
    # = pairwise verify with the closer enrollment
    assert abs(subject.distance - min(p.distance for p in out["pairs"])) < 1e-6
    assert abs(out["embedding"].distance - out["pairs"][0].distance) < 1e-6
    assert [(g.name, g.subjects, g.enrollments) for g in out["galleries"]] == [("c", 2, 3)]
    assert [(s.subject, s.enrollments) for s in out["subjects"]] == [("amy", 2), ("bernadette", 1)]
    assert out["unknown_gallery"].code.value == "unknown_gallery" and "'nope'" in str(out["unknown_gallery"])
    assert out["unknown_subject"].code.value == "unknown_subject"
    assert out["forget"].removed == 2 and [m.subject for m in out["after"].matches] == ["bernadette"]


class _Cli:
    """``arcface-producer`` gallery commands run against the test's worker: ``(exit code, stdout)`` per call,
    stderr kept in :attr:`err`."""

    def __init__(self, conn: Any, queue: str, capsys: Any) -> None:
        self.conn, self.queue, self.capsys = conn, queue, capsys
        self.err: list[str] = []

    def __call__(self, *argv: str) -> tuple[int, str]:
        from producer.cli.gallery import run

        code = run(list(argv))
        captured = self.capsys.readouterr()
        self.err.append(captured.err)
        return code, captured.out


def _people_folder(root: Path) -> None:
    """Two images of each of the 8 people, a folder per person, plus a broken image and a text file of amy's."""
    for path in face_paths():
        if path.stem[-1] in "12":
            (root / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / path.parent.name / path.name)
    (root / "amy" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "amy" / "notes.txt").write_text("not an image: ignored")


def test_bulk_enrollment_from_a_folder_and_the_cli(serving, tmp_path, capsys):
    _, conn, queue = serving
    cli = _Cli(conn, queue, capsys)
    root, out = tmp_path / "people", tmp_path / "enrolled.csv"
    _people_folder(root)
    folder = ["enroll", "--folder", str(root), "--out", str(out), "--gallery", "bulk", "--window", "2", "--json"]
    code, text = cli(*folder, "--per-job", "4")
    expected = {"images": 17, "skipped": 0, "enrolled": 16, "already": 0, "failed": 1, "seconds": 0}
    assert code == 1 and json.loads(text) | {"seconds": 0} == {**expected, "gallery": "bulk", "out": str(out)}
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 17 and [r["image"] for r in rows if r["error"]] == ["amy/broken.jpg"]
    assert {r["error"] for r in rows} == {"", "image_decode_error"}
    assert all(r["enrollment_id"] == r["image"] for r in rows)

    # fixed: a rerun enrolls only that one (single enroll jobs here)
    shutil.copy(face_paths()[2], root / "amy" / "broken.jpg")
    code, text = cli(*folder, "--per-job", "1")
    summary = json.loads(text)
    assert code == 0 and (summary["skipped"], summary["enrolled"], summary["failed"]) == (16, 1, 0)
    code, text = cli(*folder)
    assert code == 0 and (json.loads(text)["skipped"], json.loads(text)["enrolled"]) == (17, 0)
    assert sum(1 for _ in csv.DictReader(out.open())) == 18  # the failed row stays, the retry appended its own
    _gallery_commands(cli)


def _gallery_commands(cli: _Cli) -> None:
    """The list, identify, forget and enroll commands on the gallery ``bulk`` of 8 people, 2 images each + 1."""
    code, text = cli("gallery", "--json")
    listed = [(g["name"], g["subjects"], g["enrollments"]) for g in json.loads(text)["galleries"]]
    assert code == 0 and listed == [("bulk", 8, 17)]
    code, text = cli("gallery", "bulk")
    assert code == 0 and text.splitlines()[0] == "amy: 3 enrollment(s)" and len(text.splitlines()) == 8
    probe = str(face_paths()[5])
    code, text = cli("identify", probe, "--gallery", "bulk", "--top-k", "2", "--threshold", "2", "--wait", "--json")
    matches = json.loads(text)["result"]["matches"]
    assert code == 0 and len(matches) == 2 and matches[0]["subject"] == "bernadette" and matches[0]["distance"] < 1e-5
    code, text = cli("forget", "amy", "--gallery", "bulk", "--wait")
    assert code == 0 and "forgot amy in gallery bulk: 3 enrollment(s) removed, 0 left" in text
    code, text = cli("enroll", "bob", str(face_paths()[0]), "--gallery", "bulk", "--wait")
    assert code == 0 and "bob enrolled in gallery bulk (new;" in text
    code, text = cli("identify", str(face_paths()[0]), "--gallery", "nowhere", "--wait", "--json")
    assert code == 1 and json.loads(text)["code"] == "unknown_gallery"
    code, _ = cli("enroll", "--gallery", "bulk")
    assert code == 2 and "enroll needs SUBJECT" in cli.err[-1]


FACERES_ENV = {**CONFTEST_FACERES_ENV, "ARCFACE_ALLOWED_BATCH_SIZES": "1,8"}  # the README's faceres settings


@pytest.fixture()
def faceres(redis_server, no_galleries, monkeypatch, tmp_path):
    """A FaceClient on a queue of its own, served by a real arcface-worker with the shared face model and
    BlazeFace; yields the client and the queue."""
    from producer.client.face_client import FaceClient

    queue = f"faceres-{uuid.uuid4().hex[:6]}"
    env = {"ARCFACE_REDIS_URL": redis_server.url, "ARCFACE_QUEUE": queue, **FACERES_ENV}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with ready_worker(env, tmp_path / "worker.log", timeout=patience(300)):
        yield FaceClient(), queue


def _enroll_first_identify_the_rest(client: Any, paths: list[Path]) -> tuple[Any, list[Any], list[Any], list[Any]]:
    """Image 1 of each person enrolled in one enroll_batch job, images 2-5 identified; verify against 3 subjects
    and the same 3 pairwise."""
    from producer.client import gallery as gc
    from tests.conftest import PEOPLE

    firsts = [(person, paths[5 * i]) for i, person in enumerate(PEOPLE)]
    enrolled = gc.result(client, gc.enroll_many(client, firsts, "cast"), patience(300))
    ids = [gc.identify(client, paths[5 * i + j], "cast", top_k=8, threshold=2.0) for i in range(8) for j in range(1, 5)]
    found = [gc.result(client, jid, patience(300)) for jid in ids]
    subjects = [gc.verify_subject(client, paths[5 * i + 1], PEOPLE[i], "cast") for i in range(3)]
    by_subject = [gc.result(client, jid, patience(300)) for jid in subjects]
    pairwise = [client.result(client.verify(paths[5 * i + 1], paths[5 * i]), patience(300)) for i in range(3)]
    return enrolled, found, by_subject, pairwise


def _top1(found: list[Any], truth: list[str], capsys: Any) -> float:
    """Top-1 accuracy of the identify results; prints the genuine and impostor distances against 0.45."""
    pairs = list(zip(found, truth, strict=True))
    top1 = sum(1 for res, who in pairs if res.matches[0].subject == who) / len(truth)
    genuine = [m.distance for res, who in pairs for m in res.matches if m.subject == who]
    impostor = sorted(
        (round(m.distance, 3), who, m.subject) for res, who in pairs for m in res.matches if m.subject != who
    )
    within = [x for x in impostor if x[0] <= 0.45]
    with capsys.disabled():
        print(
            f"\nfaceres, gallery of 8 (image 1 each), 32 queries (images 2-5): top-1 {top1:.3f}; genuine distance "
            f"max {max(genuine):.3f}, {sum(d <= 0.45 for d in genuine)}/32 within 0.45; impostor distance min "
            f"{impostor[0][0]:.3f}, {len(within)}/{len(impostor)} within 0.45: {within}"
        )
    return top1


@needs_shared(BLAZEFACE, "the shared BlazeFace detector")
@needs_shared(FACERES_SAVEDMODEL)
def test_real_faces_enroll_one_image_each_and_identify_the_others(faceres, redis_server, stores, capsys):
    """The shared face model behind BlazeFace (the README's faceres settings): image 1 of each of the 8 people
    enrolled in one enroll_batch job, images 2-5 identified; verify against the subject equals pairwise verify;
    a worker started afterwards finds the same people."""
    from tests.conftest import PEOPLE

    client, queue = faceres
    paths = face_paths()
    results = _enroll_first_identify_the_rest(client, paths)
    enrolled, found, by_subject, pairwise = results
    assert enrolled.errors == [] and all(r.created for r in enrolled.results)
    assert enrolled.faces and all(enrolled.faces)
    # threshold 2: every subject, ranked
    assert all([m.subject for m in res.matches] and len(res.matches) == 8 for res in found)
    assert _top1(found, [PEOPLE[i] for i in range(8) for _ in range(4)], capsys) >= 0.9
    for s_res, p_res in zip(by_subject, pairwise, strict=True):
        assert abs(s_res.distance - p_res.distance) < 1e-6 and s_res.similar == p_res.similar
    later = stores("faceres", threshold=0.45)  # a worker started after the enrollments
    index = later.index_for("cast", client.model_info()["dim"])
    queries = np.stack([index.vector(index.row_of[r.enrollment_id]) for r in enrolled.results])
    assert [m[0].subject for m in later.identify("cast", queries, 1)] == PEOPLE
