"""Face detection and alignment on real photos, and detection inside the worker with a real embedding model."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from tests.conftest import FACERES_ENV, FACERES_SAVEDMODEL, FACES, TFJS_MODELS, face_paths, needs_shared, shared_file
from tests.patience import patience
from worker.inference.detect import ARCFACE_TEMPLATE, BlazeFace, Face, align, pick, pick_all, square_crop, umeyama
from worker.inference.preprocess import decode_image

BLAZEFACE = TFJS_MODELS / "blazeface-front.json"
BLAZEFACE_WHAT = "the shared BlazeFace detector"  # tests without the detector (alignment maths) run regardless


@pytest.fixture(scope="module")
def detector() -> BlazeFace:
    return BlazeFace(shared_file(BLAZEFACE, BLAZEFACE_WHAT))


def test_every_crop_has_exactly_one_face_with_its_eyes_where_they_are(detector):
    images = [decode_image(p.read_bytes()) for p in face_paths()]
    found = detector.detect(images)
    assert [len(f) for f in found] == [1] * 40
    for path, (face,) in zip(face_paths(), found, strict=True):
        x1, y1, x2, y2 = face.box
        right_eye, left_eye, nose, mouth = face.keypoints[:4]
        for kx, ky in face.keypoints[:4]:
            assert x1 <= kx <= x2 and y1 <= ky <= y2, path.name
        assert right_eye[0] < left_eye[0], path.name  # subject's right eye is on the image's left
        assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1], path.name
        assert face.score > 0.75 and 100 < face.size < 200


@pytest.mark.parametrize(
    "name,faces", [("bbt1.jpg", 4), ("bbt2.jpg", 2), ("bbt3.jpg", 5), ("bbt4.jpg", 6), ("bbt5.jpg", 5)]
)
def test_group_photos_find_every_person(detector, name, faces):
    image = decode_image((FACES / "group" / name).read_bytes())
    found = [f for f in detector.detect([image])[0] if f.score >= 0.75]
    assert len(found) == faces
    boxes = np.array([f.box for f in found])
    for i, j in itertools.combinations(range(len(found)), 2):  # distinct people, not duplicates
        assert np.abs(boxes[i] - boxes[j]).max() > 20


def test_blank_image_has_no_face(detector):
    assert detector.detect([decode_image((FACES / "white.png").read_bytes())]) == [[]]
    assert pick([], "largest") is None and pick([]) is None and pick_all([]) == []


def _face(
    box: tuple[float, float, float, float], score: float, image_size: tuple[int, int] | None = (1000, 800)
) -> Face:
    return Face(box, np.zeros((6, 2)), score, image_size)


def test_auto_selection_skips_a_low_score_detection_larger_than_the_real_face():
    """The case behind the default: a 0.50 detection on window frames, slightly larger than the real face (0.95)."""
    real, frames = _face((300, 200, 400, 300), 0.95), _face((520, 180, 630, 290), 0.50)
    assert pick([real, frames], "largest") is frames  # the old default took the window frames
    assert (
        pick([real, frames]) is real
        and pick([real, frames], "auto") is real
        and pick([frames, real], "confident") is real
    )
    # among faces scoring close to the best, the largest wins, not the most confident
    subject, background = _face((100, 100, 300, 300), 0.80), _face((700, 50, 740, 90), 0.97)
    assert pick([background, subject]) is subject and pick([background, subject], "confident") is background
    assert pick([background, subject], margin=0.1) is background  # 0.80 < 0.97 - 0.1
    # a face cut by the border counts for its visible part: 120 px box, 40 px of it inside the image
    cut = _face((-80, 300, 40, 420), 0.96)
    assert cut.size == 120 and cut.visible_size == 40 and _face((-80, 300, 40, 420), 0.96, None).visible_size == 120
    assert pick([cut, real]) is real and pick([cut, real], "largest") is cut
    assert pick([real, frames], min_size=105) is frames and pick([real], min_size=105) is None
    with pytest.raises(ValueError, match="unknown face selection 'biggest'"):
        pick([real], "biggest")


def test_pick_all_returns_every_face_largest_first_up_to_the_limit():
    faces = [
        _face((0, 0, 50, 50), 0.9),
        _face((0, 0, 80, 80), 0.6),
        _face((0, 0, 10, 10), 0.99),
        _face((100, 0, 150, 50), 0.97),
    ]
    assert [(f.size, f.score) for f in pick_all(faces)] == [(80, 0.6), (50, 0.97), (50, 0.9), (10, 0.99)]
    assert [f.size for f in pick_all(faces, min_face=20)] == [80, 50, 50]
    assert pick_all(faces, max_faces=2) == pick_all(faces)[:2]
    with pytest.raises(ValueError, match="max_faces"):
        pick_all(faces, max_faces=0)


def test_umeyama_recovers_a_similarity_and_align_puts_the_eyes_on_the_template():
    angle, scale, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = src @ (scale * rot).T + t
    np.testing.assert_allclose(umeyama(src, dst), np.hstack([scale * rot, t[:, None]]), atol=1e-9)
    # a synthetic image: bright dots at four keypoints; after alignment they sit on the template
    image = np.zeros((300, 300, 3), np.uint8)
    kps = ARCFACE_TEMPLATE * 1.9 @ np.array([[np.cos(0.2), np.sin(0.2)], [-np.sin(0.2), np.cos(0.2)]]) + [60, 40]
    for x, y in kps:
        image[int(round(y)) - 1 : int(round(y)) + 2, int(round(x)) - 1 : int(round(x)) + 2] = 255
    face = Face((0, 0, 300, 300), np.vstack([kps, [[0, 0], [0, 0]]]), 0.9)
    out = align(image, face)
    assert out.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE:
        assert out[int(round(y)) - 1 : int(round(y)) + 2, int(round(x)) - 1 : int(round(x)) + 2].max() > 100
    crop = square_crop(image, Face((100, 100, 150, 160), np.zeros((6, 2)), 0.9), margin=0.2)
    assert crop.shape == (84, 84, 3)


def _write_all_pairs(path) -> None:
    """Every pair of the 40 crops (780), labelled 1 for the same person."""
    rel = [str(p.relative_to(FACES)) for p in face_paths()]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "label"])
        w.writerows([a, b, int(a.split("/")[0] == b.split("/")[0])] for a, b in itertools.combinations(rel, 2))


def _check_single_jobs_with_detection(client) -> None:
    """No face in a white image; the best face of a group photo; a verify with both faces; detection switched off."""
    from producer.contract.codes import ErrorCode
    from producer.contract.errors import JobFailed

    with pytest.raises(JobFailed) as info:
        client.result(client.embed(FACES / "white.png"), timeout=patience(60))
    assert info.value.error.code is ErrorCode.NO_FACE_DETECTED
    group = client.result(client.embed(FACES / "group" / "bbt4.jpg"), timeout=patience(60))
    assert group.face is not None and group.face["score"] > 0.9 and len(group.face["keypoints"]) == 6
    pair = client.result(client.verify(face_paths()[0], face_paths()[1]), timeout=patience(60))
    assert pair.face_a and pair.face_b and pair.similar == (pair.distance <= 0.45)
    plain = client.result(client.embed(face_paths()[0], detect="none"), timeout=patience(60))
    assert plain.face is None  # a job can switch detection off


@needs_shared(BLAZEFACE, BLAZEFACE_WHAT)
@needs_shared(FACERES_SAVEDMODEL)
def test_worker_with_detection_and_a_real_model_separates_people(redis_server, tmp_path, capsys):
    """The shared 224x224 face model behind BlazeFace in a real worker configured as the README's command (the
    model's input settings, ARCFACE_CROP=square; detection margin, score floor and face selection at their
    defaults): a bulk run over all 780 pairs of the 40 crops, plus a photo with no face and a group photo."""
    from producer.bulk.run import BulkOptions, run_bulk
    from tests.workers import queue_env, ready_worker

    with ready_worker(queue_env(redis_server.url, "det", **FACERES_ENV), tmp_path / "w.log") as worker:
        client = worker.client()
        _write_all_pairs(tmp_path / "pairs.csv")
        stats, summary = run_bulk(
            client, tmp_path / "pairs.csv", tmp_path / "out.csv", BulkOptions(root=FACES, threshold=0.45), quiet=True
        )
        with capsys.disabled():
            print(
                f"\nBlazeFace + faceres, 780 pairs of 40 crops: ROC AUC {summary.roc_auc:.4f}, "
                f"best accuracy {summary.best_accuracy:.3f}"
            )
        assert stats.images_embedded == 40 and summary.failed == 0 and summary.pairs == 780
        assert summary.roc_auc >= 0.99  # measured 0.9979 at the default margin 0.1 (0.9961 at 0.2)
        _check_single_jobs_with_detection(client)
        assert any(b.get("detect_ms", 0) > 0 for b in worker.batches())
