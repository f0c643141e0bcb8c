"""Engine benchmark: img/s at each allowed batch size vs a naive per-image ``model.predict`` loop, and the
reduced-precision mode (bfloat16 on CPU / float16 on GPU) with its cosine to float32, in one run.

    ./dev bench engine [--sizes 1,8,32,64] [--seconds 4]

Random weights (speed does not depend on them); the real faces in tests/data/faces as inputs.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import options  # noqa: E402
from worker.inference.engine import Engine, configure_tensorflow, reduced_precision_policy  # noqa: E402
from worker.inference.model import FaceModel, build_arcface  # noqa: E402
from worker.inference.preprocess import preprocess  # noqa: E402


def inputs(n: int) -> np.ndarray:
    faces = sorted(Path(__file__).resolve().parents[1].joinpath("tests", "data", "faces").glob("*/*.png"))
    base = [preprocess(p.read_bytes(), 112) for p in faces]
    return np.stack([base[i % len(base)] for i in range(n)])


def rate(fn: Callable[[], object], n_images: int, seconds: float) -> float:
    fn()  # warm
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += n_images
    return done / (time.perf_counter() - start)


def main() -> None:
    args = options(sizes="1,8,16,32,64", seconds=4.0)
    sizes = [int(s) for s in args.sizes.split(",")]
    gpus = configure_tensorflow()
    print(f"device: {'GPU ' + ', '.join(gpus) if gpus else 'CPU'} ({os.cpu_count()} cores)")
    x = inputs(max(sizes))
    model = build_arcface()
    fm = FaceModel(name="arcface", fn=model, input_size=112, embedding_dim=512, keras_model=model)
    engine = Engine(fm, sizes)
    engine.warm_up()

    naive = rate(lambda: [model.predict(x[i : i + 1] / 255.0, verbose=0) for i in range(8)], 8, args.seconds)
    print(f"naive model.predict, one image per call: {naive:8.1f} img/s")
    best_size, best = 0, 0.0
    for size in sizes:
        r = rate(functools.partial(engine.embed, x[:size]), size, args.seconds)
        print(f"engine fp32 batch {size:3d}:                 {r:8.1f} img/s")
        if r > best:
            best_size, best = size, r

    policy = reduced_precision_policy()
    low_model = build_arcface(policy)
    low_model.set_weights(model.get_weights())
    low = Engine(
        FaceModel(name="arcface", fn=low_model, input_size=112, embedding_dim=512, keras_model=low_model), [best_size]
    )
    low.warm_up()
    low_rate = rate(lambda: low.embed(x[:best_size]), best_size, args.seconds)
    cos = np.sum(low.embed(x[:best_size]) * engine.embed(x[:best_size]), axis=1)
    print(f"engine {policy} batch {best_size:3d}:     {low_rate:8.1f} img/s  (cosine to fp32: min {cos.min():.5f})")
    print(f"RATIO best batch ({best_size}) / naive predict loop: {best / naive:.2f}x  (target >= 3.5x)")
    print(
        f"RATIO {policy} / fp32 at batch {best_size}: {low_rate / best:.2f}x  (target >= 1.6x), "
        f"cosine min {cos.min():.5f} (target >= 0.999)"
    )


if __name__ == "__main__":
    main()
