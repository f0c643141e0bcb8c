"""Prometheus metrics of a worker, served on ``ARCFACE_METRICS_PORT`` when it is set."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """The worker's counters and histograms, in a registry of their own."""

    def __init__(self, queue_depth: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("arcface_jobs_total", "Jobs completed, by kind, outcome and error code", ["kind", "outcome", "code"], registry=r)
        self.batch_images = Histogram("arcface_batch_images", "Images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_wait = Histogram("arcface_queue_wait_seconds", "Time a job waited in the queue", buckets=_LATENCY_BUCKETS + (120, 300), registry=r)
        self.preprocess = Histogram("arcface_preprocess_seconds", "Decode + resize time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("arcface_inference_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.write = Histogram("arcface_write_seconds", "Redis write time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.model_load = Gauge("arcface_model_load_seconds", "Seconds the model took to load and warm up", registry=r)
        if queue_depth is not None:
            r.register(_QueueDepth(queue_depth))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


class _QueueDepth:
    """Reads the queue length from Redis at scrape time."""

    def __init__(self, depth: Callable[[], int]) -> None:
        self.depth = depth

    def collect(self) -> Any:
        g = GaugeMetricFamily("arcface_queue_depth", "Jobs waiting in the queue")
        try:
            g.add_metric([], float(self.depth()))
        except Exception:  # Redis unreachable at scrape time: report nothing rather than fail the scrape
            return
        yield g
