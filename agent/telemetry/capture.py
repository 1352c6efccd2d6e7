"""Data capture: a sample of the model's inputs and outputs, each record with its full lineage.

The hot path does as little as possible: one random draw, and for a sampled request one bytes
concatenation (the request body and the response body are JSON already, and the lineage of the
serving image is encoded once per image) handed to the buffer's in-memory queue. Nothing here
parses, encodes tensors, or touches the disk. With ``durable`` (``telemetry.capture_commit =
"before_answer"``) the record is put with :meth:`UrgentSink.put_urgent`, and :meth:`Capturer.record`
returns its ticket: the scoring API holds the answer until the buffer says that ticket is committed.

A record (one JSON object, one line in the uploaded JSON Lines blobs)::

    {"lineage": {"device_id", "deployment_id", "generation", "image": {"name", "version", "sha256"}},
     "model": "iris", "model_version": "2", "request_id": "…", "ts": 1764072000.123, "api": "v2",
     "status": 200, "latency_s": 0.00012, "input": <request JSON>, "output": <response JSON>}

``input``/``output`` are left out as configured (``capture``); a request whose bodies exceed
``max_payload_bytes`` is recorded without them and with ``"truncated": true``, so its lineage and
timing are never lost.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import orjson

CLASS = "capture"
_HEAD = b'%s,"model":%s,"model_version":%s,"request_id":%s,"ts":%.6f,"api":"%s","status":%d,"latency_s":%.6f'


class RecordSink(Protocol):
    def put(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> bool: ...


@runtime_checkable
class UrgentSink(Protocol):
    """A sink that can say when a record is on disk (agent.telemetry.buffer.Buffer)."""

    def put_urgent(
        self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None
    ) -> int: ...

    def add_commit_listener(self, fn: Callable[[int], None]) -> None: ...


@dataclass(frozen=True)
class CaptureSettings:
    enabled: bool = False
    sample_rate: float = 0.0
    inputs: bool = True
    outputs: bool = True
    max_payload_bytes: int = 64 * 1024

    @classmethod
    def from_manifest(cls, section: Mapping[str, Any]) -> CaptureSettings:
        what = section.get("capture", "both")
        return cls(
            enabled=bool(section.get("enabled", False)),
            sample_rate=float(section.get("sample_rate", 1.0)),
            inputs=what in ("inputs", "both"),
            outputs=what in ("outputs", "both"),
            max_payload_bytes=int(section.get("max_payload_bytes", 64 * 1024)),
        )

    @property
    def active(self) -> bool:
        return self.enabled and self.sample_rate > 0


class Capturer:
    """Per serving image: its settings and its lineage, pre-encoded."""

    _ids = itertools.count(1)
    _boot = os.urandom(4).hex()

    def __init__(
        self,
        sink: RecordSink | None,
        settings: CaptureSettings,
        lineage: Mapping[str, Any],
        *,
        durable: bool = False,
    ) -> None:
        self.sink = sink
        # A sink that cannot report commits (a test's list, the benchmark's null sink) is never
        # waited for: there would be nothing to wait on.
        self._urgent = sink.put_urgent if durable and isinstance(sink, UrgentSink) else None
        self.settings = settings
        self._prefix = b'{"lineage":' + orjson.dumps(lineage)
        self.truncated = 0
        self.refused = 0

    @property
    def active(self) -> bool:
        return self.sink is not None and self.settings.active

    @classmethod
    def request_id(cls) -> str:
        """Unique per agent run, cheap (no uuid4 on the hot path)."""
        return f"{cls._boot}-{next(cls._ids)}"

    def sampled(self) -> bool:
        rate = self.settings.sample_rate
        return self.active and (rate >= 1.0 or random.random() < rate)

    def record(
        self,
        *,
        api: str,
        model: str,
        version: str,
        request_id: str,
        ts: float,
        latency_s: float,
        status: int,
        body: bytes,
        out: bytes,
        raw: bool = False,
    ) -> int:
        """``raw``: the bodies are a score.py request and answer, which need not be JSON. Returns the
        record's ticket when the capturer is durable and the buffer took it, else 0 (nothing to
        wait for)."""
        s = self.settings
        if raw:
            body, out = _as_json(body), _as_json(out)
        head = _HEAD % (
            self._prefix, orjson.dumps(model), orjson.dumps(version), orjson.dumps(request_id), ts,
            api.encode(), status, latency_s,
        )  # fmt: skip
        size = (len(body) if s.inputs else 0) + (len(out) if s.outputs else 0)
        if size > s.max_payload_bytes:
            self.truncated += 1
            rec = head + b',"truncated":true,"payload_bytes":%d}' % size
        else:  # one join: captured bodies can be kilobytes, and += would copy them twice
            parts = [head]
            if s.inputs:
                parts += (b',"input":', body or b"null")
            if s.outputs:
                parts += (b',"output":', out or b"null")
            parts.append(b"}")
            rec = b"".join(parts)
        if self._urgent is not None:
            ticket = self._urgent(CLASS, rec, None, ts)
            if not ticket:
                self.refused += 1
            return ticket
        assert self.sink is not None
        if not self.sink.put(CLASS, rec, ts=ts):
            self.refused += 1
        return 0


def _as_json(data: bytes) -> bytes:
    """JSON as it is; anything else (text, CSV, bytes) as a JSON string, so every record parses."""
    try:
        orjson.loads(data)
        return data
    except orjson.JSONDecodeError:
        return orjson.dumps(data.decode("utf-8", "replace"))
