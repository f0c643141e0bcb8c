"""Prometheus metrics of a worker, served on ``ARCFACE_METRICS_PORT`` when it is set."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """The worker's counters and histograms, in a registry of their own."""

    def __init__(self, queue_depth: Callable[[], int] | None = None, info: dict[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        PlatformCollector(registry=r)
        self.info = Gauge(
            "arcface_worker_info", "Always 1; labels say what this worker serves", sorted(info or {}), registry=r
        )
        if info:
            self.info.labels(**info).set(1)
        self.jobs = Counter(
            "arcface_jobs_total",
            "Jobs completed, by kind, outcome and error code (kind 'invalid': unreadable or not ours)",
            ["kind", "outcome", "code"],
            registry=r,
        )
        self.images = Counter("arcface_images_total", "Images embedded (every item of multi-image jobs)", registry=r)
        self.detect = self._seconds("arcface_detect_seconds", "Face detection time per batch (when detection is on)")
        self.batch_images = Histogram(
            "arcface_batch_images", "Images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.queue_wait = self._seconds(
            "arcface_queue_wait_seconds", "Time a job waited in the queue", _LATENCY_BUCKETS + (120, 300)
        )
        self.preprocess = self._seconds(
            "arcface_preprocess_seconds",
            "Decode + resize time per batch (waiting for the preprocessing pool; detection not included)",
        )
        self.inference = self._seconds("arcface_inference_seconds", "Model time per batch")
        self.write = self._seconds("arcface_write_seconds", "Redis write time per batch")
        self.model_load = Gauge("arcface_model_load_seconds", "Seconds the model took to load and warm up", registry=r)
        if queue_depth is not None:
            r.register(_QueueDepth(queue_depth))

    def _seconds(self, name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
        """A latency histogram in this worker's registry."""
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def observe_batch(
        self, images: int, embedded: int, preprocess_s: float, detect_s: float, inference_s: float, write_s: float
    ) -> None:
        """One engine batch: its size and the time of each stage."""
        self.batch_images.observe(images)
        self.images.inc(embedded)
        self.preprocess.observe(max(0.0, preprocess_s))
        if detect_s:
            self.detect.observe(detect_s)
        self.inference.observe(inference_s)
        self.write.observe(write_s)

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
