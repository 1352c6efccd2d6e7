"""Drains the telemetry buffer into the user's blob storage, one class at a time.

A batch becomes one gzip-compressed JSON Lines blob named after what it holds::

    <device>/<class>/<YYYY>/<MM>/<DD>/<epoch>-<first seq>-<last seq>.jsonl.gz

so the name is a function of the records: the buffer file's epoch (made with the file, so a new file,
whose seqs start at 1 again, never reuses a name) and their sequence range. Before a batch is
uploaded its name, epoch and sequence range are recorded (an *intent*, in the agent's state
database); after a crash, the same range is uploaded again under the same name, overwriting rather
than duplicating. An intent recorded for another buffer file (another epoch) is discarded, never
applied. Records leave the buffer only after the storage confirmed the upload.

On a clean stop the uploader ships everything waiting, due or not, within ``drain_timeout_s``.
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
#: stop() waits this much longer than the drain for an upload under way to end (systemd's
#: TimeoutStopSec, 60 s, must leave room for it after the API's graceful stop).
_JOIN_SLACK_S = 10.0


class RecordLike(Protocol):
    seq: int
    ts: float
    payload: bytes


class BufferLike(Protocol):
    @property
    def epoch(self) -> str: ...

    @property
    def pre_epoch(self) -> bool: ...

    def read_batch(self, cls: Any, max_records: int, max_bytes: int) -> Sequence[Any]: ...

    def ack(self, cls: Any, seqs: Any) -> Any: ...

    def sync(self) -> bool: ...


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


def blob_name(device_id: str, cls: str, epoch: str, first_seq: int, last_seq: int, first_ts: float) -> str:
    """Sortable within a day: by epoch (its creation time comes first), then by seq."""
    day = datetime.fromtimestamp(first_ts, UTC).strftime("%Y/%m/%d")
    return f"{device_id}/{cls}/{day}/{epoch}-{first_seq:012d}-{last_seq:012d}.jsonl.gz"


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
        drain_timeout_s: float = 10.0,
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
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.state = SyncState()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._drain_deadline = 0.0  # time.monotonic(); set by stop()
        self._draining = False
        self.thread = threading.Thread(target=self._run, name="sync", daemon=True)

    # --- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop. With ``drain_timeout_s`` > 0 the thread first ships every record waiting, of
        every class and due or not, for at most that long from now: call it once nothing more is
        coming (the API stopped, the buffer flushed). What the storage refuses, or what does not fit
        in the time, stays in the buffer for the next start."""
        self._drain_deadline = time.monotonic() + self.drain_timeout_s
        self._stop.set()
        self._kick.set()
        if self.thread.is_alive():
            # An upload under way when the deadline passes finishes or fails within the backend's
            # own timeout: its intent is recorded, so the next start redoes it under the same name.
            self.thread.join(timeout=self.drain_timeout_s + _JOIN_SLACK_S)

    @property
    def draining(self) -> bool:
        """True while the final drain runs and its deadline has not passed. The daemon lets the
        storage client retry with backoff only then, once it is stopping (sync.drain_timeout)."""
        return self._draining and time.monotonic() < self._drain_deadline

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
                self._report(exc)
            self._kick.wait(self.interval_s)
        if self.drain_timeout_s > 0:
            self._drain()

    def _report(self, exc: Exception) -> None:
        known = hasattr(exc, "code")  # an EdgeError: storage said no, the message says why
        if (self.state.last_error or {}).get("message") != str(exc) or not known:
            log.warning("sync.failed", error=str(exc), exc_info=not known)
        self._fail(exc)

    def _drain(self) -> None:
        """Passes over every class until one uploads nothing, the deadline passes, or the storage
        refuses for good. Nothing is acked that the storage did not confirm."""
        deadline = self._drain_deadline
        t0 = time.monotonic()
        blobs, complete = 0, False
        self._draining = True
        try:
            while time.monotonic() < deadline:
                try:
                    n = self.run_once(force=True, deadline=deadline)
                except Exception as exc:
                    self._report(exc)
                    if not getattr(exc, "retryable", False):
                        break  # an expired SAS, a missing container: more tries cannot help
                    # The backend has retried with backoff already; once more while time is left.
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                    continue
                blobs += n
                if n == 0:
                    complete = True
                    break
        finally:
            self._draining = False
        log.info(
            "sync.drained" if complete else "sync.drain_incomplete",
            blobs=blobs,
            seconds=round(time.monotonic() - t0, 3),
            error=(self.state.last_error or {}).get("code") if not complete else None,
        )

    # --- one pass ------------------------------------------------------------------------------

    def run_once(self, force: bool = False, deadline: float | None = None) -> int:
        """Upload every batch that is due (all of them with ``force``), starting none after
        ``deadline`` (time.monotonic()). Returns the blobs uploaded. Stops at the first failure: the
        records stay in the buffer for the next pass."""
        uploaded = 0
        for cls in CLASSES:
            while (not self._stop.is_set() or force) and (deadline is None or time.monotonic() < deadline):
                n = self._one(cls, force)
                if n == 0:
                    break
                uploaded += 1
        return uploaded

    def _one(self, cls: str, force: bool) -> int:
        if cls == collections.CLASS:
            return self._one_collection(force)
        key = f"sync.intent.{cls}"
        intent = self._intent(key, cls)
        batch = list(self.buffer.read_batch(cls, self.batch_max_records, self.batch_max_bytes))
        if intent is not None and (not batch or batch[0].seq > intent["last"]):  # oldest first
            # Its records are gone (acked just before a crash, or evicted): the batch is new. Going
            # on with it, rather than ending the pass, lets a drain see that nothing is left.
            self.intents.set_meta(key, None)
            intent = None
        if intent is not None:
            # A batch was being uploaded when the agent stopped: the same records, the same name.
            batch = [r for r in batch if r.seq <= intent["last"]]
            name = intent["name"]
            if len(batch) < intent["count"] and name in self.backend.list(name):
                # Some of the intent's records were evicted since (disk budget), and the blob with all
                # of them is already stored: overwriting it with fewer would lose uploaded data.
                self.buffer.ack(cls, [r.seq for r in batch])
                self.intents.set_meta(key, None)
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
            # With synchronous=NORMAL these records may not be on disk yet: a power cut after the
            # upload would take them back, their seqs would go to new records, and the intent
            # would then overwrite the stored blob with those.
            self.buffer.sync()
            epoch = self.buffer.epoch
            name = blob_name(self.device_id, cls, epoch, batch[0].seq, batch[-1].seq, batch[0].ts)
            self.intents.set_meta(
                key,
                {"name": name, "epoch": epoch, "first": batch[0].seq, "last": batch[-1].seq,
                 "count": len(batch)},
            )  # fmt: skip
        payloads = [r.payload for r in batch]
        data = encode(payloads, self.compress_level)
        self.backend.put(name, data, CONTENT_TYPE)
        self.buffer.ack(cls, [r.seq for r in batch])
        self.intents.set_meta(key, None)
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
        intent = self._intent(key, cls)
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
            intent = {**collections.plan(batch, self.device_id, store), "epoch": self.buffer.epoch}
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

    def _intent(self, key: str, cls: str) -> dict[str, Any] | None:
        """The upload intent of ``cls``, unless it was recorded for a buffer file that is gone
        (deleted, or set aside as corrupt): its seqs name other records here, and applying it would
        store them under the old file's name."""
        intent = self.intents.get_meta(key)
        if intent is not None and not self._ours(intent):
            log.warning(
                "sync.stale_intent",
                cls=cls,
                blob=intent.get("name"),
                intent_epoch=intent.get("epoch"),
                epoch=self.buffer.epoch,
            )
            self.intents.set_meta(key, None)
            return None
        return cast(dict[str, Any] | None, intent)

    def _ours(self, intent: dict[str, Any]) -> bool:
        epoch = intent.get("epoch")
        if epoch is None:  # recorded by an agent from before epochs: only for the file it used
            return self.buffer.pre_epoch
        return bool(epoch == self.buffer.epoch)

    def _fail(self, exc: Exception) -> None:
        code = str(getattr(exc, "code", "sync_failed"))
        self.state.last_error = {
            "code": code,
            "message": str(getattr(exc, "message", exc)),
            "at": self.clock(),
        }
