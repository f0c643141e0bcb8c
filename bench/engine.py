"""Engine benchmark: img/s at each allowed batch size vs a naive per-image ``model.predict`` loop, and float32 beside
the reduced path (bfloat16 on CPU / float16 on GPU) with the worker's fidelity check on the packaged probe faces
(cosine to float32, pair decisions changed at the threshold), and what ``ARCFACE_PRECISION=auto`` chooses, in one
run.

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
from worker.inference.precision import (  # noqa: E402
    choose_precision,
    cpu_info,
    fidelity,
    precision_name,
    probe_faces,
    reduced_variant,
)
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
    low = Engine(reduced_variant(fm, policy), [best_size])
    low.warm_up()
    low_rate = rate(lambda: low.embed(x[:best_size]), best_size, args.seconds)
    faces, _ = probe_faces(112)
    check = fidelity(engine.embed(faces), low.embed(faces), fm.threshold)
    cos = np.sum(low.embed(x[:best_size]) * engine.embed(x[:best_size]), axis=1)
    name = precision_name(policy)
    head = f"img/s at batch {best_size}"
    print(f"{'precision':<10} {head:>18} {'probe cosine min':>17} {'decisions changed':>18}")
    print(f"{'float32':<10} {best:18.1f} {1.0:17.5f} {'0 of ' + str(check.pairs):>18}")
    changed = f"{check.decisions_changed} of {check.pairs}"
    print(f"{name:<10} {low_rate:18.1f} {check.cosine_min:17.5f} {changed:>18}")
    cpu = cpu_info()
    _, choice = choose_precision(engine, "auto", cpu, bool(gpus))
    print(f"ARCFACE_PRECISION=auto chooses: {choice.precision} ({choice.reason}); CPU {cpu.model}")
    print(f"RATIO best batch ({best_size}) / naive predict loop: {best / naive:.2f}x  (target >= 3.5x)")
    print(
        f"RATIO {name} / float32 at batch {best_size}: {low_rate / best:.2f}x  (target >= 1.6x), "
        f"cosine min {cos.min():.5f} on the bench batch, {check.cosine_min:.5f} on the probe faces (target >= 0.9995)"
    )


if __name__ == "__main__":
    main()
