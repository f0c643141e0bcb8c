"""Detection benchmark: BlazeFace + alignment + ArcFace vs ArcFace alone on the same images, in one run.

    ./dev bench detect [--batch 16] [--seconds 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.detect import BlazeFace, align, pick  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.model import FaceModel, build_arcface  # noqa: E402
from worker.preprocess import decode_image, preprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    blazeface = ROOT.parent / "shared" / "models" / "tfjs" / "blazeface-front.json"
    if not blazeface.exists():
        raise SystemExit(f"bench detect needs the shared BlazeFace model at {blazeface}; absent in this checkout")
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
        engine.embed(np.stack([preprocess(align(im, pick(f)), 112) for im, f in zip(images, found)]))

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
