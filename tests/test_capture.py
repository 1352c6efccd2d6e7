"""Capture records (pure: a list stands in for the buffer here; the end-to-end path through the real
buffer and blob storage is in test_monitoring_e2e.py), and the inference-metric windows."""

from __future__ import annotations

import json
from typing import Any

from agent.telemetry.capture import Capturer, CaptureSettings
from agent.telemetry.metrics import Metrics


class ListSink:
    def __init__(self, accept: bool = True) -> None:
        self.records: list[tuple[Any, bytes]] = []
        self.accept = accept

    def put(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> bool:
        self.records.append((cls, payload))
        return self.accept


LINEAGE = {"device_id": "dev-1", "deployment_id": "dep-9", "generation": 9,
           "image": {"name": "iris", "version": "2", "sha256": "ab" * 32}}  # fmt: skip


def rec(
    cap: Capturer, body: bytes = b'{"data": [[1, 2]]}', out: bytes = b'{"y": [3]}', raw: bool = False
) -> None:
    cap.record(api="score", model="iris", version="2", request_id="r-1", ts=1764072000.5, latency_s=0.000123,
               status=200, body=body, out=out, raw=raw)  # fmt: skip


def test_a_record_is_one_json_object_with_full_lineage() -> None:
    sink = ListSink()
    rec(Capturer(sink, CaptureSettings(enabled=True, sample_rate=1.0), LINEAGE))
    ((cls, payload),) = sink.records
    doc = json.loads(payload)
    assert cls == "capture"
    assert doc["lineage"] == LINEAGE
    assert (doc["model"], doc["model_version"], doc["request_id"], doc["status"]) == ("iris", "2", "r-1", 200)
    assert doc["ts"] == 1764072000.5 and doc["latency_s"] == 0.000123
    assert doc["input"] == {"data": [[1, 2]]} and doc["output"] == {"y": [3]}


def test_inputs_or_outputs_only_and_the_payload_cap() -> None:
    sink = ListSink()
    rec(Capturer(sink, CaptureSettings(enabled=True, sample_rate=1.0, outputs=False), LINEAGE))
    assert "output" not in json.loads(sink.records[-1][1]) and "input" in json.loads(sink.records[-1][1])
    cap = Capturer(sink, CaptureSettings(enabled=True, sample_rate=1.0, max_payload_bytes=10), LINEAGE)
    rec(cap)
    doc = json.loads(sink.records[-1][1])
    assert doc["truncated"] is True and doc["payload_bytes"] > 10 and "input" not in doc
    assert doc["lineage"]["deployment_id"] == "dep-9" and cap.truncated == 1


def test_score_py_bodies_that_are_not_json_are_kept_as_strings() -> None:
    sink = ListSink()
    cap = Capturer(sink, CaptureSettings(enabled=True, sample_rate=1.0), LINEAGE)
    rec(cap, body=b"5.1,3.5\n", out=b'"ok"', raw=True)
    doc = json.loads(sink.records[-1][1])
    assert doc["input"] == "5.1,3.5\n" and doc["output"] == "ok"


def test_sampling() -> None:
    off = Capturer(ListSink(), CaptureSettings(enabled=False, sample_rate=1.0), LINEAGE)
    assert not any(off.sampled() for _ in range(100))
    none = Capturer(ListSink(), CaptureSettings(enabled=True, sample_rate=0.0), LINEAGE)
    assert not any(none.sampled() for _ in range(100))
    every = Capturer(ListSink(), CaptureSettings(enabled=True, sample_rate=1.0), LINEAGE)
    assert all(every.sampled() for _ in range(100))
    half = Capturer(ListSink(), CaptureSettings(enabled=True, sample_rate=0.5), LINEAGE)
    n = sum(half.sampled() for _ in range(4000))
    assert 1600 < n < 2400  # 2000 +- 9 standard deviations
    assert not Capturer(None, CaptureSettings(enabled=True, sample_rate=1.0), LINEAGE).sampled()


def test_a_full_buffer_is_counted_not_raised() -> None:
    cap = Capturer(ListSink(accept=False), CaptureSettings(enabled=True, sample_rate=1.0), LINEAGE)
    rec(cap)
    assert cap.refused == 1


def test_settings_from_the_manifest() -> None:
    s = CaptureSettings.from_manifest({"enabled": True, "sample_rate": 0.25, "capture": "outputs"})
    assert (s.enabled, s.sample_rate, s.inputs, s.outputs) == (True, 0.25, False, True)
    assert not CaptureSettings.from_manifest({}).active


def test_inference_window() -> None:
    class Img:
        version = "3"

    m = Metrics()
    for i in range(100):
        m.observe(Img(), "mlp", 500 if i % 10 == 0 else 200, (i + 1) / 1000)  # type: ignore[arg-type]
    w = m.take_window()["mlp@3"]
    assert (w["requests"], w["errors"], w["error_rate"]) == (100, 10, 0.1)
    assert w["p50_ms"] == 51.0 and w["p99_ms"] == 100.0
    assert m.take_window() == {}  # a window is taken once
