"""1:N identify benchmark: queries/s and memory of one worker's in-memory gallery for 10k / 100k / 1M synthetic
enrolled embeddings, float32 and float16, next to plain verify (one dot product) on the same machine.

    ./dev bench identify [--sizes 10000,100000,1000000] [--dtypes float32,float16] [--batch 32] [--seconds 3]
                         [--device cpu|tf] [--redis 100000]

Memory is what Python allocates for the index (tracemalloc: the matrix, the enrollment-id and subject tables),
per enrollment. ``--redis N`` also measures, on a Redis this script starts: writing N enrollments (Lua scripts,
pipelined), Redis memory per enrollment, a worker's start-up load time, and how long an enrollment takes to
reach a second worker.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.contract.metric import cosine_distance  # noqa: E402
from worker.gallery import DeviceCopy, GalleryIndex, GalleryStore  # noqa: E402

DIM = 512
CHUNK = 65536
MiB = 1024 * 1024


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def build(n: int, dtype: str, seed: int = 0) -> tuple[GalleryIndex, int]:
    """An index of ``n`` random unit embeddings (one subject each); returns it and the bytes it holds."""
    gc.collect()
    tracemalloc.start()
    index = GalleryIndex("bench", "arcface", DIM, dtype)
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        ids = [f"e{start + i:07d}" for i in range(k)]
        index.add_many(ids, [f"user-{start + i:07d}" for i in range(k)], unit_rows(rng, k))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return index, held


def queries_for(index: GalleryIndex, batch: int, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    """Noisy copies of enrolled rows (cosine distance ~0.3 to their source), and the subjects they come from."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(index.n, size=batch, replace=False)
    src = index.vectors(rows).astype(np.float32)
    q = src + rng.standard_normal(src.shape, dtype=np.float32) * (0.8 / np.sqrt(DIM))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, [index.subjects[index.row_subject[r]] for r in rows]


def time_search(index: GalleryIndex, q: np.ndarray, seconds: float, device: DeviceCopy | None) -> tuple[float, int]:
    """Median seconds per batch search (top 5 within 0.68) and the extra bytes a search allocates at its peak."""
    index.search(q, 5, 0.68, device)  # warm-up (and, with a device, the upload)
    times = []
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    index.search(q, 5, 0.68, device)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t = time.perf_counter()
        index.search(q, 5, 0.68, device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak - base


def plain_verify_rate(seconds: float = 1.0) -> tuple[float, float]:
    """Verifies/s of the worker's pairwise verify (cosine_distance of two embeddings, float64 dot) and of a bare
    float32 numpy dot product."""
    rng = np.random.default_rng(2)
    a, b = unit_rows(rng, 2)
    rates = []
    for fn in (lambda: cosine_distance(a, b), lambda: float(a @ b)):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(1000):
                fn()
            n += 1000
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def redis_figures(n: int, dtype: str) -> None:
    """Write n enrollments through the Lua scripts, then measure Redis memory, start-up load and propagation."""
    from tests.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="arcface-gallery-"))).start()
    try:
        conn = server.client()
        before = conn.info("memory")["used_memory"]
        writer = GalleryStore(conn, "arcface", events_maxlen=10_000)
        rng = np.random.default_rng(3)
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            k = min(1000, n - start)
            vecs = unit_rows(rng, k)
            writer.enroll_many(
                "bench", [(f"user-{start + i:07d}", f"e{start + i:07d}", vecs[i], None) for i in range(k)]
            )
        write_s = time.perf_counter() - t0
        used = conn.info("memory")["used_memory"] - before
        print(
            f"redis: {n} enrollments written in {write_s:.1f}s ({n / write_s:.0f}/s, one Lua script each, pipelined "
            f"by 1000); Redis memory {used / MiB:.0f} MiB ({used / n / 1024:.2f} KiB/enrollment incl. the "
            f"{10_000}-event stream)"
        )
        t0 = time.perf_counter()
        a = GalleryStore(server.client(), "arcface", dtype=dtype).start()
        load_s = time.perf_counter() - t0
        print(f"redis: a worker's start-up load of {n} enrollments ({dtype}): {load_s:.1f}s ({n / load_s:.0f}/s)")
        b = GalleryStore(server.client(), "arcface", dtype=dtype).start()
        lags = []
        for i in range(30):
            v = unit_rows(rng, 1)[0]
            a.enroll("bench", f"new-{i}", f"new-{i}", v)
            t = time.perf_counter()
            while b.index_for("bench", DIM).row_of.get(f"new-{i}") is None:
                time.sleep(0.0002)
            lags.append(time.perf_counter() - t)
        print(
            f"redis: enroll on one worker -> visible on another: median {statistics.median(lags) * 1000:.1f} ms, "
            f"max {max(lags) * 1000:.1f} ms over {len(lags)} (target < 1000 ms)"
        )
        a.stop()
        b.stop()
    finally:
        server.stop()


