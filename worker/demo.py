"""``./dev demo``: the whole pipeline on this machine, end to end.

Starts (or reuses) the embedded Redis unless ``ARCFACE_REDIS_URL`` is set, starts one ``arcface-worker``
process, sends embed and verify jobs for the real face crops in tests/data/faces through the producer client,
prints the results and stops the worker. The model is the configured one (``ARCFACE_MODEL_PATH``) or
deepface's published weights, downloaded once. Offline with no model configured, the demo says so and falls
back to a randomly initialised ArcFace saved in deepface's format, so the plumbing can still be seen
(distances are then meaningless); the worker itself never does that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    fallback = settings.cache_dir / "demo-random-arcface.h5"
    if not fallback.exists():
        from worker.inference.model import build_arcface
        from worker.inference.weights import save_deepface_h5

        fallback.parent.mkdir(parents=True, exist_ok=True)
        save_deepface_h5(build_arcface(), fallback)
    return str(fallback), False


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


def main() -> None:
    from producer.client.face_client import FaceClient
    from producer.redisconn import connect
    from producer.settings import ProducerSettings

    faces = _faces()
    settings = ProducerSettings()
    where = "embedded Redis under " + str(settings.data_dir) if settings.redis_url is None else "ARCFACE_REDIS_URL"
    connection = connect(settings)
    print(f"demo: Redis: {where}")
    model, trained = _model_path()
    env = {
        **os.environ,
        "ARCFACE_MODEL_PATH": model,
        "ARCFACE_ALLOWED_BATCH_SIZES": os.environ.get("ARCFACE_ALLOWED_BATCH_SIZES", "1,4,16"),
        "ARCFACE_MAX_BATCH_SIZE": os.environ.get("ARCFACE_MAX_BATCH_SIZE", "16"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    print(f"demo: starting arcface-worker with model {model}")
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli"], env=env, cwd=REPO)
    try:
        client = FaceClient(settings, connection)
        a, b, c = faces[0], faces[1], faces[-1]
        start = time.monotonic()
        embed_ids = client.embed_many(faces[:8])
        same = client.verify(a, b, ref="same person?")
        other = client.verify(a, c, ref="different people?")
        first = client.result_embed(embed_ids[0], timeout=600)
        print(
            f"demo: embed {a.name}: {first.dim}-d, norm {float((first.embedding**2).sum()) ** 0.5:.4f}, "
            f"batch {first.timing.batch_size}"
        )
        for jid, label in ((same, f"{a.name} vs {b.name}"), (other, f"{a.name} vs {c.name}")):
            r = client.result_verify(jid, timeout=600)
            print(f"demo: verify {label}: distance {r.distance:.4f}, threshold {r.threshold}, similar={r.similar}")
        done = [client.result(j, timeout=600) for j in embed_ids]
        print(
            f"demo: {len(done) + 2} jobs finished in {time.monotonic() - start:.1f}s (model load included);"
            f" largest batch {max(r.timing.batch_size for r in done)}"
        )
        if not trained:
            print("demo: (random weights: the distances above carry no meaning)")
    finally:
        worker.send_signal(signal.SIGTERM)
        rc = worker.wait(60)
        print(f"demo: worker stopped (exit {rc})")
    sys.exit(0 if rc == 0 else 1)


if __name__ == "__main__":
    main()
