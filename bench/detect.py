"""Detection benchmark: BlazeFace + alignment + ArcFace vs ArcFace alone on the same images, in one run; and, with
``--quality``, detection and selection quality on the labelled group photos plus ROC AUC of the shared faceres model
behind BlazeFace, for every face selection and crop.

    ./dev bench detect [--batch 16] [--seconds 6]
    ./dev bench detect --quality      # ARCFACE_* variables change the settings marked "(configured)"

Quality figures are computed in-process through the worker's own pieces (the detector, ``pick``, ``align`` /
``square_crop``, ``preprocess`` and the engine, as ``Runtime.detect`` chains them), not through Redis: the bulk-run
tests (tests/test_detect.py, tests/test_detect_labelled.py) give the same AUCs at the default settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.inference.detect import SELECT_POLICIES, BlazeFace, Face, align, pick, pick_all, square_crop  # noqa: E402
from worker.inference.engine import Engine  # noqa: E402
from worker.inference.model import FaceModel, build_arcface  # noqa: E402
from worker.inference.preprocess import decode_image, preprocess  # noqa: E402

if TYPE_CHECKING:
    from worker.settings import WorkerSettings


def _auc_figures(
    engine: Engine,
    images: list[np.ndarray],
    people: list[str],
    found: list[list[Face]],
    select: str,
    crop: str,
    margin: float,
) -> float:
    """ROC AUC over all pairs of ``images`` (same person = same label), each embedded from its picked face."""
    from producer.bulk.evaluation import roc_auc

    size = engine.model.input_size
    inputs = []
    for image, faces in zip(images, found, strict=True):
        face = pick(faces, select)
        if face is None:
            raise SystemExit("no face found in an evaluation image")
        inputs.append(
            preprocess(align(image, face, size) if crop == "align" else square_crop(image, face, margin), size)
        )
    emb = engine.embed(np.stack(inputs))
    i, j = np.triu_indices(len(images), 1)
    same = np.array([people[a] == people[b] for a, b in zip(i, j, strict=True)])
    return roc_auc(1.0 - np.sum(emb[i] * emb[j], axis=1), same)


def quality(blazeface: Path) -> None:
    """Detection precision/recall and selection on the labelled photos; faceres ROC AUC per selection and crop."""
    from tests.test_detect_labelled import labels
    from worker.settings import WorkerSettings

    s = WorkerSettings()
    print(
        f"configured: detect_min_score {s.detect_min_score}, detect_min_face {s.detect_min_face}, "
        f"face_select {s.face_select}, crop_margin {s.crop_margin}"
    )
    photos = labels()
    detector = BlazeFace(blazeface, min_score=0.3)
    images = {p: decode_image((ROOT / "tests" / "data" / "faces" / "group" / p).read_bytes()) for p in photos}
    found = dict(zip(photos, detector.detect(list(images.values())), strict=True))
    _detection_quality(s, photos, found)
    crops = _selection_quality(s, photos, found, detector)
    _auc_quality(s, blazeface, crops)


def _detection_quality(s: WorkerSettings, photos: dict[str, Any], found: dict[str, list[Face]]) -> None:
    from tests.test_detect_labelled import match

    print("\nall faces (pick_all) over the labelled group photos, matched at IoU >= 0.5:")
    for floor in (0.3, 0.4, 0.5, 0.55, 0.6, 0.75):
        hits = kept_n = total = 0
        for p, boxes in photos.items():
            kept = pick_all([f for f in found[p] if f.score >= floor], s.detect_min_face)
            hits += len(match(kept, [b["box"] for b in boxes]))
            kept_n += len(kept)
            total += len(boxes)
        mark = "  (configured)" if floor == s.detect_min_score else ""
        print(
            f"  min score {floor:.2f}: {total} faces, {kept_n} detections, {hits} matched: "
            f"precision {hits / max(kept_n, 1):.3f}, recall {hits / total:.3f}{mark}"
        )


def _selection_quality(
    s: WorkerSettings, photos: dict[str, Any], found: dict[str, list[Face]], detector: BlazeFace
) -> dict[float, Any]:
    """How often each selection policy picks a labelled face; returns the portrait crops by context factor."""
    from tests.test_detect_labelled import box_iou, portraits

    def ok(faces: list[Face], boxes: list[list[float]], policy: str) -> bool:
        face = pick([f for f in faces if f.score >= s.detect_min_score], policy, s.detect_min_face)
        return face is not None and max(box_iou(face.box, b) for b in boxes) >= 0.5

    print(
        f"\nthe picked face at min score {s.detect_min_score}: a labelled face in N of {len(photos)} photos; "
        "the crop's person in N portrait crops (side = context x face; from x3.5 on, several whole faces share a crop)"
    )
    crops = {c: portraits(c) for c in (2.0, 2.5, 3.0, 3.5, 4.0)}
    crop_found = {c: detector.detect([x.image for x in v]) for c, v in crops.items()}
    for policy in SELECT_POLICIES:
        right = sum(ok(found[p], [b["box"] for b in photos[p]], policy) for p in photos)
        line = f"  {policy:9s}: photos {right}/{len(photos)}"
        for c, v in crops.items():
            line += (
                f", crops x{c} {sum(ok(f, [x.box], policy) for x, f in zip(v, crop_found[c], strict=True))}/{len(v)}"
            )
        print(line + ("  (configured)" if policy == s.face_select else ""))
    return crops


def _auc_quality(s: WorkerSettings, blazeface: Path, crops: dict[float, Any]) -> None:
    from tests.conftest import FACERES_SAVEDMODEL, face_paths
    from worker.runtime import load_engine

    if not FACERES_SAVEDMODEL.exists():
        print(f"\n{FACERES_SAVEDMODEL} absent: no ROC AUC figures")
        return
    faceres = dict(model_path=FACERES_SAVEDMODEL, model_name="faceres", input_scale=1.0, input_offset=0.0)
    bgr = dict(input_mean=[103.939, 116.779, 123.68], channel_order="BGR", threshold=0.45)
    engine = load_engine(s.model_copy(update={**faceres, **bgr, "allowed_batch_sizes": [1, 8, 32]}))
    detector = BlazeFace(blazeface, min_score=s.detect_min_score)
    crop40 = [decode_image(p.read_bytes()) for p in face_paths()]
    sets = {"40 crops": (crop40, [p.parent.name for p in face_paths()], detector.detect(crop40))}
    for c in (2.5, 3.0):
        ims = [x.image for x in crops[c]]
        sets[f"portraits x{c}"] = (ims, [x.person for x in crops[c]], detector.detect(ims))
    print(
        "\nfaceres ROC AUC (cosine distance, all pairs; 40 crops: 780 pairs, 80 same; portrait crops of the group "
        "photos: 22 crops, 231 pairs, 32 same)"
    )
    variants = [("square", m) for m in (0.0, 0.1, 0.2, 0.3)] + [("align", 0.0)]
    for name, (ims, people, fs) in sets.items():
        for policy in SELECT_POLICIES:
            cells = []
            for crop, m in variants:
                auc = _auc_figures(engine, ims, people, fs, policy, crop, m)
                star = "*" if policy == s.face_select and crop == "square" and m == s.crop_margin else ""
                cells.append(f"{crop}{'' if crop == 'align' else f' {m:.1f}'} {auc:.4f}{star}")
            print(f"  {name:14s} {policy:9s}: " + ", ".join(cells))
    print("  (* = the configured selection and square margin)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument(
        "--quality", action="store_true", help="detection/selection quality and faceres ROC AUC instead of speed"
    )
    args = ap.parse_args()
    blazeface = ROOT.parent / "shared" / "models" / "tfjs" / "blazeface-front.json"
    if not blazeface.exists():
        raise SystemExit(f"bench detect needs the shared BlazeFace model at {blazeface}; absent in this checkout")
    if args.quality:
        quality(blazeface)
        return
    faces = sorted((ROOT / "tests" / "data" / "faces").glob("*/*.png"))
    raw = [p.read_bytes() for p in faces[: args.batch]]
    model = build_arcface()
    engine = Engine(FaceModel("arcface", model, 112, 512, keras_model=model), [args.batch])
    engine.warm_up()
    detector = BlazeFace(blazeface, allowed_batch_sizes=[args.batch])
    detector.warm_up()

    def plain() -> None:
        engine.embed(np.stack([preprocess(r, 112) for r in raw]))

    def detected() -> None:
        images = [decode_image(r) for r in raw]
        found = detector.detect(images)
        engine.embed(np.stack([preprocess(align(im, pick(f)), 112) for im, f in zip(images, found, strict=True)]))

    for name, fn in (("embedding alone", plain), ("detection + alignment + embedding", detected)):
        fn()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.seconds:
            fn()
            n += len(raw)
        rate = n / (time.perf_counter() - t)
        print(f"{name}: {rate:.1f} img/s")
        if name == "embedding alone":
            base = rate
    print(f"RATIO detection pipeline / embedding alone: {rate / base:.2f}x")


if __name__ == "__main__":
    main()
