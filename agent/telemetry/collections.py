"""Azure ML's data collector on the edge: records in Azure ML's shapes, uploaded in its blob layouts.

Three sources, one record class (``collection``) in the telemetry buffer, so the one disk budget,
its priorities and the exactly-once upload cover them all:

- **payload logging**: the scoring API's own ``request`` and ``response`` collections, made here from
  every request the deployment samples (no change to score.py);
- **custom logging**: what score.py collects with ``azureml.ai.monitoring.Collector``
  (``agent/serving/collector_shim/``), handed over by the worker with the request's answer;
- **the legacy SDK**: ``azureml.monitoring.ModelDataCollector``'s CSV rows.

The layouts (docs/monitoring.md)::

    modelDataCollector/{endpoint}/{deployment}/{collection}/{yyyy}/{MM}/{dd}/{HH}/{instance}.jsonl
    modeldata/{subscription}/{resourcegroup}/{workspace}/{webservice}/{model}/{version}/{designation}/
        {yyyy}/{MM}/{dd}/data.csv

JSON Lines blobs are split by ``rolling_rate`` (``.../{HH}/`` for Hour, down to ``.../{mm}/`` for
Minute, up to ``{yyyy}/`` for Year) and named after the records they hold
(``{device}-{first record's time in ms}-{first seq}-{last seq}``), so an upload repeated after a
crash overwrites the same blobs. The legacy ``data.csv`` is one file per day, as Azure ML has it: each
upload appends to it by rewriting it (read, add the batch's rows, write), and the size it had before
is recorded with the upload's intent, so a repeated upload rewrites the same bytes instead of
appending the rows twice. ``webservice`` is the device's id: each device is one web service
instance, and no two devices ever write the same file.

A buffered record is one line of JSON saying where it goes, a newline, then the bytes it becomes in
the blob (the event's JSON, or CSV rows); the uploader never re-encodes the data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from agent import __version__
from edge_core.errors import BlobError, ErrorCode
from edge_core.log import get_logger
from edge_core.manifest import PAYLOAD_COLLECTIONS, DataCollector

log = get_logger("collect")

CLASS = "collection"
#: The worker's environment variable: the deployment's collections (collector_shim/azureml/_edge_collect.py).
CHILD_ENV = "EDGE_DATA_COLLECTION"
#: What the legacy SDK writes as ``$aml_request_id`` when the worker does not know the request id.
NO_REQUEST_ID = "00000000-0000-0000-0000-000000000000"
AGENT = f"edge-agent/{__version__}"
ROLLING_FORMATS = {
    "Minute": "%Y/%m/%d/%H/%M",
    "Hour": "%Y/%m/%d/%H",
    "Day": "%Y/%m/%d",
    "Month": "%Y/%m",
    "Year": "%Y",
}
JSONL_TYPE = "application/x-ndjson"
CSV_TYPE = "text/csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class RecordSink(Protocol):
    def put(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> bool: ...


def sampled(rate: float, key: str) -> bool:
    """Whether the request that ``key`` (its correlation id) names is in a collection's sample.

    A function of the id, not a random draw: a request's collections (request, response, and what
    score.py collects with the same correlation id) are kept or dropped together, and a collection
    with a lower rate keeps a subset of one with a higher rate. The worker's copy is
    ``agent/serving/collector_shim/azureml/_edge_collect.py: sampled``; the two must agree.
    """
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


def segment(value: Any, default: str = "default") -> str:
    """One blob-path segment from a name a script chose: characters outside ``[A-Za-z0-9._-]`` become
    ``_`` and ``.``/``..`` are refused, so no name can add, remove or escape a directory level."""
    text = _UNSAFE.sub("_", str(value))[:128]
    return text if text.strip(".") else default


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _json_or_text(data: bytes) -> tuple[Any, str]:
    """A payload as Azure ML stores it: JSON as JSON, anything else as a string."""
    try:
        return orjson.loads(data), "application/json"
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace"), "text/plain"


def _payload(meta: Mapping[str, Any], body: bytes) -> bytes:
    return orjson.dumps(meta) + b"\n" + body


def child_env(settings: DataCollector, device_id: str, model_version: str) -> dict[str, str]:
    """The score.py worker's environment (read by collector_shim/azureml/_edge_collect.py): the
    custom collections it may collect, with their rates; whether the legacy SDK collects; and what
    that SDK fills in for its defaults, as Azure ML's deployment does (the workspace, the web service,
    which on the edge is the device, and the model version, which is the image's)."""
    s = settings
    custom = {k: v for k, v in s.collections.items() if k not in PAYLOAD_COLLECTIONS}
    doc = {
        "collections": custom,
        "model_data_collector": s.collect_model_data,
        "workspace": f"{s.subscription_id}/{s.resource_group}/{s.workspace_name}".lower(),
        "webservice": device_id,
        "model_version": model_version,
    }
    return {CHILD_ENV: orjson.dumps(doc).decode()}


