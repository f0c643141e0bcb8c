"""End-to-end benchmark, all in one run on this machine (Redis, producer and worker share its cores):

- raw engine img/s at the best allowed batch (this process, model loaded once, float32);
- end-to-end embed jobs/s through Redis with one ``arcface-worker`` (micro-batching) at ``ARCFACE_PRECISION=auto``
  (the default; the precision it chose is printed) and then at ``float32``: ``RATIO auto / float32``;
- a plain rq ``SimpleWorker`` doing the same jobs one at a time (model loaded once per process);
- latency p50/p95/p99 of single jobs on an idle queue, and under a steady load at ~70 % of capacity.

    ./dev bench e2e [--jobs 320] [--load-seconds 20]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import job_span_s, options, run_plain_rq_worker
from producer.client.face_client import FaceClient  # noqa: E402
from producer.settings import ProducerSettings  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.workers import WorkerProcess  # noqa: E402
from worker.inference.weights import save_deepface_h5  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def faces() -> list[Path]:
    return sorted((ROOT / "tests" / "data" / "faces").glob("*/*.png"))


def wait_all(client: FaceClient, ids: list[str], timeout: float = 1800) -> list[Any]:
    return [client.result(j, timeout=timeout) for j in ids]


def raw_engine(weights: Path, sizes: list[int], images: list[Path]) -> tuple[dict[int, float], float]:
    """1. The raw engine in this process: img/s per batch size, and the batch-1 latency in ms."""
    from worker.inference.engine import Engine
    from worker.inference.model import load_face_model
    from worker.inference.preprocess import preprocess

    engine = Engine(load_face_model(weights), sizes)
    engine.warm_up()
    x = np.stack([preprocess(images[i % len(images)].read_bytes(), 112) for i in range(max(sizes))])
    raw: dict[int, float] = {}
    for size in sizes:
        engine.embed(x[:size])
        reps = max(2, 64 // size)
        t = time.perf_counter()
        for _ in range(reps):
            engine.embed(x[:size])
        raw[size] = size * reps / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(10):
        engine.embed(x[:1])
    batch1_ms = (time.perf_counter() - t) / 10 * 1000
    print(
        "raw engine img/s: "
        + ", ".join(f"batch {s}: {r:.1f}" for s, r in raw.items())
        + f"; batch-1 latency {batch1_ms:.1f} ms"
    )
    return raw, batch1_ms


def end_to_end(client: FaceClient, worker: WorkerProcess, images: list[Path], jobs: int) -> float:
    """2. Embed jobs/s through Redis and the micro-batching worker."""
    wait_all(client, client.embed_many(images[i % len(images)] for i in range(16)))  # settle
    start = time.perf_counter()
    ids = []
    for chunk in range(0, jobs, 64):
        ids += client.embed_many(images[i % len(images)] for i in range(chunk, min(jobs, chunk + 64)))
    wait_all(client, ids)
    e2e = jobs / (time.perf_counter() - start)
    batches = [b["images"] for b in worker.batches()]
    print(
        f"end-to-end (producer -> Redis -> arcface-worker -> result): {e2e:.1f} jobs/s, "
        f"mean batch {np.mean(batches[-20:]):.1f} images"
    )
    return e2e


def idle_latency(client: FaceClient, images: list[Path], jobs: int) -> list[float]:
    """3. Latency on an idle queue: one job at a time, producer-side round trip, ms."""
    lat_idle = []
    for i in range(jobs):
        t = time.perf_counter()
        client.result(client.embed(images[i % len(images)]), timeout=120)
        lat_idle.append((time.perf_counter() - t) * 1000)
    print(f"idle latency ms: p50 {pct(lat_idle, 50):.1f} p95 {pct(lat_idle, 95):.1f} p99 {pct(lat_idle, 99):.1f}")
    return lat_idle


def load_latency(client: FaceClient, images: list[Path], rate: float, seconds: float) -> None:
    """4. Latency under a steady load of ``rate`` jobs/s: enqueue to result written, from rq's timestamps."""
    lat_load: list[float] = []
    sent: list[tuple[str, float]] = []
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end:
        sent.append((client.embed(images[i % len(images)]), time.perf_counter()))
        i += 1
        time.sleep(max(0.0, sent[0][1] + i / rate - time.perf_counter()))
    for jid, _sent_at in sent:
        client.result(jid, timeout=300)
        job = client.queue.fetch_job(jid)
        lat_load.append((job.ended_at - job.enqueued_at).total_seconds() * 1000)
    print(
        f"latency under {rate:.1f} jobs/s (~70 %): p50 {pct(lat_load, 50):.1f} p95 {pct(lat_load, 95):.1f} "
        f"p99 {pct(lat_load, 99):.1f} ms (enqueue -> result written)"
    )


