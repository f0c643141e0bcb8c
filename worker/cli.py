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

    from worker.runtime import Runtime, load_engine
    from worker.weights import WeightsError

    try:
        engine = load_engine(settings)
        warm_s = engine.warm_up()
    except (WeightsError, OSError, ValueError) as exc:
        log.error("model_load_failed", error=str(exc))
        sys.exit(EXIT_MODEL)
    log.info("engine_ready", allowed_batch_sizes=list(engine.allowed_batch_sizes), warm_up_s=round(warm_s, 2))

    from worker.batcher import BatchWorker

    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer, job_class=SafeJob)
    worker = BatchWorker(queue, Runtime(settings, engine), settings)
    log.info("worker_started", worker=worker.name, queue=settings.queue, max_batch_size=settings.max_batch_size,
             batch_timeout_ms=settings.batch_timeout_ms)
    worker.work(burst=args.burst)
    log.info("worker_stopped", worker=worker.name, batches=worker.batches_done)
    sys.exit(0)


if __name__ == "__main__":
    main()
