"""Plumbing benchmark: everything around the model, with a near-free model (a bring-your-own Keras model
``112x112x3 -> GlobalAveragePooling2D -> Dense(512)``), all in one run on this machine:

- single-image embed jobs/s through one ``arcface-worker`` (the 40 crops inline, queue pre-filled while the
  worker is suspended with ``rq suspend``, then drained), Redis commands per job (``INFO commandstats`` deltas),
  worker CPU ms per job;
- multi-image ``embed_batch`` jobs (64 crops each): images/s, Redis commands per image;
- a plain rq ``SimpleWorker`` on the same single-image jobs, side by side;
- both arcface-worker figures with preprocessing on threads (``ARCFACE_PREPROCESS_PROCESSES=0``) and in processes
  (the default on 2+ cores); the targets are read on the latter.

    ./dev bench plumbing [--jobs 3000] [--batch-jobs 60] [--plain-jobs 600]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench._common import job_span_s, options, run_plain_rq_worker
from producer.client.face_client import FaceClient  # noqa: E402
from producer.contract.requests import ImageRef  # noqa: E402
from producer.settings import ProducerSettings  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.workers import WorkerProcess  # noqa: E402

SUSPENDED_KEY = "rq:suspended"  # rq's `rq suspend` flag


def tiny_model(path: Path) -> Path:
    """The near-free model: global average pooling and one dense layer."""
    import keras

    inp = keras.Input((112, 112, 3))
    out = keras.layers.Dense(512)(keras.layers.GlobalAveragePooling2D()(inp))
    keras.Model(inp, out).save(path)
    return path


def commands(conn: redis.Redis) -> int:
    return sum(v["calls"] for k, v in conn.info("commandstats").items() if k.startswith("cmdstat_"))


def cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the worker's preprocessing processes)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def drain(
    conn: redis.Redis, queue: str, n: int, pid: int | None, start_fn: Callable[[], object]
) -> tuple[float, int, float]:
    """Start the drain with ``start_fn``, wait until ``n`` jobs finished. Returns (seconds, commands, worker cpu s)."""
    finished = f"rq:finished:{queue}"
    base = conn.zcard(finished)
    cpu0 = cpu_s(pid) if pid else 0.0
    c0 = commands(conn)
    t0 = time.perf_counter()
    start_fn()
    polls = 0
    while conn.zcard(finished) - base < n:
        polls += 1
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    used = commands(conn) - c0 - polls - 2  # our own ZCARD polls and INFO calls
    return elapsed, used, (cpu_s(pid) - cpu0) if pid else 0.0


def single_image_jobs(
    conn: redis.Redis, client: FaceClient, worker: WorkerProcess, refs: list[ImageRef], jobs: int
) -> tuple[float, float, float]:
    """1. Single-image jobs through one arcface-worker: (jobs/s, Redis commands/job, worker CPU ms/job)."""
    client.result(client.embed(refs[0]), timeout=60)  # warm
    conn.set(SUSPENDED_KEY, 1)
    time.sleep(1.5)
    for chunk in range(0, jobs, 500):
        client.embed_many(refs[i % len(refs)] for i in range(chunk, min(jobs, chunk + 500)))
    secs, cmds, cpu = drain(conn, "plumb", jobs, worker.proc.pid, lambda: conn.delete(SUSPENDED_KEY))
    rate, per_job, cpu_ms = jobs / secs, cmds / jobs, cpu / jobs * 1000
    print(f"single-image jobs: {rate:.0f} jobs/s, {per_job:.1f} Redis commands/job, worker CPU {cpu_ms:.2f} ms/job")
    return rate, per_job, cpu_ms


def multi_image_jobs(
    conn: redis.Redis, client: FaceClient, worker: WorkerProcess, refs: list[ImageRef], jobs: int, k: int
) -> tuple[float, float, float]:
    """2. ``jobs`` embed_batch jobs of ``k`` images: (images/s, Redis commands/image, worker CPU ms/image)."""
    conn.set(SUSPENDED_KEY, 1)
    time.sleep(1.5)
    for j in range(jobs):
        client.embed_batch([refs[(j * k + i) % len(refs)] for i in range(k)])
    n_images = jobs * k
    secs, cmds, cpu = drain(conn, "plumb", jobs, worker.proc.pid, lambda: conn.delete(SUSPENDED_KEY))
    rate, per_image, cpu_ms = n_images / secs, cmds / n_images, cpu / n_images * 1000
    print(
        f"multi-image jobs ({k} images each): {rate:.0f} images/s, {per_image:.2f} Redis commands/image, "
        f"worker CPU {cpu_ms:.2f} ms/image"
    )
    return rate, per_image, cpu_ms


def plain_rq(conn: redis.Redis, url: str, refs: list[ImageRef], jobs: int) -> float:
    """3. A plain rq SimpleWorker on the same single-image jobs (model loaded once in its process, before the
    span): jobs/s."""
    plain = FaceClient(ProducerSettings(queue="plumb-plain"))
    ids = plain.embed_many(refs[i % len(refs)] for i in range(jobs))
    c0 = commands(conn)
    run_plain_rq_worker(url, "plumb-plain")
    plain_cmds = (commands(conn) - c0 - 1) / jobs
    rate = (len(ids) - 1) / job_span_s(plain, ids[1:])
    print(
        f"plain rq SimpleWorker: {rate:.0f} jobs/s, {plain_cmds:.1f} Redis commands/job (its start and stop included)"
    )
    return rate


def arcface_worker(
    conn: redis.Redis, env: dict[str, str], tmp: Path, refs: list[ImageRef], args: argparse.Namespace, processes: str
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Single-image, then multi-image jobs through one arcface-worker with ``ARCFACE_PREPROCESS_PROCESSES``."""
    print(f"ARCFACE_PREPROCESS_PROCESSES={processes}:")
    client = FaceClient(ProducerSettings(queue="plumb"))
    worker = WorkerProcess(
        {**env, "ARCFACE_QUEUE": "plumb", "ARCFACE_PREPROCESS_PROCESSES": processes},
        tmp / f"worker-{processes}.log",
        ARCFACE_LOG_LEVEL="INFO",
    )
    worker.wait_ready(300)
    single = single_image_jobs(conn, client, worker, refs, args.jobs)
    multi = multi_image_jobs(conn, client, worker, refs, args.batch_jobs, args.images_per_job)
    worker.signal(15)
    worker.wait(60)
    worker.stop()
    return single, multi


