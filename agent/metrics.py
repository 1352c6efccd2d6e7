"""Prometheus metrics for the scoring API: requests, errors and latency per model and image version,
plus the agent's own process metrics (RSS, CPU, open files) from the standard process collector."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from agent.runtime import LoadedImage, Runtime

# Edge models answer in microseconds to seconds: buckets from 100 us to 10 s.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry, namespace="edge_agent")
        r = self.registry
        self.requests = Counter(
            "edge_scoring_requests", "Scoring requests answered", ["model", "version", "status"], registry=r
        )
        self.errors = Counter(
            "edge_scoring_errors",
            "Scoring requests answered with a 4xx or 5xx status",
            ["model", "version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "edge_scoring_latency_seconds",
            "Time from request body to response",
            ["model", "version"],
            buckets=BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "edge_scoring_refused", "Requests refused before scoring", ["reason"], registry=r
        )
        self.swaps = Gauge("edge_runtime_swaps", "Images made current since the agent started", registry=r)
        self.image = Gauge(
            "edge_runtime_image_info",
            "The image serving requests (value 1)",
            ["name", "version", "sha256"],
            registry=r,
        )

    def observe(self, img: LoadedImage, model: str, status: int, seconds: float) -> None:
        s = str(status)
        self.requests.labels(model, img.version, s).inc()
        if status >= 400:
            self.errors.labels(model, img.version, s).inc()
        self.latency.labels(model, img.version).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def render(self, runtime: Runtime) -> tuple[bytes, str]:
        self.swaps.set(runtime.swaps)
        self.image.clear()
        if (img := runtime.current) is not None:
            self.image.labels(img.name, img.version, img.sha256).set(1)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
