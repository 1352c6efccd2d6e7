"""The local telemetry buffer: captured inputs/outputs, inference metrics, system metrics and events,
kept in one bounded SQLite file (WAL) until the uploader has shipped them (docs/buffer.md).

    buf = Buffer(state_dir / "buffer.db", budget_bytes=512 << 20)
    buf.start()
    buf.put(RecordClass.INFERENCE, {"model": "iris", "p99_ms": 1.2})   # hot path: never blocks, never raises
    batch = buf.read_batch(RecordClass.INFERENCE, 500, 4 << 20)           # the uploader
    ...upload, and only once the upload is confirmed:
    buf.ack(RecordClass.INFERENCE, range(batch[0].seq, batch[-1].seq + 1))

:class:`Buffer` is the facade over the package's parts, one responsibility each:
:mod:`~agent.telemetry.buffer.records` (the record classes, drop reasons, priorities),
:mod:`~agent.telemetry.buffer.schema` (the tables, migrations, opening a file or setting it aside),
:mod:`~agent.telemetry.buffer.budget` (the disk budget's arithmetic, pure),
:mod:`~agent.telemetry.buffer.evict` (that arithmetic applied in SQLite),
:mod:`~agent.telemetry.buffer.writer` (put(), the queue and the writer thread) and
:mod:`~agent.telemetry.buffer.reader` (read_batch(), ack(), the counts).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.telemetry.buffer import schema
from agent.telemetry.buffer.budget import Limits, plan
from agent.telemetry.buffer.reader import Reader, class_counts
from agent.telemetry.buffer.records import (
    DEFAULT_PRIORITIES,
    MIB,
    PRIO_MAX,
    PRIO_MIN,
    DropReason,
    Record,
    RecordClass,
)
from agent.telemetry.buffer.schema import MIGRATIONS, SCHEMA_VERSION
from agent.telemetry.buffer.writer import Writer
from edge_core.errors import BufferUnavailable, ConfigError
from edge_core.log import get_logger

#: records per write batch when the caller does not say
DEFAULT_BATCH_MAX = 1000

__all__ = [
    "DEFAULT_PRIORITIES",
    "MIB",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Buffer",
    "DropReason",
    "Record",
    "RecordClass",
    "class_counts",
]

log = get_logger("buffer")


class Buffer:
    """A bounded, crash-safe, prioritised record buffer in one SQLite file. Thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        budget_bytes: int,
        batch_max: int = DEFAULT_BATCH_MAX,
        flush_interval_s: float = 0.2,
        queue_max: int = 100_000,
        queue_max_bytes: int = 64 * MIB,
        synchronous: str = "NORMAL",
        max_record_bytes: int = MIB,
        priorities: Mapping[RecordClass | str, int] | None = None,
    ) -> None:
        self.path = Path(path)
        sync = synchronous.upper()
        # OFF is refused: with it a power cut can corrupt the file, and "never corrupt" is the contract.
        if sync not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigError("buffer.synchronous", f"{synchronous!r} is not NORMAL, FULL or EXTRA")
        for name, value in (
            ("batch_max", batch_max),
            ("queue_max", queue_max),
            ("queue_max_bytes", queue_max_bytes),
            ("max_record_bytes", max_record_bytes),
        ):
            if value < 1:
                raise ConfigError(f"buffer.{name}", f"must be at least 1, not {value}")
        if not flush_interval_s > 0:
            raise ConfigError("buffer.flush_interval_s", f"must be positive, not {flush_interval_s}")
        self._synchronous = sync
        self._prio: dict[str, int] = {str(c): p for c, p in DEFAULT_PRIORITIES.items()}
        for c, p in (priorities or {}).items():
            if c not in self._prio:
                raise ConfigError("buffer.priorities", f"unknown record class {c!r}")
            if type(p) is not int or not PRIO_MIN <= p <= PRIO_MAX:
                raise ConfigError(f"buffer.priorities.{c}", f"must be a 32-bit integer, not {p!r}")
            self._prio[str(c)] = p
        self._limits = Limits(budget_bytes, max_record_bytes, batch_max)
        # Validates the budget now, with SQLite's default page size; start() redoes it with the file's.
        sizing = plan(self._limits, 4096)
        self._closed = False
        self._epoch: str | None = None
        self._pre_epoch = False
        self._sync_warned = -math.inf
        self._writer = Writer(
            self.path,
            self._limits,
            sizing,
            flush_interval_s=flush_interval_s,
            queue_max=queue_max,
            queue_max_bytes=queue_max_bytes,
            class_priority=self._prio,
        )
        self._reader = Reader(self.path, self._prio)

    def start(self) -> None:
        """Open (or create, or migrate) the file and start the writer thread."""
        if self._writer.started or self._closed:
            raise RuntimeError("a Buffer starts once: make a new one to open the file again")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opened = schema.open_file(self.path, self._synchronous, self._limits)
        try:
            self._reader.open(schema.connect(self.path), opened.sizing.page_size)
            evicted = self._writer.open(opened.db, opened.sizing, opened.incremental)
        except sqlite3.Error as e:
            opened.db.close()  # a no-op when the writer has closed it already
            raise BufferUnavailable(f"cannot open {self.path}: {e}") from e
        self._epoch, self._pre_epoch = opened.epoch, opened.pre_epoch
        log.info(
            "buffer.opened",
            path=str(self.path),
            epoch=opened.epoch,
            budget_bytes=self._limits.budget_bytes,
            size_bytes=self.size_bytes(),
            synchronous=self._synchronous,
            evicted=sum(n for n, _ in evicted.values()),
        )

    @property
    def epoch(self) -> str:
        """The file's id, made when it was created: a new file (the old one deleted or set aside as
        corrupt) has a new one, and its seqs start at 1 again. Known once started."""
        if self._epoch is None:
            raise RuntimeError("the buffer's epoch is known once it has started")
        return self._epoch

    @property
    def pre_epoch(self) -> bool:
        """The file was used by an agent that did not know epochs (its upload intents carry none)."""
        return self._pre_epoch

    @property
    def thread(self) -> threading.Thread | None:
        """The writer thread, once started: it never ends before :meth:`close`."""
        return self._writer.thread

    def put(
        self, cls: RecordClass, payload: Any, priority: int | None = None, ts: float | None = None
    ) -> bool:
        """Queue one record; O(1), never blocks on I/O, never raises.

        ``payload``: bytes as they are, bytearray/memoryview (copied), str (UTF-8), anything else as
        JSON (orjson, numpy arrays included). Returns False when the record was refused, and counts
        it: too_large, queue_full or invalid (docs/buffer.md). Also False before start() and after
        close(), uncounted.
        """
        return self._writer.put(cls, payload, priority, ts)

    def put_urgent(
        self, cls: RecordClass, payload: Any, priority: int | None = None, ts: float | None = None
    ) -> int:
        """put(), and the writer commits at once instead of at the next ``flush_interval_s``, together
        with whatever else arrives meanwhile (group commit). Never blocks, never raises. Returns the
        record's ticket (> 0), or 0 when it was refused; a commit listener learns when it is on disk."""
        return self._writer.put_urgent(cls, payload, priority, ts)

    def add_commit_listener(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(ticket)`` on the writer thread after each transaction: every record whose ticket
        is at most ``ticket`` is committed (or was dropped by a write error, and counted). Tickets
        count the records put() and put_urgent() accepted, in order. ``fn`` must be quick."""
        self._writer.add_listener(fn)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record put before this call is committed (or dropped). True when all of
        them were committed within ``timeout``; False on timeout, write errors or a stopped writer."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new records, commit the queued ones, stop the writer and close the file."""
        self._closed = True
        if self._writer.close(timeout):
            self._reader.close()

    def __enter__(self) -> Buffer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_batch(
        self, cls: RecordClass, max_records: int = 1000, max_bytes: int = 4 * MIB, *, after_seq: int = 0
    ) -> list[Record]:
        """The oldest records of a class (seq > after_seq), up to max_records and max_bytes of
        payload; always at least one record when there is one, so a record larger than max_bytes
        cannot stall the uploader. Reading does not remove them: ack() does."""
        return self._reader.read_batch(cls, max_records, max_bytes, after_seq=after_seq)

    def ack(self, cls: RecordClass, seqs: Iterable[int]) -> int:
        """Delete records whose upload is confirmed: ``range(first, last + 1)`` (one range delete)
        or any iterable of seqs. Idempotent: seqs already gone are ignored (seqs are never reused).
        Returns how many records this call deleted."""
        return self._reader.ack(cls, seqs)

    def sync(self) -> bool:
        """Make every record committed so far survive a power cut, whatever ``synchronous`` is: one
        tiny transaction with an fsync of the WAL, which holds all earlier commits. The uploader calls
        it before it names a batch, so that a power cut can never take back records (and their seqs)
        that a stored blob is already named after. False (logged) when the write failed: a full
        disk must not stop the uploads, which are what frees it."""
        try:
            self._reader.sync()
        except sqlite3.Error as e:
            now = time.monotonic()
            if now - self._sync_warned >= 60:
                self._sync_warned = now
                log.warning("buffer.sync_failed", path=str(self.path), error=str(e))
            return False
        return True

    def size_bytes(self) -> int:
        """Disk the buffer occupies now or after the next checkpoint, whichever is more: the main
        file (its logical size, page_count x page_size, or its size on disk if larger) + WAL + shm."""
        return self._reader.size_bytes()

    def stats(self) -> dict[str, Any]:
        """Per class: records, payload bytes, oldest ts, priority, acked; drops per class and reason
        (cumulative since the file was created); committed (since start) and queued. Counting the
        records scans the tables (length() does not read payload pages): call it every few seconds,
        not per request."""
        classes = self._reader.class_counts()
        for cls in RecordClass:
            classes[str(cls)]["priority"] = self._prio[cls]
        dropped, committed, queued, queued_bytes = self._writer.counters()
        return {
            "classes": classes,
            "dropped": dropped,
            "committed": committed,
            "queued": queued,
            "queued_bytes": queued_bytes,
            "size_bytes": self.size_bytes(),
            "budget_bytes": self._limits.budget_bytes,
            "epoch": self._epoch,
        }