def main() -> None:
    args = options(jobs=3000, batch_jobs=60, images_per_job=64, plain_jobs=600, max_batch_size=64)

    tmp = Path(tempfile.mkdtemp(prefix="arcface-plumbing-"))
    server = RedisServer(tmp / "redis").start()
    model = tiny_model(tmp / "tiny.keras")
    env = {
        "ARCFACE_REDIS_URL": server.url,
        "ARCFACE_MODEL_PATH": str(model),
        "ARCFACE_MAX_BATCH_SIZE": str(args.max_batch_size),
        "ARCFACE_ALLOWED_BATCH_SIZES": "1,8,16,32,64",
        "ARCFACE_RESULT_TTL": "3600",
        "ARCFACE_LOG_LEVEL": "INFO",
    }
    os.environ.update(env)
    faces = sorted((ROOT / "tests" / "data" / "faces").glob("*/*.png"))
    refs = [ImageRef.inline(p.read_bytes()) for p in faces]
    conn = redis.Redis.from_url(server.url)
    try:
        rates = {p: arcface_worker(conn, env, tmp, refs, args, p) for p in ("0", "auto")}  # threads, processes
        plain_rate = plain_rq(conn, server.url, refs, args.plain_jobs)
        (threads_single, _, _), (threads_multi, _, _) = rates["0"]
        (single_rate, single_cmds, single_cpu), (multi_rate, multi_cmds, multi_cpu) = rates["auto"]
        print(
            f"RATIO preprocessing processes / threads: single-image {single_rate / threads_single:.2f}x, "
            f"multi-image {multi_rate / threads_multi:.2f}x"
        )
        print(f"RATIO single-image jobs/s per worker: {single_rate:.0f}  (target >= 1000)")
        print(f"RATIO Redis commands per single-image job: {single_cmds:.1f}  (target <= 15)")
        print(f"RATIO multi-image images/s per worker: {multi_rate:.0f}  (target >= 2500)")
        print(f"RATIO Redis commands per image in multi-image jobs: {multi_cmds:.2f}  (target <= 2)")
        print(f"RATIO worker CPU ms per image (its processes too): single {single_cpu:.2f}, multi {multi_cpu:.2f}")
        print(f"RATIO single-image jobs/s, arcface-worker / plain rq worker: {single_rate / plain_rate:.1f}x")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
