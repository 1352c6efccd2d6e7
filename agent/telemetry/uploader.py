"""Drains the telemetry buffer into the user's blob storage, one class at a time.

A batch becomes one gzip-compressed JSON Lines blob named after what it holds::

    <device>/<class>/<YYYY>/<MM>/<DD>/<first seq>-<last seq>.jsonl.gz

so the name is a function of the records. Before a batch is uploaded its name and sequence range
are recorded (an *intent*, in the agent's state database); after a crash, the same range is uploaded
again under the same name, overwriting rather than duplicating. Records leave the buffer only after
the storage confirmed the upload.
"""

from __future__ import annotations

import dataclasses
import gzip
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from agent.telemetry import collections
from edge_core.log import get_logger

log = get_logger("sync")

CLASSES = ("event", "inference", "system", "capture", collections.CLASS)
CONTENT_TYPE = "application/x-ndjson"


class RecordLike(Protocol):
    seq: int
    ts: float
    payload: bytes


class BufferLike(Protocol):
    def read_batch(self, cls: Any, max_records: int, max_bytes: int) -> Sequence[Any]: ...

    def ack(self, cls: Any, seqs: Any) -> Any: ...


class BlobPut(Protocol):
    def put(self, name: str, data: bytes, content_type: str = ...) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...


class IntentStore(Protocol):
    def get_meta(self, key: str) -> Any: ...

    def set_meta(self, key: str, value: Any) -> None: ...


@dataclass
class SyncState:
    blobs: int = 0
    records: int = 0
    bytes_raw: int = 0
    bytes_sent: int = 0
    last_upload_at: float | None = None
    last_error: dict[str, Any] | None = None
    per_class: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["records_per_class"] = doc.pop("per_class")
        return doc


def blob_name(device_id: str, cls: str, first_seq: int, last_seq: int, first_ts: float) -> str:
    day = datetime.fromtimestamp(first_ts, UTC).strftime("%Y/%m/%d")
    return f"{device_id}/{cls}/{day}/{first_seq:012d}-{last_seq:012d}.jsonl.gz"


def encode(payloads: Sequence[bytes], level: int = 6) -> bytes:
    """JSON Lines, gzip: lineage and field names repeat in every record and compress well. Level 6
    saves bandwidth on thin uplinks; level 1 is about 5x faster for about 10% more bytes, the better
    trade on a busy CPU with a fast link (docs/benchmarks.md)."""
    return gzip.compress(b"\n".join(payloads) + b"\n", compresslevel=level, mtime=0)