# --- making records: per serving image -------------------------------------------------------------


@dataclass
class Collections:
    """One serving image's data collector: the manifest's settings and the names of its layouts."""

    sink: RecordSink | None
    settings: DataCollector
    device_id: str
    endpoint: str
    deployment: str
    model_version: str
    max_payload_bytes: int = 64 * 1024
    refused: int = 0
    dropped: int = 0
    _source: str = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.endpoint = segment(s.endpoint_name or self.endpoint)
        self.deployment = segment(s.deployment_name or self.deployment)
        self._source = (
            f"/subscriptions/{s.subscription_id}/resourceGroups/{s.resource_group}/providers/"
            f"Microsoft.MachineLearningServices/workspaces/{s.workspace_name}/onlineEndpoints/"
            f"{self.endpoint}/deployments/{self.deployment}"
        )
        self._request_rate = s.collections.get("request")
        self._response_rate = s.collections.get("response")

    @property
    def active(self) -> bool:
        return self.sink is not None and self.settings.active

    def directory(self, collection: str) -> str:
        return f"modelDataCollector/{self.endpoint}/{self.deployment}/{collection}"

    # --- per request ---------------------------------------------------------------------------

    def record(
        self,
        *,
        request_id: str,
        ts: float,
        path: str,
        method: str,
        content_type: str | None,
        headers: Mapping[str, str],
        body: bytes,
        status: int,
        out: bytes,
        collected: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """One served request: its request and response payloads if sampled, and what score.py
        collected. Never raises: collection must not fail a request that was answered."""
        try:
            if self._request_rate is not None and sampled(self._request_rate, request_id):
                self._request(request_id, ts, path, method, content_type, headers, body)
            if self._response_rate is not None and sampled(self._response_rate, request_id):
                self._response(request_id, ts, status, out)
            for rec in collected:
                self._custom(rec, request_id, ts)
        except Exception:  # a bug here loses telemetry, never the answer
            self.dropped += 1
            log.warning("collect.failed", exc_info=True)

    def _event(self, collection: str, ts: float, data: bytes, ctype: str, **extra: Any) -> dict[str, Any]:
        """A CloudEvents record as Azure ML's collector writes it, without its data."""
        return {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": self._source,
            "type": f"azureml.inference.{collection}",
            "datacontenttype": ctype,
            "time": iso_time(ts),
            **extra,
            "modelversion": self.model_version,
            "agent": AGENT,
            "contentrange": f"bytes 0-{max(len(data) - 1, 0)}/{len(data)}",
        }

    def _jsonl(self, collection: str, ts: float, event: dict[str, Any], data: Any, size: int) -> None:
        if size > self.max_payload_bytes:
            event["truncated"] = True  # the size is in contentrange; the rest is the record's lineage
        else:
            event["data"] = data
        meta = {"k": "jsonl", "d": self.directory(collection), "t": ts, "r": self.settings.rolling_rate}
        self._put(_payload(meta, orjson.dumps(event, option=orjson.OPT_SERIALIZE_NUMPY)), ts)

    def _request(
        self,
        rid: str,
        ts: float,
        path: str,
        method: str,
        ctype: str | None,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        data, kind = _json_or_text(body)
        extra: dict[str, Any] = {"path": path, "method": method, "correlationid": rid, "xrequestid": rid}
        wanted = self.settings.capture_headers
        if wanted:
            extra["headers"] = {h: headers[h] for h in wanted if h in headers}
        event = self._event("request", ts, body, ctype or kind, **extra)
        self._jsonl("request", ts, event, data, len(body))

    def _response(self, rid: str, ts: float, status: int, out: bytes) -> None:
        data, kind = _json_or_text(out)
        event = self._event("response", ts, out, kind, statuscode=status, correlationid=rid, xrequestid=rid)
        self._jsonl("response", ts, event, data, len(out))

    def _custom(self, rec: Mapping[str, Any], rid: str, now: float) -> None:
        t = rec.get("time")
        ts = float(t) if isinstance(t, int | float) and 0 < t < 1e11 else now
        kind = rec.get("kind")
        if kind == "v2":
            self._v2(rec, rid, ts)
        elif kind == "csv" and self.settings.collect_model_data:
            self._csv(rec, rid, ts)

    def _v2(self, rec: Mapping[str, Any], rid: str, ts: float) -> None:
        name = rec.get("collection")
        if not isinstance(name, str) or name in PAYLOAD_COLLECTIONS or name not in self.settings.collections:
            return  # the worker only sends enabled collections; anything else is not ours to store
        corr = str(rec.get("correlationid") or rid)
        if rec.get("pending_id"):
            # The script used the request's own context, whose id the worker could not know: it is
            # the request id, as on Azure ML, and the sampling decision (deferred) is taken on it.
            corr = rid
            if not sampled(self.settings.collections[name], rid):
                return
        raw = rec.get("data")
        text = raw.encode() if isinstance(raw, str) else orjson.dumps(raw)
        data, _ = _json_or_text(text)
        event = self._event(
            name,
            ts,
            text,
            "application/json",
            correlationid=corr,
            xrequestid=rid,
            collectdatatype=str(rec.get("collectdatatype") or ""),
        )
        event["id"] = str(rec.get("id") or event["id"])
        self._jsonl(name, ts, event, data, len(text))

    def _csv(self, rec: Mapping[str, Any], rid: str, ts: float) -> None:
        s = self.settings
        designation = segment(rec.get("designation"), "general")
        collection = str(rec.get("collection_name") or "default")
        # Azure ML's "signals" and "general" collectors name their file; the others write data.csv.
        named = designation in ("signals", "general") and collection != "default"
        fname = f"{segment(collection)}.csv" if named else "data.csv"
        version = rec.get("version")
        directory = "/".join(
            (
                "modeldata",
                segment(s.subscription_id),
                segment(s.resource_group),
                segment(s.workspace_name),
                segment(self.device_id),
                segment(rec.get("model")),
                segment(self.model_version if version in (None, "", "default") else version),
                designation,
            )
        )
        rows = rec.get("rows")
        if not isinstance(rows, list):
            return
        buf = io.StringIO()
        writer = csv.writer(buf)
        for row in rows:
            if isinstance(row, list):
                writer.writerow([rid if c == NO_REQUEST_ID else c for c in row])
        header = rec.get("header")
        meta = {
            "k": "csv",
            "d": directory,
            "f": fname,
            "t": ts,
            "h": [str(h) for h in header] if isinstance(header, list) else None,
        }
        self._put(_payload(meta, buf.getvalue().encode()), ts)

    def _put(self, payload: bytes, ts: float) -> None:
        assert self.sink is not None
        if not self.sink.put(CLASS, payload, ts=ts):
            self.refused += 1


# --- uploading: what the uploader does with a batch of the class -----------------------------------


class BlobStore(Protocol):
    def put(self, name: str, data: bytes, content_type: str = ...) -> None: ...

    def get(self, name: str) -> bytes: ...

    def list(self, prefix: str = "") -> list[str]: ...


class RecordLike(Protocol):
    seq: int
    ts: float
    payload: bytes


@dataclass
class _Blob:
    kind: str  # "jsonl" or "csv"
    header: list[str] | None = None
    parts: list[bytes] = field(default_factory=list)


def _split(payload: bytes) -> tuple[dict[str, Any], bytes] | None:
    nl = payload.find(b"\n")
    if nl < 0:
        return None
    try:
        meta = orjson.loads(payload[:nl])
    except orjson.JSONDecodeError:
        return None
    return (meta, payload[nl + 1 :]) if isinstance(meta, dict) else None


def group(batch: Sequence[RecordLike], instance: str) -> dict[str, _Blob]:
    """The blobs a batch goes to, by name, each with its records' bytes in order. A record that
    cannot be read (it cannot come from this module) goes nowhere and is counted in the log."""
    blobs: dict[str, _Blob] = {}
    bad = 0
    for r in batch:
        split = _split(r.payload)
        if split is None:
            bad += 1
            continue
        meta, body = split
        ts = float(meta.get("t") or r.ts)
        when = datetime.fromtimestamp(ts, UTC)
        if meta.get("k") == "jsonl":
            fmt = ROLLING_FORMATS.get(str(meta.get("r")), ROLLING_FORMATS["Hour"])
            name = f"{meta['d']}/{when.strftime(fmt)}/{instance}.jsonl"
            blobs.setdefault(name, _Blob("jsonl")).parts.append(body + b"\n")
        elif meta.get("k") == "csv":
            name = f"{meta['d']}/{when.strftime('%Y/%m/%d')}/{meta.get('f') or 'data.csv'}"
            blob = blobs.setdefault(name, _Blob("csv"))
            if blob.header is None and isinstance(meta.get("h"), list):
                blob.header = [str(h) for h in meta["h"]]
            blob.parts.append(body)
        else:
            bad += 1
    if bad:
        log.error("collect.unreadable_records", records=bad)
    return blobs


def _get(store: BlobStore, name: str) -> bytes | None:
    try:
        return store.get(name)
    except BlobError as exc:
        if exc.code == ErrorCode.BLOB_NOT_FOUND:
            return None
        raise


def plan(batch: Sequence[RecordLike], device_id: str, store: BlobStore) -> dict[str, Any]:
    """The upload's intent, recorded before anything is written: the batch's range, the instance
    part of its JSON Lines names, and the size each CSV file it appends to has now."""
    ms = int(batch[0].ts * 1000)
    instance = f"{segment(device_id)}-{ms}-{batch[0].seq}-{batch[-1].seq}"
    bases: dict[str, int] = {}
    for name, blob in group(batch, instance).items():
        if blob.kind == "csv":
            existing = _get(store, name)
            bases[name] = len(existing) if existing is not None else 0
    return {
        "first": batch[0].seq,
        "last": batch[-1].seq,
        "count": len(batch),
        "instance": instance,
        "bases": bases,
    }


def _csv_header(header: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(header)
    return buf.getvalue().encode()


def upload(batch: Sequence[RecordLike], intent: Mapping[str, Any], store: BlobStore) -> tuple[int, int]:
    """Write the batch's blobs as the intent says; returns (blobs written, bytes sent).

    Repeating it (after a crash before the records were acknowledged) writes the same bytes under
    the same names. When some of the intent's records were evicted in between (``batch`` is shorter
    than the intent's count), a blob that already holds what was uploaded is kept, not overwritten
    with fewer records."""
    shrunk = len(batch) < int(intent["count"])
    bases: Mapping[str, int] = intent.get("bases") or {}
    written = sent = 0
    for name, blob in group(batch, str(intent["instance"])).items():
        if blob.kind == "jsonl":
            if shrunk and name in store.list(name):
                continue
            data = b"".join(blob.parts)
            store.put(name, data, JSONL_TYPE)
        else:
            base = int(bases.get(name, 0))
            existing = _get(store, name) if base or shrunk else None
            if shrunk and existing is not None and len(existing) > base:
                continue
            # What the file held before this batch (whatever a crashed attempt appended after it is
            # replaced), or a new file's header line.
            head = existing[:base] if base and existing else _csv_header(blob.header) if blob.header else b""
            data = head + b"".join(blob.parts)
            store.put(name, data, CSV_TYPE)
        written += 1
        sent += len(data)
    return written, sent
