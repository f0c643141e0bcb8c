"""``arcface-worker``: load the model once, warm it up, and serve the queue as a micro-batching rq worker.

Exits non-zero before taking any job: 2 for a configuration error (one line on stderr naming the ``ARCFACE_*``
variable: an invalid setting, a metrics port that cannot be bound, TensorFlow not installed), checked before
the model is loaded; 3 when the model cannot be loaded; 4 when Redis cannot be reached. ``--help`` lists
every setting.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import redis
import structlog

from producer.contract.errors import EXIT_MODEL, EXIT_REDIS
from producer.contract.errors import EXIT_USAGE as EXIT_CONFIG

_WORKER_MODULES = ("tensorflow", "h5py", "prometheus_client")  # the [worker] extra


def _config_exit(message: str) -> None:
    print(f"arcface-worker: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def settings_help() -> str:
    """Every setting as ``ARCFACE_NAME  default  meaning``, for ``arcface-worker --help``."""
    from worker.settings import WorkerSettings

    lines = ["settings (environment variables, or lines in ./.env):"]
    for name, field in WorkerSettings.model_fields.items():
        default = field.default if field.default is not None else "unset"
        if isinstance(default, list):
            default = ",".join(str(v) for v in default)
        lines.append(f"  ARCFACE_{name.upper():<24} {str(default):<14.40} {field.description or ''}".rstrip())
    lines.append(
        f"exit codes: 0 stopped, {EXIT_CONFIG} bad configuration, {EXIT_REDIS} Redis unreachable or refusing commands "
        f"while starting, {EXIT_MODEL} model failed to load, 128+N a second signal N (cold shutdown)"
    )
    return "\n".join(lines)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _checked_settings() -> Any:
    """The worker's settings, validated before anything is loaded: a bad value, a missing [worker] install or
    a metrics port that cannot be bound exits 2 with one line on stderr."""
    import socket

    from producer.contract.errors import ConfigError
    from producer.settings import load_settings
    from worker.settings import WorkerSettings

    try:
        settings = load_settings(WorkerSettings)
    except ConfigError as exc:
        _config_exit(exc.message)
    missing = [m for m in _WORKER_MODULES if not _installed(m)]
    if missing:
        _config_exit(
            f"{', '.join(missing)} not installed (a producer-only install): pip install 'arcface-service[worker]'"
        )
    port = settings.metrics_port
    if port is not None:  # within 1..65535 (the setting's bounds)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("0.0.0.0", port))
        except OSError as exc:
            _config_exit(
                f"ARCFACE_METRICS_PORT={port}: cannot serve metrics there ({exc.strerror or exc}); "
                "choose a free port or unset it"
            )
    return settings


def publish_model(connection: Any, settings: Any, engine: Any) -> dict[str, Any]:
    """Write what this worker serves to ``arcface:model:<queue>`` (JSON, no TTL, overwritten by every worker
    start): producers read the default threshold of the model from it (``bulk``)."""
    import json
    from datetime import datetime, timezone

    from producer.contract.keys import model_info_key

    model = engine.model
    info = {
        "model": model.name,
        "dim": int(model.embedding_dim),
        "threshold": float(model.threshold),
        "input_size": int(model.input_size),
        "detect": settings.detect,
        "precision": engine.precision,
        "started_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    connection.set(model_info_key(settings.queue), json.dumps(info))
    return info


def _parse_args(argv: Sequence[str] | None) -> Any:
    import argparse

    from producer.cli.common import Parser, version

    parser = Parser(
        prog="arcface-worker",
        description="Serve ArcFace jobs from Redis in micro-batches.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser.parse_args(argv)


def _connect(settings: Any, log: Any) -> Any:
    """The Redis connection, or exit 4 with a ``redis_unreachable`` event (``redis_auth_failed`` when Redis
    refused the password or ACL user)."""
    from producer.contract.errors import RedisAuthFailed, RedisUnavailable
    from producer.redisconn import connect

    try:
        return connect(settings)
    except RedisUnavailable as exc:
        log.error("redis_auth_failed" if isinstance(exc, RedisAuthFailed) else "redis_unreachable", error=str(exc))
        sys.exit(EXIT_REDIS)


def _load_models(settings: Any, log: Any) -> tuple[Any, Any, float]:
    """Load the engine and decide its precision and batch cap (measured, remembered or set), then the detector; exit
    5 with ``model_load_failed`` if either fails. Returns (engine, detector, perf_counter when loading began) after
    logging ``engine_ready``."""
    import time

    from worker.inference.weights import WeightsError
    from worker.runtime import load_detector, prepare_engine

    started = time.perf_counter()
    try:
        tuned = prepare_engine(settings)
        engine = tuned.engine
        detector = load_detector(settings)
    except WeightsError as exc:
        log.error("model_load_failed", error=str(exc))
        sys.exit(EXIT_MODEL)
    except Exception as exc:  # anything else while loading: still exit before taking a job
        log.error(
            "model_load_failed", error=f"{settings.model_path or settings.model_url}: {type(exc).__name__}: {exc}"
        )
        sys.exit(EXIT_MODEL)
    settings.preprocess_processes = _preprocess_processes(settings, tuned)
    log.info(
        "engine_ready",
        precision=engine.precision,
        precision_reason=tuned.precision.reason,
        precision_speedup=tuned.precision.speedup,
        precision_cosine_min=tuned.precision.cosine_min,
        allowed_batch_sizes=list(engine.allowed_batch_sizes),
        max_batch_size=settings.max_batch_size,
        chosen=tuned.batch_chosen,
        images_per_s={str(k): v for k, v in tuned.batch_images_per_s.items()},
        decision_cache=tuned.cache,
        preprocess_processes=settings.preprocess_processes,
        warm_up_s=round(tuned.warm_up_s, 2),
    )
    return engine, detector, started


def _preprocess_processes(settings: Any, tuned: Any) -> int:
    """``ARCFACE_PREPROCESS_PROCESSES`` resolved now that the model's device and speed are known (``auto``: see
    :func:`worker.inference.prepool.preprocess_processes`)."""
    from worker.inference.engine import has_gpu
    from worker.inference.prepool import preprocess_processes

    rate = tuned.batch_images_per_s.get(settings.max_batch_size)
    return preprocess_processes(settings, gpu=has_gpu(), model_images_per_s=rate)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("arcface-service")
    except PackageNotFoundError:
        return "unknown"


def _start_metrics(settings: Any, engine: Any, queue: Any, started: float, log: Any) -> Any:
    """The worker's Prometheus metrics (model load time counted from ``started``), served on
    ``ARCFACE_METRICS_PORT`` when set (exit 2 with a ``config_error`` event if the port was taken meanwhile)."""
    import time

    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics(
        queue_depth=lambda: queue.count,
        info={
            "model": engine.model.name,
            "queue": settings.queue,
            "dim": str(engine.model.embedding_dim),
            "version": _package_version(),
            "max_batch_size": str(settings.max_batch_size),
            "precision": engine.precision,
        },
    )
    metrics.model_load.set(time.perf_counter() - started)
    if settings.metrics_port is not None:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as exc:  # taken while the model loaded
            log.error(
                "config_error",
                error=f"ARCFACE_METRICS_PORT={settings.metrics_port}: cannot serve metrics there "
                f"({exc.strerror or exc})",
            )
            sys.exit(EXIT_CONFIG)
        log.info("metrics_serving", port=settings.metrics_port)
    return metrics


def _serve(settings: Any, connection: Any, queue: Any, engine: Any, detector: Any, metrics: Any, burst: bool) -> Any:
    """Publish the model, load the galleries and work the queue until stopped; returns the finished worker."""
    from worker.batching.worker import BatchWorker
    from worker.runtime import Runtime, load_gallery

    log = structlog.get_logger("arcface.worker")
    log.info("model_published", **publish_model(connection, settings, engine))
    # default_result_ttl: a job hash written without result_ttl (a non-Python producer) keeps its result RESULT_TTL s
    gallery = load_gallery(settings, connection, engine)
    worker = BatchWorker(
        queue, Runtime(settings, engine, detector, gallery), settings, metrics, default_result_ttl=settings.result_ttl
    )
    worker.on_reregister = lambda: log.info("model_published", **publish_model(connection, settings, engine))
    log.info(
        "worker_started",
        worker=worker.name,
        queue=settings.queue,
        redis=settings.redis_url_value() or f"embedded:{settings.data_dir}",
        max_batch_size=settings.max_batch_size,
        batch_timeout_ms=settings.batch_timeout_ms,
    )
    try:
        worker.work(burst=burst)
    finally:
        gallery.stop()
    return worker


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``arcface-worker``: validate settings (exit 2), connect (exit 4), load the model (exit 5),
    then serve the queue until stopped (exit 0)."""
    args = _parse_args(argv)

    from rq import Queue

    from producer.contract.rqjob import JSONSerializer, SafeJob
    from producer.settings import configure_logging
    from worker.settings import WorkerSettings

    settings: WorkerSettings = _checked_settings()
    configure_logging(settings, _quiet_output(settings))
    log = structlog.get_logger("arcface.worker")
    connection = _connect(settings, log)
    engine, detector, started = _load_models(settings, log)
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer, job_class=SafeJob)
    metrics = _start_metrics(settings, engine, queue, started, log)
    try:
        worker = _serve(settings, connection, queue, engine, detector, metrics, args.burst)
    except redis.RedisError as exc:  # while starting (publishing the model, loading galleries, registering)
        log.error("redis_unreachable", during="start", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        sys.exit(EXIT_REDIS)
    log.info("worker_stopped", worker=worker.name, batches=worker.batches_done)
    sys.exit(0)


def _quiet_output(settings: Any) -> Any:
    """Before TensorFlow is imported: its C++ logging off unless ``TF_CPP_MIN_LOG_LEVEL`` is set (then its Python
    logger is left alone too), and what native code still writes becomes log events (:mod:`worker.stdio`): in JSON
    mode every line on stdout and stderr, in console mode stderr's (stdout stays free for a debugger). Returns
    the stream logs are rendered to."""
    import logging
    import os

    from producer.settings import json_logs
    from worker.stdio import capture_stdio

    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return capture_stdio((1, 2) if json_logs(settings) else (2,))


def health(argv: Sequence[str] | None = None) -> None:
    """``arcface-worker-health``: exit 0 when a worker on this host has sent an rq heartbeat within
    ``--max-age`` seconds (the container HEALTHCHECK) and none of them says its preprocessing is stuck, else 1.
    A worker that is alive but stuck stops heartbeating, or publishes why with its heartbeat (preprocessing:
    nothing moved for ``ARCFACE_PREPROCESS_STALL_S``), and turns the container unhealthy."""
    import argparse
    import socket
    from datetime import datetime, timezone

    parser = argparse.ArgumentParser(prog="arcface-worker-health")
    parser.add_argument("--max-age", type=float, default=60.0)
    args = parser.parse_args(argv)
    from rq import Queue
    from rq.worker import Worker

    from producer.contract.errors import RedisUnavailable
    from producer.contract.rqjob import JSONSerializer
    from producer.redisconn import connect
    from worker.batching.rqfence import STALLED_FIELD
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    try:
        connection = connect(settings)
        workers = Worker.all(queue=Queue(settings.queue, connection=connection, serializer=JSONSerializer))
        now = datetime.now(timezone.utc)
        ages = {
            w.key: (now - (b if b.tzinfo else b.replace(tzinfo=timezone.utc))).total_seconds()
            for w in workers
            if w.hostname == socket.gethostname() and (b := w.last_heartbeat) is not None
        }
        fresh = sorted((age, key) for key, age in ages.items() if age <= args.max_age)
        stalled = [(key, connection.hget(key, STALLED_FIELD)) for _, key in fresh]
    except RedisUnavailable as exc:
        print(f"unhealthy: {exc}")
        sys.exit(1)
    for key, why in stalled:
        if why is not None:
            name = key.rsplit(":", 1)[-1]
            print(f"unhealthy: worker {name}: {why.decode() if isinstance(why, bytes) else why}")
            sys.exit(1)
    if fresh:
        print(f"healthy: heartbeat {fresh[0][0]:.1f}s ago")
        sys.exit(0)
    print(f"unhealthy: no worker on {socket.gethostname()} has heartbeated within {args.max_age:g}s")
    sys.exit(1)


if __name__ == "__main__":
    main()