def identify_figures(n: int, dtype: str, args: argparse.Namespace) -> tuple[float, int]:
    """Search time and memory of an index of ``n`` enrollments: (seconds per batch of queries, bytes held)."""
    t0 = time.perf_counter()
    index, held = build(n, dtype)
    build_s = time.perf_counter() - t0
    q, truth = queries_for(index, args.batch)
    device = DeviceCopy() if args.device == "tf" else None
    per_batch, peak = time_search(index, q, args.seconds, device)
    found = index.search(q, 5, 0.68, device)
    top1 = sum(1 for m, t in zip(found, truth, strict=True) if m and m[0].subject == t) / len(truth)
    matrix = sum(p.nbytes for p in index.pages)
    qps = args.batch / per_batch
    print(
        f"identify {n:>9,} x {DIM} {dtype}: batch of {args.batch} in {per_batch * 1000:8.2f} ms -> {qps:10,.0f} "
        f"queries/s ({per_batch / args.batch * 1000:.3f} ms/query); memory {held / MiB:7.1f} MiB = "
        f"{held / n:,.0f} B/enrollment (matrix {matrix / n:,.0f}, index tables {(held - matrix) / n:,.0f}); "
        f"search peak +{peak / MiB:.1f} MiB; top-1 {top1:.2f}; built in {build_s:.1f}s"
    )
    del index, device
    gc.collect()
    return per_batch, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument(
        "--device", choices=["cpu", "tf"], default="cpu", help="tf: TensorFlow's device (the GPU when there is one)"
    )
    ap.add_argument(
        "--redis",
        type=int,
        default=0,
        metavar="N",
        help="also measure Redis writes/memory/load/propagation with N enrollments",
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(
        f"machine: {os.cpu_count()} CPUs, BLAS threads {threads}, numpy {np.__version__}, device {args.device}, "
        f"batch {args.batch} queries, top 5 within 0.68, {DIM}-d"
    )
    verify_rate, dot_rate = plain_verify_rate()
    print(
        f"plain verify (cosine_distance of two {DIM}-d embeddings, as Engine.verify): {verify_rate:,.0f}/s "
        f"({1e6 / verify_rate:.2f} us); bare float32 dot: {dot_rate:,.0f}/s ({1e6 / dot_rate:.2f} us)"
    )
    results = {(n, dtype): identify_figures(n, dtype, args) for n in sizes for dtype in dtypes}
    for (n, dtype), (per_batch, _held) in results.items():
        per_query = per_batch / args.batch
        print(
            f"RATIO identify per query ({n:,} {dtype}) / plain verify: {per_query * verify_rate:,.0f}x  "
            f"({1 / per_query:,.0f} vs {verify_rate:,.0f} per second)"
        )
    for n in sizes:
        if (n, "float32") in results and (n, "float16") in results:
            t32, m32 = results[(n, "float32")]
            t16, m16 = results[(n, "float16")]
            print(f"RATIO float16 / float32 at {n:,}: time {t16 / t32:.2f}x, memory {m16 / m32:.2f}x")
    if args.redis:
        redis_figures(args.redis, dtypes[0])


if __name__ == "__main__":
    main()
