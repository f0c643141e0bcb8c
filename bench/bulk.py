"""Bulk-run benchmark: a pair list over N unique images through one worker, vs the raw engine, in one run.

    ./dev bench bulk [--images 160] [--pairs 2000]

Prints bulk images/s against the raw engine's img/s at the worker's batch size (target >= 0.9) and pairs/s.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import options  # noqa: E402
from producer.bulk.run import BulkOptions, run_bulk  # noqa: E402
from producer.client.face_client import FaceClient  # noqa: E402
from producer.settings import ProducerSettings  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.workers import WorkerProcess  # noqa: E402
from worker.inference.weights import save_deepface_h5  # noqa: E402


def make_images(folder: Path, n: int) -> list[str]:
    """n distinct real-face images: the 40 crops, mirrored and slightly cropped variants."""
    faces = sorted((ROOT / "tests" / "data" / "faces").glob("*/*.png"))
    names = []
    for i in range(n):
        img = Image.open(faces[i % len(faces)]).convert("RGB")
        k = i // len(faces)
        if k % 2:
            img = ImageOps.mirror(img)
        if k:
            img = img.crop((k, k, img.width - k, img.height - k))
        name = f"img{i:05d}.png"
        img.save(folder / name)
        names.append(name)
    return names


def write_pairs(path: Path, names: list[str], n: int) -> None:
    """A pair file of ``n`` random pairs of distinct images (seeded)."""
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b"])
        for _ in range(n):
            a, b = rng.choice(len(names), 2, replace=False)
            w.writerow([names[a], names[b]])


def raw_engine_rate(weights: Path, folder: Path, names: list[str], batch: int) -> float:
    """img/s of the engine alone in this process, at ``batch``."""
    from worker.inference.engine import Engine
    from worker.inference.model import load_face_model
    from worker.inference.preprocess import preprocess

    engine = Engine(load_face_model(weights), [batch])
    engine.warm_up()
    x = np.stack([preprocess((folder / names[i % len(names)]).read_bytes(), 112) for i in range(batch)])
    t = time.perf_counter()
    for _ in range(4):
        engine.embed(x)
    return 4 * batch / (time.perf_counter() - t)


def main() -> None:
    args = options(images=160, pairs=2000, batch=32)
    tmp = Path(tempfile.mkdtemp(prefix="arcface-bulk-"))
    (tmp / "img").mkdir()
    names = make_images(tmp / "img", args.images)
    write_pairs(tmp / "pairs.csv", names, args.pairs)
    server = RedisServer(tmp / "redis").start()
    from worker.inference.model import build_arcface

    weights = save_deepface_h5(build_arcface(), tmp / "w.h5")
    env = {
        "ARCFACE_REDIS_URL": server.url,
        "ARCFACE_MODEL_PATH": str(weights),
        "ARCFACE_ALLOWED_BATCH_SIZES": f"1,8,{args.batch}",
        "ARCFACE_MAX_BATCH_SIZE": str(args.batch),
        "ARCFACE_QUEUE": "bulk-bench",
    }
    os.environ.update(env)
    try:
        raw = raw_engine_rate(weights, tmp / "img", names, args.batch)
        print(f"raw engine at batch {args.batch}: {raw:.1f} img/s")
        worker = WorkerProcess(env, tmp / "worker.log")
        worker.wait_ready(300)
        client = FaceClient(ProducerSettings())
        bulk_options = BulkOptions(root=tmp / "img", window=4 * args.batch)
        stats, _summary = run_bulk(client, tmp / "pairs.csv", tmp / "out.csv", bulk_options, quiet=True)
        img_rate = stats.images_embedded / stats.seconds
        print(
            f"bulk: {stats.rows} pairs over {stats.images_embedded} unique images in {stats.seconds:.1f}s: "
            f"{img_rate:.1f} img/s, {stats.rows / stats.seconds:.1f} pairs/s"
        )
        print(f"RATIO bulk img/s / raw engine img/s: {img_rate / raw:.2f}x  (target >= 0.9)")
        worker.signal(15)
        worker.wait(60)
        worker.stop()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
