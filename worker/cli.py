"""``arcface-worker``: load the model once, warm it up, and serve the queue as a micro-batching rq worker.

Exits non-zero before taking any job when the model cannot be loaded or Redis cannot be reached.
"""

from __future__ import annotations

import sys
from typing import Sequence

import structlog

EXIT_MODEL, EXIT_REDIS = 3, 4


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="arcface-worker", description="Serve ArcFace jobs from Redis in micro-batches.")
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    args = parser.parse_args(argv)

    from producer.jobs import JSONSerializer, SafeJob
    from producer.redisconn import RedisUnavailable, connect
    from producer.settings import configure_logging
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    configure_logging(settings)
    log = structlog.get_logger("arcface.worker")
    try:
        connection = connect(settings)
    except RedisUnavailable as exc:
        log.error("redis_unreachable", error=str(exc))
        sys.exit(EXIT_REDIS)

    from rq import Queue

    from worker.runtime import Runtime, load_detector, load_engine
    from worker.weights import WeightsError

    import time

    started = time.perf_counter()
    try:
        engine = load_engine(settings)
        warm_s = engine.warm_up()
        detector = load_detector(settings)
    except WeightsError as exc:
        log.error("model_load_failed", error=str(exc))
        sys.exit(EXIT_MODEL)
    except Exception as exc:  # anything else while loading: still exit before taking a job
        log.error("model_load_failed", error=f"{settings.model_path or settings.model_url}: {type(exc).__name__}: {exc}")
        sys.exit(EXIT_MODEL)
    log.info("engine_ready", allowed_batch_sizes=list(engine.allowed_batch_sizes), warm_up_s=round(warm_s, 2))

    from worker.batcher import BatchWorker
    from worker.metrics import WorkerMetrics

    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer, job_class=SafeJob)
    metrics = WorkerMetrics(queue_depth=lambda: queue.count)
    metrics.model_load.set(time.perf_counter() - started)
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port)
        log.info("metrics_serving", port=settings.metrics_port)
    worker = BatchWorker(queue, Runtime(settings, engine, detector), settings, metrics)
    log.info("worker_started", worker=worker.name, queue=settings.queue, redis=settings.redis_url_value() or f"embedded:{settings.data_dir}",
             max_batch_size=settings.max_batch_size,
             batch_timeout_ms=settings.batch_timeout_ms)
    worker.work(burst=args.burst)
    log.info("worker_stopped", worker=worker.name, batches=worker.batches_done)
    sys.exit(0)


def health(argv: Sequence[str] | None = None) -> None:
    """``arcface-worker-health``: exit 0 when a worker on this host has sent an rq heartbeat within
    ``--max-age`` seconds (the container HEALTHCHECK), else 1. A worker that is alive but stuck stops
    heartbeating and turns the container unhealthy."""
    import argparse
    import socket
    from datetime import datetime, timezone

    parser = argparse.ArgumentParser(prog="arcface-worker-health")
    parser.add_argument("--max-age", type=float, default=60.0)
    args = parser.parse_args(argv)
    from rq import Queue
    from rq.worker import Worker

    from producer.jobs import JSONSerializer
    from producer.redisconn import RedisUnavailable, connect
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    try:
        connection = connect(settings)
        workers = Worker.all(queue=Queue(settings.queue, connection=connection, serializer=JSONSerializer))
    except RedisUnavailable as exc:
        print(f"unhealthy: {exc}")
        sys.exit(1)
    now = datetime.now(timezone.utc)
    mine = [w for w in workers if w.hostname == socket.gethostname() and w.last_heartbeat is not None]
    ages = [(now - (w.last_heartbeat if w.last_heartbeat.tzinfo else w.last_heartbeat.replace(tzinfo=timezone.utc))).total_seconds() for w in mine]
    if ages and min(ages) <= args.max_age:
        print(f"healthy: heartbeat {min(ages):.1f}s ago")
        sys.exit(0)
    print(f"unhealthy: no worker on {socket.gethostname()} has heartbeated within {args.max_age:g}s")
    sys.exit(1)


if __name__ == "__main__":
    main()
