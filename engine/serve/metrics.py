"""The service's Prometheus metrics, in a registry of its own (one per application, so tests
and several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

# Seconds: a tiny CPU model answers in milliseconds, ViT-g on a CPU in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class ServiceMetrics:
    """Requests, latency per stage, queue depth, batch sizes, rejections and database entries."""

    def __init__(self, queue_depth: Callable[[], float], entries: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "knnclip_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "knnclip_request_seconds",
            "request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "knnclip_stage_seconds",
            "pipeline stage time per image",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "knnclip_batch_size", "images per segment_batch call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "knnclip_batch_seconds", "time of a segment_batch call", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.in_flight = Gauge(
            "knnclip_requests_in_flight", "HTTP requests received and not yet answered", registry=self.registry
        )
        self.rejections = Counter(
            "knnclip_rejections", "requests refused by reason", ["reason"], registry=self.registry
        )
        Gauge("knnclip_queue_depth", "requests waiting for a batch", registry=self.registry).set_function(queue_depth)
        Gauge("knnclip_database_entries", "entries in the database", registry=self.registry).set_function(entries)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage != "batch_size":
                self.stage.labels(stage).observe(ms / 1000.0)

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
