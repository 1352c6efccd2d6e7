"""The read side (docs/buffer.md): what the uploader reads and acknowledges, the disk the buffer
occupies, and the per-class counts that stats() and ``edge-agent status`` report.

Its own connection and lock, never the writer's: the writer thread keeps its connection to itself,
and in WAL mode these reads do not block its commits.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.telemetry.buffer.records import MIB, Record, RecordClass
from agent.telemetry.buffer.schema import table
from edge_core.errors import BufferUnavailable


class Reader:
    """read_batch(), ack(), size_bytes() and the class counts, on one connection under a lock."""

    def __init__(self, path: Path, class_priority: Mapping[str, int]) -> None:
        self.path = path
        self._prio = class_priority
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._page_size = 4096

    def open(self, db: sqlite3.Connection, page_size: int) -> None:
        # FULL whatever the writer's setting: an ack (and sync()) is on disk before the uploader
        # clears its intent, and its fsync of the WAL takes every earlier commit along.
        db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db = db
            self._page_size = page_size

    def sync(self) -> None:
        """See Buffer.sync: one small write transaction on this FULL connection."""
        with self._lock:
            db = self._conn()
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('synced_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(time.time()),),  # a changed row: a row written unchanged adds no WAL frame
            )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise BufferUnavailable(f"{self.path} is not open", "call start() first")
        return self._db

    def read_batch(
        self, cls: RecordClass, max_records: int = 1000, max_bytes: int = 4 * MIB, *, after_seq: int = 0
    ) -> list[Record]:
        """See Buffer.read_batch."""
        cls = RecordClass(cls)
        default = self._prio[cls]
        out: list[Record] = []
        total = 0
        with self._lock:
            try:
                cur = self._conn().execute(
                    f"SELECT seq, ts, priority, payload FROM {table(cls)} WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, max_records),
                )
                try:
                    for seq, ts, prio, payload in cur:
                        total += len(payload)
                        if out and total > max_bytes:
                            break
                        out.append(Record(seq, cls, ts, default if prio is None else prio, payload))
                finally:
                    cur.close()  # ends the read transaction now, so it cannot hold back checkpoints
            except sqlite3.Error as e:
                raise BufferUnavailable(f"cannot read {self.path}: {e}") from e
        return out

    def ack(self, cls: RecordClass, seqs: Iterable[int]) -> int:
        """See Buffer.ack."""
        cls = RecordClass(cls)
        t = table(cls)
        deleted = 0
        nbytes = 0
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if isinstance(seqs, range) and seqs.step == 1:
                        parts: Iterable[tuple[str, list[int]]] = [
                            ("seq >= ? AND seq < ?", [seqs.start, seqs.stop])
                        ]
                    else:
                        ids = list(seqs)
                        parts = (
                            (f"seq IN ({','.join('?' * len(c))})", c)
                            for c in (ids[i : i + 500] for i in range(0, len(ids), 500))
                        )
                    for where, args in parts:
                        for (size,) in db.execute(
                            f"DELETE FROM {t} WHERE {where} RETURNING length(payload)", args
                        ):
                            deleted += 1
                            nbytes += size
                    if deleted:
                        db.execute(
                            "INSERT INTO acked (cls, records, bytes) VALUES (?, ?, ?) "
                            "ON CONFLICT (cls) DO UPDATE "
                            "SET records = records + excluded.records, bytes = bytes + excluded.bytes",
                            (str(cls), deleted, nbytes),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise BufferUnavailable(f"cannot delete from {self.path}: {e}") from e
        return deleted

    def size_bytes(self) -> int:
        """See Buffer.size_bytes."""
        with self._lock:
            db = self._conn()
            try:
                (pages,) = db.execute("PRAGMA page_count").fetchone()
            except sqlite3.Error as e:
                raise BufferUnavailable(f"cannot read {self.path}: {e}") from e
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                size = os.stat(f"{self.path}{suffix}").st_size
                total += max(size, pages * self._page_size) if suffix == "" else size
        return total

    def class_counts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            db = self._conn()
            try:
                return class_counts(db)
            except sqlite3.Error as e:
                raise BufferUnavailable(f"cannot read {self.path}: {e}") from e


def class_counts(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per class, in one snapshot: records, payload bytes, the oldest record's ts and the acked
    (uploaded) totals. Shared by :meth:`Buffer.stats` and ``edge-agent status``, which reads the file
    of a running agent read-only; a class whose table does not exist yet is left out."""
    classes: dict[str, dict[str, Any]] = {}
    db.execute("BEGIN")
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for cls in RecordClass:
            t = table(cls)
            if t not in tables:
                continue
            records, nbytes = db.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM {t}"
            ).fetchone()
            oldest = db.execute(f"SELECT ts FROM {t} ORDER BY seq LIMIT 1").fetchone()
            classes[str(cls)] = {
                "records": records,
                "bytes": nbytes,
                "oldest_ts": oldest[0] if oldest else None,
                "acked": {"records": 0, "bytes": 0},
            }
        if "acked" in tables:
            for cls, records, nbytes in db.execute("SELECT cls, records, bytes FROM acked"):
                if cls in classes:
                    classes[cls]["acked"] = {"records": records, "bytes": nbytes}
    finally:
        db.execute("COMMIT")
    return classes