class Uploader:
    def __init__(
        self,
        buffer: BufferLike,
        backend: BlobPut,
        device_id: str,
        intents: IntentStore,
        *,
        batch_max_records: int = 5000,
        batch_max_bytes: int = 8 * 1024 * 1024,
        max_batch_age_s: float = 300.0,
        interval_s: float = 10.0,
        compress_level: int = 6,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.buffer = buffer
        self.backend = backend
        self.device_id = device_id
        self.intents = intents
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.max_batch_age_s = max_batch_age_s
        self.interval_s = interval_s
        self.compress_level = compress_level
        self.clock = clock
        self.state = SyncState()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sync", daemon=True)

    # --- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def kick(self) -> None:
        """Upload now, whatever the schedule says (for `edge-agent` shutdown and tests)."""
        self._kick.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            force = self._kick.is_set()
            self._kick.clear()
            try:
                self.run_once(force=force)
            except Exception as exc:  # the uploader must outlive any storage or bug surprise
                known = hasattr(exc, "code")  # an EdgeError: storage said no, the message says why
                if (self.state.last_error or {}).get("message") != str(exc) or not known:
                    log.warning("sync.failed", error=str(exc), exc_info=not known)
                self._fail(exc)
            self._kick.wait(self.interval_s)

    # --- one pass ------------------------------------------------------------------------------

    def run_once(self, force: bool = False) -> int:
        """Upload every batch that is due (all of them with ``force``). Returns the blobs uploaded.
        Stops at the first failure: the records stay in the buffer for the next pass."""
        uploaded = 0
        for cls in CLASSES:
            while not self._stop.is_set() or force:
                n = self._one(cls, force)
                if n == 0:
                    break
                uploaded += 1
        return uploaded

    def _one(self, cls: str, force: bool) -> int:
        if cls == collections.CLASS:
            return self._one_collection(force)
        intent = self.intents.get_meta(f"sync.intent.{cls}")
        batch = list(self.buffer.read_batch(cls, self.batch_max_records, self.batch_max_bytes))
        if intent is not None:
            # A batch was being uploaded when the agent stopped: the same records, the same name.
            batch = [r for r in batch if r.seq <= intent["last"]]
            if not batch:
                self.intents.set_meta(f"sync.intent.{cls}", None)
                return 0
            name = intent["name"]
            if len(batch) < intent["count"] and name in self.backend.list(name):
                # Some of the intent's records were evicted since (disk budget), and the blob with all
                # of them is already stored: overwriting it with fewer would lose uploaded data.
                self.buffer.ack(cls, [r.seq for r in batch])
                self.intents.set_meta(f"sync.intent.{cls}", None)
                return 1
        else:
            if not batch:
                return 0
            full = (
                len(batch) >= self.batch_max_records
                or sum(len(r.payload) for r in batch) >= self.batch_max_bytes // 2
            )
            old = self.clock() - batch[0].ts >= self.max_batch_age_s
            if not (force or full or old):
                return 0
            name = blob_name(self.device_id, cls, batch[0].seq, batch[-1].seq, batch[0].ts)
            self.intents.set_meta(
                f"sync.intent.{cls}",
                {"name": name, "first": batch[0].seq, "last": batch[-1].seq, "count": len(batch)},
            )
        payloads = [r.payload for r in batch]
        data = encode(payloads, self.compress_level)
        self.backend.put(name, data, CONTENT_TYPE)
        self.buffer.ack(cls, [r.seq for r in batch])
        self.intents.set_meta(f"sync.intent.{cls}", None)
        s = self.state
        s.blobs += 1
        s.records += len(batch)
        s.bytes_raw += sum(len(p) + 1 for p in payloads)
        s.bytes_sent += len(data)
        s.last_upload_at = self.clock()
        s.last_error = None
        s.per_class[cls] = s.per_class.get(cls, 0) + len(batch)
        log.info("sync.uploaded", blob=name, records=len(batch), bytes=len(data))
        return 1

    def _one_collection(self, force: bool) -> int:
        """Azure ML data-collector records: several blobs per batch, named in Azure ML's layouts by
        :mod:`agent.telemetry.collections`, with the same intent, upload, acknowledge as the others."""
        cls = collections.CLASS
        key = f"sync.intent.{cls}"
        store = cast(collections.BlobStore, self.backend)  # the CSV layout reads the file it appends to
        intent = self.intents.get_meta(key)
        batch = list(self.buffer.read_batch(cls, self.batch_max_records, self.batch_max_bytes))
        if intent is not None:
            batch = [r for r in batch if r.seq <= intent["last"]]
            if not batch:
                self.intents.set_meta(key, None)
                return 0
        else:
            if not batch:
                return 0
            full = (
                len(batch) >= self.batch_max_records
                or sum(len(r.payload) for r in batch) >= self.batch_max_bytes // 2
            )
            if not (force or full or self.clock() - batch[0].ts >= self.max_batch_age_s):
                return 0
            intent = collections.plan(batch, self.device_id, store)
            self.intents.set_meta(key, intent)
        blobs, sent = collections.upload(batch, intent, store)
        self.buffer.ack(cls, [r.seq for r in batch])
        self.intents.set_meta(key, None)
        s = self.state
        s.blobs += blobs
        s.records += len(batch)
        s.bytes_raw += sum(len(r.payload) for r in batch)
        s.bytes_sent += sent
        s.last_upload_at = self.clock()
        s.last_error = None
        s.per_class[cls] = s.per_class.get(cls, 0) + len(batch)
        log.info("sync.uploaded", cls=cls, blobs=blobs, records=len(batch), bytes=sent)
        return 1

    def _fail(self, exc: Exception) -> None:
        code = str(getattr(exc, "code", "sync_failed"))
        self.state.last_error = {
            "code": code,
            "message": str(getattr(exc, "message", exc)),
            "at": self.clock(),
        }
