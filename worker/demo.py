"""``./dev demo``: the whole pipeline on this machine, end to end.

Starts (or reuses) the embedded Redis unless ``ARCFACE_REDIS_URL`` is set, starts one ``arcface-worker``
process, sends embed and verify jobs for the real face crops in tests/data/faces through the producer client,
prints the results and stops the worker. The model is the configured one (``ARCFACE_MODEL_PATH``) or
deepface's published weights, downloaded once. Offline with no model configured, the demo says so and falls
back to a randomly initialised ArcFace saved in deepface's format, so the plumbing can still be seen
(distances are then meaningless); the worker itself never does that.

The demo checks its own output: every embedding must be finite with unit norm and every distance finite and
within [0, 2]; otherwise it says what is wrong and exits 1, as it does when the worker dies before answering.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RANDOM_WEIGHTS = "demo-random-arcface.h5"
NORM_TOLERANCE = 1e-3  # float32 L2 normalisation lands within 1e-6 of 1; anything further is a broken model
WAIT_S = 600.0  # the first job includes the model load
STOP_S = 60.0  # a worker finishes its batch and exits after SIGTERM
T = TypeVar("T")


def write_random_arcface(path: Path) -> None:
    """A randomly initialised ArcFace's weights, in deepface's layout, at ``path``."""
    from worker.inference.model import build_arcface
    from worker.inference.weights import save_deepface_h5

    save_deepface_h5(build_arcface(), path)


def random_weights(cache_dir: Path) -> Path:
    """The demo's random ArcFace weights in ``cache_dir``: made once, checked on every use, rebuilt when damaged;
    concurrent demos share one file."""
    from worker.inference.cache import cached_file
    from worker.inference.weights import check_weights_file

    return cached_file(
        cache_dir / RANDOM_WEIGHTS,
        write_random_arcface,
        check=check_weights_file,
        what="the demo's random ArcFace weights",
    )


def output_problems(norms: Sequence[float], distances: Sequence[float]) -> list[str]:
    """What is wrong with the demo's numbers (empty when nothing is): embeddings have unit norm, distances
    are finite and within [0, 2]."""
    problems = [
        f"embedding {i} has norm {n:.4f}, not 1 (the model produces no usable embeddings)"
        for i, n in enumerate(norms)
        if not abs(n - 1.0) <= NORM_TOLERANCE
    ]
    problems += [f"distance {i} is {d}, outside [0, 2]" for i, d in enumerate(distances) if not 0.0 <= d <= 2.0]
    return problems


def _model_path() -> tuple[str, bool]:
    from worker.inference.weights import WeightsError
    from worker.runtime import default_weights
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    if settings.model_path:
        return str(settings.model_path), True
    try:
        return str(default_weights(settings, retries=1, timeout_s=15)), True
    except WeightsError as exc:
        print(
            f"demo: {exc}\ndemo: continuing with a RANDOMLY INITIALISED ArcFace (plumbing only: distances mean nothing)"
        )
    return str(random_weights(settings.cache_dir)), False


def _faces() -> list[Path]:
    """The real face crops the demo sends: ``<root>/<person>/*.png``, the repository's tests/data/faces unless
    ``ARCFACE_DEMO_FACES`` names another folder laid out the same way."""
    root = Path(os.environ.get("ARCFACE_DEMO_FACES", REPO / "tests" / "data" / "faces"))
    found = sorted(root.glob("*/*.png"))
    if len(found) < 3:
        raise SystemExit(
            f"demo: need at least 3 face crops as {root}/<person>/*.png, found {len(found)};"
            " set ARCFACE_DEMO_FACES to a folder laid out that way"
        )
    return found


def _wait(worker: subprocess.Popen[bytes], get: Callable[[float], T]) -> T:
    """``get(timeout)``'s result, asked for a second at a time so that a worker that dies ends the wait."""
    from producer.contract.errors import ResultTimeout

    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return get(1.0)
        except ResultTimeout:
            if worker.poll() is not None:
                raise SystemExit(
                    f"demo: FAILED: the worker exited (code {worker.returncode}) before answering; its log is above"
                ) from None
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: FAILED: no result within {WAIT_S:.0f}s") from None


def _norm(embedding: Any) -> float:
    return float(np.sqrt(np.sum(np.square(embedding, dtype=np.float64))))


def main() -> None:
    from producer.client.face_client import FaceClient
    from producer.contract.errors import ArcFaceError
    from producer.redisconn import connect
    from producer.settings import ProducerSettings, load_settings
    from worker.stdio import quiet_native_stderr

    # The worker quiets TensorFlow itself (TF_CPP_MIN_LOG_LEVEL=3 unless set); it gets the user's value, if any.
    env = dict(os.environ)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process loads TensorFlow too (the model's weights)
    faces = _faces()
    try:
        settings = load_settings(ProducerSettings)
        connection = connect(settings)
    except ArcFaceError as exc:
        raise SystemExit(f"demo: {exc.message}") from None
    where = "embedded Redis under " + str(settings.data_dir) if settings.redis_url is None else "ARCFACE_REDIS_URL"
    print(f"demo: Redis: {where}")
    with quiet_native_stderr():  # TensorFlow's banner; a CPU-only machine's CUDA probe is no error
        model, trained = _model_path()
    env.update(
        ARCFACE_MODEL_PATH=model,
        ARCFACE_ALLOWED_BATCH_SIZES=os.environ.get("ARCFACE_ALLOWED_BATCH_SIZES", "1,4,16"),
        ARCFACE_MAX_BATCH_SIZE=os.environ.get("ARCFACE_MAX_BATCH_SIZE", "16"),
    )
    print(f"demo: starting arcface-worker with model {model}")
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli"], env=env, cwd=REPO)
    problems: list[str] = []
    try:
        client = FaceClient(settings, connection)
        a, b, c = faces[0], faces[1], faces[-1]
        start = time.monotonic()
        embed_ids = client.embed_many(faces[:8])
        same = client.verify(a, b, ref="same person?")
        other = client.verify(a, c, ref="different people?")
        first = _wait(worker, partial(client.result_embed, embed_ids[0]))
        print(
            f"demo: embed {a.name}: {first.dim}-d, norm {_norm(first.embedding):.4f}, batch {first.timing.batch_size}"
        )
        distances = []
        for jid, label in ((same, f"{a.name} vs {b.name}"), (other, f"{a.name} vs {c.name}")):
            r = _wait(worker, partial(client.result_verify, jid))
            distances.append(r.distance)
            print(f"demo: verify {label}: distance {r.distance:.4f}, threshold {r.threshold}, similar={r.similar}")
        done = [_wait(worker, partial(client.result_embed, j)) for j in embed_ids]
        print(
            f"demo: {len(done) + 2} jobs finished in {time.monotonic() - start:.1f}s (model load included);"
            f" largest batch {max(r.timing.batch_size for r in done)}"
        )
        if not trained:
            print("demo: (random weights: the distances above carry no meaning)")
        problems = output_problems([_norm(r.embedding) for r in done], distances)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            rc = worker.wait(STOP_S)
            print(f"demo: worker stopped (exit {rc})")
        except subprocess.TimeoutExpired:
            worker.kill()
            rc = worker.wait()
            print(f"demo: FAILED: the worker did not stop within {STOP_S:.0f}s of SIGTERM; killed it")
    for problem in problems:
        print(f"demo: FAILED: {problem}")
    sys.exit(0 if rc == 0 and not problems else 1)


if __name__ == "__main__":
    main()