def plain_rq(url: str, images: list[Path], jobs: int) -> float:
    """5. A plain rq SimpleWorker, one job at a time, model loaded once in its process: jobs/s."""
    plain = FaceClient(ProducerSettings(queue="bench-plain"))
    warm = plain.embed(images[0])
    ids = plain.embed_many(images[i % len(images)] for i in range(jobs))
    run_plain_rq_worker(url, "bench-plain")
    wait_all(plain, [warm] + ids)
    plain_rate = jobs / job_span_s(plain, ids)
    print(f"plain rq SimpleWorker, one job at a time: {plain_rate:.1f} jobs/s")
    return plain_rate


def main() -> None:
    args = options(jobs=320, plain_jobs=96, idle_jobs=20, load_seconds=20.0, max_batch_size=32)

    tmp = Path(tempfile.mkdtemp(prefix="arcface-bench-"))
    server = RedisServer(tmp / "redis").start()
    from worker.inference.model import build_arcface

    weights = save_deepface_h5(build_arcface(), tmp / "arcface_weights.h5")
    sizes = sorted({1, 8, 16, 32, args.max_batch_size})  # the cap must be an allowed size (gpu.sh asks for 64)
    env = {
        "ARCFACE_REDIS_URL": server.url,
        "ARCFACE_MODEL_PATH": str(weights),
        "ARCFACE_ALLOWED_BATCH_SIZES": ",".join(map(str, sizes)),
        "ARCFACE_MAX_BATCH_SIZE": str(args.max_batch_size),
        "ARCFACE_RESULT_TTL": "3600",
        "ARCFACE_PRECISION": "auto",
        "ARCFACE_CACHE_DIR": str(tmp / "cache"),  # measured at this run's first start, not read from an earlier run
    }
    os.environ.update(env)
    images = faces()
    try:
        raw, batch1_ms = raw_engine(weights, sizes, images)
        best = max(raw, key=lambda size: raw[size])
        client = FaceClient(ProducerSettings(queue="bench-batch"))
        worker = WorkerProcess({**env, "ARCFACE_QUEUE": "bench-batch"}, tmp / "worker.log")
        worker.wait_ready(300)
        ready = next(e for e in worker.events() if e.get("event") == "engine_ready")
        print(f"ARCFACE_PRECISION=auto chose {ready['precision']} ({ready['precision_reason']})")
        e2e = end_to_end(client, worker, images, args.jobs)
        lat_idle = idle_latency(client, images, args.idle_jobs)
        load_latency(client, images, 0.7 * e2e, args.load_seconds)
        worker.stop()  # killed: an idle worker takes about a minute to exit on SIGTERM, and nothing is left to measure
        fp32_client = FaceClient(ProducerSettings(queue="bench-fp32"))
        fp32_env = {**env, "ARCFACE_QUEUE": "bench-fp32", "ARCFACE_PRECISION": "float32"}
        fp32_worker = WorkerProcess(fp32_env, tmp / "worker-fp32.log")
        fp32_worker.wait_ready(300)
        print("ARCFACE_PRECISION=float32:")
        e2e_fp32 = end_to_end(fp32_client, fp32_worker, images, args.jobs)
        fp32_worker.stop()
        plain_rate = plain_rq(server.url, images, args.plain_jobs)
        print(f"RATIO auto ({ready['precision']}) / float32 end to end: {e2e / e2e_fp32:.2f}x")
        print(f"RATIO end-to-end / raw engine (batch {best}, float32): {e2e / raw[best]:.2f}x  (target >= 0.90)")
        print(f"RATIO end-to-end / plain rq worker: {e2e / plain_rate:.2f}x  (target >= 1.5)")
        print(f"RATIO idle p50 / batch-1 inference: {pct(lat_idle, 50) / batch1_ms:.2f}x  (target <= 1.3)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
