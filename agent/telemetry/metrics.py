"""Prometheus metrics for the scoring API: requests, errors and latency per model and image version,
plus the agent's own process metrics (RSS, CPU, open files) from the standard process collector."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class ImageInfo(Protocol):
    """What the metrics read of a loaded image (the serving wing's ``LoadedImage``)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def sha256(self) -> str: ...


class RuntimeInfo(Protocol):
    """What the metrics read of the runtime (the serving wing's ``Runtime``)."""

    @property
    def swaps(self) -> int: ...
    @property
    def current(self) -> ImageInfo | None: ...


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


class InferenceWindow:
    """Counts and a bounded reservoir of latencies (uniform sample beyond RESERVOIR requests)."""

    RESERVOIR = 4096
    __slots__ = ("errors", "requests", "samples")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.samples: list[float] = []

    def add(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 400:
            self.errors += 1
        if len(self.samples) < self.RESERVOIR:
            self.samples.append(seconds)
        else:
            i = random.randrange(self.requests)
            if i < self.RESERVOIR:
                self.samples[i] = seconds

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)

        def q(p: float) -> float | None:
            return round(s[min(len(s) - 1, int(p * len(s)))] * 1000, 4) if s else None

        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.errors / self.requests, 6) if self.requests else 0.0,
                "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99)}  # fmt: skip


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
        self.commit_timeouts = Counter(
            "edge_capture_commit_timeouts",
            "Captured requests answered before their record was committed "
            "(telemetry.capture_commit_timeout passed: a slow or wedged disk)",
            registry=r,
        )
        self._window: dict[tuple[str, str], InferenceWindow] = {}
        #: the buffer's and the uploader's state ({"buffer": Buffer.stats(), "sync": SyncState}), read
        #: at scrape time only
        self.telemetry_source: Callable[[], dict[str, Any]] | None = None
        self.buffered = Gauge(
            "edge_buffer_records", "Records waiting in the telemetry buffer", ["cls"], registry=r
        )
        self.buffer_bytes = Gauge("edge_buffer_bytes", "Disk used by the telemetry buffer", registry=r)
        self.dropped = Gauge(
            "edge_buffer_dropped_records",
            "Records dropped since the buffer was created",
            ["cls", "reason"],
            registry=r,
        )
        self.uploaded = Gauge(
            "edge_sync_uploaded_records", "Records uploaded since the agent started", ["cls"], registry=r
        )
        self.sync_failing = Gauge(
            "edge_sync_failing", "1 while the last upload attempt failed", ["code"], registry=r
        )
        self.image = Gauge(
            "edge_runtime_image_info",
            "The image serving requests (value 1)",
            ["name", "version", "sha256"],
            registry=r,
        )

    def observe(self, img: ImageInfo, model: str, status: int, seconds: float) -> None:
        s = str(status)
        self.requests.labels(model, img.version, s).inc()
        if status >= 400:
            self.errors.labels(model, img.version, s).inc()
        self.latency.labels(model, img.version).observe(seconds)
        key = (model, img.version)
        w = self._window.get(key)
        if w is None:
            w = self._window[key] = InferenceWindow()
        w.add(status, seconds)

    def take_window(self) -> dict[str, dict[str, Any]]:
        """Requests, errors and latency quantiles per model version since the last call: the
        inference metrics that go to the buffer and the heartbeat (rollout health gates read them)."""
        window, self._window = self._window, {}
        return {f"{model}@{version}": {"model": model, "version": version, **w.summary()}
                for (model, version), w in window.items()}  # fmt: skip

    def _telemetry(self, doc: dict[str, Any]) -> None:
        buf, sync = doc.get("buffer") or {}, doc.get("sync") or {}
        for cls, c in (buf.get("classes") or {}).items():
            self.buffered.labels(cls).set(c["records"])
        self.buffer_bytes.set(buf.get("size_bytes", 0))
        for cls, reasons in (buf.get("dropped") or {}).items():
            for reason, n in reasons.items():
                self.dropped.labels(cls, reason).set(n["records"])
        for cls, n in (sync.get("records_per_class") or {}).items():
            self.uploaded.labels(cls).set(n)
        self.sync_failing.clear()
        if err := sync.get("last_error"):
            self.sync_failing.labels(err.get("code", "")).set(1)

    def commit_timeout(self) -> None:
        self.commit_timeouts.inc()

    def rejected(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def render(self, runtime: RuntimeInfo) -> tuple[bytes, str]:
        if self.telemetry_source is not None:
            self._telemetry(self.telemetry_source())
        self.swaps.set(runtime.swaps)
        self.image.clear()
        if (img := runtime.current) is not None:
            self.image.labels(img.name, img.version, img.sha256).set(1)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
