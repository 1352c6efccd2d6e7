"""The local telemetry buffer: captured inputs/outputs, inference metrics, system metrics and events,
kept in one bounded SQLite file (WAL) until the uploader has shipped them (docs/buffer.md).

    buf = Buffer(state_dir / "buffer.db", budget_bytes=512 << 20)
    buf.start()
    buf.put(RecordClass.INFERENCE, {"model": "iris", "p99_ms": 1.2})   # hot path: never blocks, never raises
    batch = buf.read_batch(RecordClass.INFERENCE, 500, 4 << 20)           # the uploader
    ...upload, and only once the upload is confirmed:
    buf.ack(RecordClass.INFERENCE, range(batch[0].seq, batch[-1].seq + 1))

Writes never block inference: :meth:`Buffer.put` appends a tuple to an in-memory batch under a
lock held for a few hundred nanoseconds; one writer thread commits whole batches, one transaction
each (several at once when it has fallen behind). A commit that takes the buffer over its disk
budget deletes, in the same transaction, the lowest-priority oldest records and adds them to the
persisted drop counters, so the counters and the deletions can never disagree, even after kill -9.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import orjson

from edge_core.errors import BufferUnavailable, ConfigError
from edge_core.log import get_logger

log = get_logger("buffer")


class RecordClass(StrEnum):
    CAPTURE = "capture"  # captured model inputs/outputs
    INFERENCE = "inference"  # inference metrics
    SYSTEM = "system"  # system metrics
    EVENT = "event"  # events and logs


class DropReason(StrEnum):
    BUDGET = "budget"  # evicted to keep the buffer within its disk budget
    TOO_LARGE = "too_large"  # refused by put(): larger than max_record_bytes
    QUEUE_FULL = "queue_full"  # refused by put(): the writer is behind by queue_max records or bytes
    INVALID = "invalid"  # refused by put(): unknown class, payload not encodable, bad priority or ts
    WRITE_ERROR = "write_error"  # its transaction failed WRITE_ATTEMPTS times (disk full, I/O error)


#: Higher is kept longer when the budget is reached.
DEFAULT_PRIORITIES: Final[Mapping[RecordClass, int]] = {
    RecordClass.EVENT: 3,
    RecordClass.INFERENCE: 2,
    RecordClass.SYSTEM: 1,
    RecordClass.CAPTURE: 0,
}

MIB: Final = 1 << 20
#: A writer that fell behind commits up to this many sealed batches in one transaction.
MERGE_BATCHES: Final = 8
#: Tries of one transaction before its records are dropped as write_error (with backoff in between).
WRITE_ATTEMPTS: Final = 5
#: The -shm file (the WAL index) grows by 32 KiB per 4096 WAL frames (the first block holds 4062).
SHM_BLOCK: Final = 32 << 10
#: Upper bound of SQLite's per-row cost beyond the payload (cell header, rowid, ts, priority).
ROW_OVERHEAD: Final = 40
_PRIO_MIN, _PRIO_MAX = -(2**31), 2**31 - 1
#: The refusals of put(), counted on the hot path (the others are counted by the writer).
_REFUSALS: Final = frozenset({"too_large", "queue_full", "invalid"})


def _table(cls: str) -> str:
    return f"records_{cls}"


def _migration_v1() -> list[str]:
    stmts = []
    for cls in RecordClass:
        t = _table(cls)
        # One table per class: inserts touch a single b-tree with no secondary index, read_batch and
        # ack are primary-key ranges, and evicting a class's oldest rows frees whole pages instead of
        # punching holes into pages shared with other classes. AUTOINCREMENT: a seq is never reused,
        # even after the table was emptied, so a repeated ack can never delete a newer record.
        stmts.append(
            f"CREATE TABLE {t} (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
            "priority INTEGER, payload BLOB NOT NULL)"
        )
        # NULL priority = the class's priority (Buffer(priorities=...)). Only put(priority=...)
        # stores one, and only those rows are indexed, so the common insert pays nothing for it.
        stmts.append(f"CREATE INDEX {t}_priority ON {t} (priority, seq) WHERE priority IS NOT NULL")
    stmts.append(
        "CREATE TABLE dropped (cls TEXT NOT NULL, reason TEXT NOT NULL, records INTEGER NOT NULL, "
        "bytes INTEGER NOT NULL, PRIMARY KEY (cls, reason)) WITHOUT ROWID"
    )
    stmts.append(
        "CREATE TABLE acked (cls TEXT PRIMARY KEY, records INTEGER NOT NULL, bytes INTEGER NOT NULL) "
        "WITHOUT ROWID"
    )
    return stmts


#: MIGRATIONS[i] takes user_version i to i + 1, in one transaction with the version bump.
MIGRATIONS: Final[tuple[list[str], ...]] = (_migration_v1(),)
SCHEMA_VERSION: Final = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Record:
    seq: int  # per class, increasing, never reused
    cls: RecordClass
    ts: float  # seconds since the epoch: put(ts=...) or the time of put()
    priority: int  # the effective priority: put(priority=...) or the class's
    payload: bytes


_Row = tuple[float, int | None, bytes]  # (ts, priority, payload): exactly the INSERT's parameters
_Segment = dict[str, list[_Row]]  # the rows of one transaction, per class


_now = time.time  # one global lookup on the hot path instead of two


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _encode(payload: Any) -> bytes:
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)  # a copy: the caller may reuse its buffer after put() returns
    if isinstance(payload, str):
        return payload.encode()
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


class Buffer:
    """A bounded, crash-safe, prioritised record buffer in one SQLite file. Thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        budget_bytes: int,
        batch_max: int = 1000,
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
        self._budget = budget_bytes
        self._batch_max = batch_max
        self._interval = flush_interval_s
        self._queue_max = queue_max
        self._queue_max_bytes = queue_max_bytes
        self._max_record = max_record_bytes
        self._prio: dict[str, int] = {str(c): p for c, p in DEFAULT_PRIORITIES.items()}
        for c, p in (priorities or {}).items():
            if c not in self._prio:
                raise ConfigError("buffer.priorities", f"unknown record class {c!r}")
            if type(p) is not int or not _PRIO_MIN <= p <= _PRIO_MAX:
                raise ConfigError(f"buffer.priorities.{c}", f"must be a 32-bit integer, not {p!r}")
            self._prio[str(c)] = p
        # A segment (a batch) is sealed at batch_max records or at this many payload bytes. A writer
        # that fell behind commits up to MERGE_BATCHES sealed batches in one transaction, within the
        # same byte bound: under a hot path that keeps the GIL busy, each transaction costs the writer
        # a few GIL waits of up to 5 ms (see "writer" below), so bigger ones are how it catches up.
        # The bounds cap the WAL and how far one commit can take the file past the high-water mark.
        self._txn_bytes = _clamp(budget_bytes // 32, 64 << 10, 8 * MIB)
        self._txn_rows = batch_max * MERGE_BATCHES
        self._sizing(4096)  # validates the budget now; start() redoes it with the file's page size

        # Shared with the hot path, guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it
        self._done = threading.Condition(self._lock)  # flush() waits on it
        self._accepting = False
        self._seg: _Segment = self._new_segment()
        self._seg_n = 0
        self._seg_b = 0
        self._sealed: list[tuple[_Segment, int, int]] = []
        self._queued = 0  # records put and not yet committed (open + sealed + being written)
        self._queued_bytes = 0
        self._committed = 0
        self._flush_req = 0
        self._flush_done = 0
        self._write_failures = 0  # segments dropped as write_error, for flush()'s answer
        self._stopping = False
        self._closed = False
        self._kick = False  # counters changed with no records to write: the writer should persist them
        # Drop counters, cumulative since the file was created: loaded at start(), then kept here
        # exactly (stats() reads them without touching SQLite) and persisted by every transaction.
        self._dropped: dict[tuple[str, str], list[int]] = {}

        self._w: sqlite3.Connection | None = None  # the writer thread's
        self._r: sqlite3.Connection | None = None  # read_batch/ack/stats, under _rlock
        self._rlock = threading.Lock()
        self._thread: threading.Thread | None = None
        # The writer thread's own state (start() sets it up before the thread exists).
        self._persisted: dict[tuple[str, str], tuple[int, int]] = {}  # the dropped table's rows
        self._snap: dict[tuple[str, str], tuple[int, int]] = {}  # _dropped as the writer knows it
        self._owed: dict[tuple[str, str], list[int]] = {}  # counter changes _settle() applies
        self._owed_queue = [0, 0, 0, 0]  # records, bytes, committed, failed segments: same
        self._est_used: int | None = None  # upper bound of the used pages; None: ask SQLite
        self._warned: dict[tuple[str, str], float] = {}
        self._unlogged: dict[str, int] = {}
        self._last_evict_log = -math.inf
        self._incremental = False
        self._shrink_pages = 0  # the file is this many pages over its cap: shrink after the commit
        self._tiers: list[int] = []
        self._pad: list[None] = []
        self._insert_sql: dict[tuple[str, int], str] = {}

    # ----------------------------------------------------------------------------------- sizing

    def _sizing(self, page_size: int) -> None:
        """Split the budget (docs/buffer.md, "Disk budget") into WAL, headroom and record space."""
        ps = page_size
        self._page_size = ps
        txn_payload = self._txn_bytes + self._max_record  # the last record may overshoot _txn_bytes
        # Pages one transaction can add: twice its payload covers b-tree fill and the half-empty last
        # overflow page of records just over a page; plus per-row overhead and interior pages.
        txn_pages = math.ceil(2 * txn_payload / ps) + math.ceil(self._txn_rows * ROW_OVERHEAD / ps) + 8
        # Checkpoint when the WAL reaches 1/32 of the budget (SQLite's default, 1000 pages, at most).
        self._wal_pages = _clamp(self._budget // 32 // ps, 16, 1000)
        # The WAL reaches the checkpoint threshold plus one transaction, each frame a page + 24 bytes.
        wal_frames = self._wal_pages + txn_pages
        self._wal_max = wal_frames * (ps + 24) + 32
        shm = SHM_BLOCK * (1 + wal_frames // 4062)
        file_cap = self._budget - shm - self._wal_max
        high = file_cap - txn_pages * ps
        if high < max(self._budget // 4, 2 * txn_pages * ps):
            raise ConfigError(
                "buffer.budget_bytes",
                f"{self._budget} bytes leave {max(high, 0)} for records after the WAL "
                f"({self._wal_max}) and one transaction's headroom ({txn_pages * ps}); raise it, "
                f"or lower max_record_bytes ({self._max_record}) or batch_max ({self._batch_max})",
            )
        self._file_cap_pages = file_cap // ps
        self._high_pages = high // ps
        self._low_pages = self._high_pages * 9 // 10  # evict to 90%: one eviction per 10% of budget

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Open (or create, or migrate) the file and start the writer thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("a Buffer starts once: make a new one to open the file again")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            w = self._open_writer()
        except sqlite3.DatabaseError as e:
            # Not a database, or malformed (a bad sector, a file written by something else): telemetry
            # must not keep the agent from serving, so the file is set aside for analysis and the
            # buffer starts empty. Any other error (permissions, disk I/O) is raised.
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
            if code not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise BufferUnavailable(f"cannot open {self.path}: {e}") from e
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("buffer.quarantined", path=str(self.path), moved_to=str(aside), error=str(e))
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            try:
                w = self._open_writer()
            except sqlite3.Error as e2:
                raise BufferUnavailable(f"cannot create {self.path}: {e2}") from e2
        except sqlite3.Error as e:
            raise BufferUnavailable(f"cannot open {self.path}: {e}") from e
        self._w = w
        self._prepare_inserts(w)
        try:
            self._r = self._connect()
            self._dropped.clear()
            for cls, reason, records, nbytes in w.execute("SELECT cls, reason, records, bytes FROM dropped"):
                self._dropped[(cls, reason)] = [records, nbytes]
                self._persisted[(cls, reason)] = self._snap[(cls, reason)] = (records, nbytes)
            # The budget may have been lowered since the last run: enforce it before accepting records.
            self._est_used = None
            evicted = self._commit(self._new_segment(), 0, 0)
        except sqlite3.Error as e:
            self._w = None
            w.close()
            raise BufferUnavailable(f"cannot open {self.path}: {e}") from e
        with self._lock:
            self._settle(0)
            self._accepting = True
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()
        log.info(
            "buffer.opened",
            path=str(self.path),
            budget_bytes=self._budget,
            size_bytes=self.size_bytes(),
            synchronous=self._synchronous,
            evicted=sum(n for n, _ in evicted.values()),
        )

    def _prepare_inserts(self, w: sqlite3.Connection) -> None:
        # One INSERT takes a whole batch of one class (up to 2048 rows: SQLite runs much bigger
        # VALUES lists slower per row), within its limit on host parameters; the small ones keep a
        # small segment from binding thousands of NULLs.
        limit = max(1, w.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 3)
        big = min(limit, max(64, min(self._batch_max, 2048)))
        self._tiers = sorted({t for t in (8, 64, 512) if t < big} | {big})
        self._pad = [None] * (3 * big)
        self._insert_sql = {
            (str(cls), t): f"INSERT INTO {_table(cls)} (ts, priority, payload) "
            "SELECT column1, column2, column3 FROM (VALUES " + ",".join(["(?,?,?)"] * t) + ") "
            "WHERE column3 IS NOT NULL"
            for cls in RecordClass
            for t in self._tiers
        }

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=256)
        db.execute("PRAGMA busy_timeout=10000")
        # Per connection, and ack() deletes on the reader's: with a SQLite built with secure_delete on
        # (Debian's), full secure delete would zero and log every freed page, 4x slower and over budget.
        db.execute("PRAGMA secure_delete=FAST")
        return db

    def _open_writer(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            # Only takes effect on a new, empty file; must precede the first table (docs/buffer.md).
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise BufferUnavailable(f"{self.path}: cannot use WAL mode (a network file system?)")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            # _connect() set secure_delete=FAST: deleted records are zeroed where that costs no extra
            # I/O (captured inputs may be personal data), but freed pages are not rewritten, so an
            # eviction or an ack stays small in the WAL, which the budget relies on.
            self._migrate(db)
            self._incremental = db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
            self._sizing(db.execute("PRAGMA page_size").fetchone()[0])
            db.execute(f"PRAGMA wal_autocheckpoint={self._wal_pages}")
            # After a checkpoint the WAL restarts from its beginning; this truncates it back to its
            # budgeted size if a long reader ever made it grow past it.
            db.execute(f"PRAGMA journal_size_limit={self._wal_max}")
            self._pages(db)  # reads page 1: a file that is not a database fails here, not later
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BufferUnavailable(
                    f"{self.path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}",
                    "a newer agent wrote it: upgrade the agent again, or move the file away to start empty",
                )
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i]:
                    db.execute(stmt)
            # user_version lives in the file header, so it commits (or not) with the migration.
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        if version < SCHEMA_VERSION:
            log.info("buffer.migrated", path=str(self.path), from_version=version, to_version=SCHEMA_VERSION)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record put before this call is committed (or dropped). True when all of
        them were committed within ``timeout``; False on timeout, write errors or a stopped writer."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                return self._queued == 0
            self._flush_req += 1
            gen, failures = self._flush_req, self._write_failures
            self._wake.notify()
            done = self._done.wait_for(
                lambda: self._flush_done >= gen or self._thread is None or not self._thread.is_alive(),
                timeout,
            )
            return done and self._flush_done >= gen and self._write_failures == failures

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new records, commit the queued ones, stop the writer and close the file."""
        with self._lock:
            self._accepting = False
            self._closed = True
        thread = self._thread
        if thread is not None:
            ok = self.flush(timeout)
            with self._lock:
                self._stopping = True
                self._wake.notify()
            thread.join(timeout)
            if thread.is_alive():  # a hung disk: the thread is a daemon; the next start recovers
                log.error("buffer.writer_stuck", path=str(self.path), queued=self._queued)
                return
            if not ok:
                log.error("buffer.close_lost", path=str(self.path), queued=self._queued)
            self._thread = None
        with self._rlock:
            if self._r is not None:
                self._r.close()
                self._r = None

    def __enter__(self) -> Buffer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- hot path

    def put(
        self, cls: RecordClass, payload: Any, priority: int | None = None, ts: float | None = None
    ) -> bool:
        """Queue one record; O(1), never blocks on I/O, never raises.

        ``payload``: bytes as they are, bytearray/memoryview (copied), str (UTF-8), anything else as
        JSON (orjson, numpy arrays included). Returns False when the record was refused, and counts
        it: too_large, queue_full or invalid (docs/buffer.md). Also False before start() and after
        close(), uncounted.
        """
        try:
            if type(payload) is not bytes:
                payload = _encode(payload)
            n = len(payload)
            if n > self._max_record:
                self._count_drop(cls, DropReason.TOO_LARGE, n)
                return False
            if priority is not None and (type(priority) is not int or not _PRIO_MIN <= priority <= _PRIO_MAX):
                self._count_drop(cls, DropReason.INVALID, n)
                return False
            if ts is None:
                ts = _now()
            elif not math.isfinite(ts := float(ts)):
                self._count_drop(cls, DropReason.INVALID, n)
                return False
            row = (ts, priority, payload)
            with self._lock:
                rows = self._seg[cls]  # KeyError for an unknown class: counted below
                if not self._accepting:
                    return False
                full = self._queued >= self._queue_max or self._queued_bytes + n > self._queue_max_bytes
                if full:
                    c = self._dropped.setdefault((str(cls), DropReason.QUEUE_FULL), [0, 0])
                    c[0] += 1
                    c[1] += n
                    self._kick = True
                else:
                    rows.append(row)
                    self._queued += 1
                    self._queued_bytes += n
                    self._seg_n += 1
                    self._seg_b += n
                    if self._seg_n >= self._batch_max or self._seg_b >= self._txn_bytes:
                        self._seal()
            if full:
                # The writer is behind. If this thread keeps the GIL busy, the writer (which needs
                # the GIL back after every sqlite3 call) may hardly run at all, and the refusals go
                # on and on. Releasing the GIL once, outside the lock, lets it run. This is not a
                # wait for I/O: the record is refused either way (docs/buffer.md, "The write path").
                time.sleep(0)
                return False
            return True
        except Exception:
            with contextlib.suppress(Exception):
                self._count_drop(cls, DropReason.INVALID, len(payload) if isinstance(payload, bytes) else 0)
            return False

    def _count_drop(self, cls: Any, reason: DropReason, nbytes: int) -> None:
        key = str(cls) if isinstance(cls, str) and cls in self._prio else "unknown"
        with self._lock:
            c = self._dropped.setdefault((key, reason), [0, 0])
            c[0] += 1
            c[1] += nbytes
            self._kick = True

    def _new_segment(self) -> _Segment:
        return {str(c): [] for c in RecordClass}

    def _seal(self) -> None:
        """Close the open segment (under _lock): it becomes one transaction."""
        self._sealed.append((self._seg, self._seg_n, self._seg_b))
        self._seg = self._new_segment()
        self._seg_n = self._seg_b = 0
        self._wake.notify()

    # ----------------------------------------------------------------------------------- writer
    #
    # Under a hot path that keeps the GIL busy, every GIL release of the writer (each sqlite3 call,
    # each contended lock) costs it up to the interpreter's switch interval (5 ms) to get the GIL
    # back. So one transaction is as few calls as possible: BEGIN, one INSERT per class, COMMIT (the
    # page count is queried only when an upper-bound estimate says the budget may be reached), and the
    # writer takes _lock once per round, settling the previous round's results at the same time.

    def _run(self) -> None:
        req_done = 0
        try:
            while True:
                with self._lock:
                    self._settle(req_done)
                    deadline = time.monotonic() + self._interval
                    while not (self._sealed or self._stopping or self._kick or self._flush_req > req_done):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._wake.wait(left)
                    if self._seg_n:
                        self._seal()
                    segments, self._sealed = self._sealed, []
                    req, stop, self._kick = self._flush_req, self._stopping, False
                    self._snap = {k: (v[0], v[1]) for k, v in self._dropped.items()}
                self._warn_refusals()
                for seg, n, nbytes in self._merge(segments):
                    self._write_segment(seg, n, nbytes)
                if not segments and any(self._persisted.get(k) != v for k, v in self._snap.items()):
                    self._write_segment(self._new_segment(), 0, 0)  # only counters changed
                req_done = req
                if stop:
                    with self._lock:
                        self._settle(req_done)
                        if not (self._sealed or self._seg_n):
                            break
        except BaseException as e:  # a bug: say so loudly; flush() and close() stop waiting
            log.error("buffer.writer_died", exc_info=True, error=repr(e))
            raise
        finally:
            with self._lock:
                self._accepting = False
                self._done.notify_all()
            w, self._w = self._w, None
            if w is not None:
                with contextlib.suppress(sqlite3.Error):
                    # A clean stop leaves no WAL behind (best effort: a reader may hold it).
                    w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                w.close()

    def _merge(self, segments: list[tuple[_Segment, int, int]]) -> list[tuple[_Segment, int, int]]:
        """Consecutive sealed segments joined into transactions of up to _txn_rows and _txn_bytes."""
        out: list[tuple[_Segment, int, int]] = []
        for seg, n, nbytes in segments:
            if out and out[-1][1] + n <= self._txn_rows and out[-1][2] + nbytes <= self._txn_bytes:
                into, n0, b0 = out[-1]
                for cls, rows in seg.items():
                    into[cls].extend(rows)
                out[-1] = (into, n0 + n, b0 + nbytes)
            else:
                out.append((seg, n, nbytes))
        return out

    def _settle(self, req_done: int) -> None:
        """Under _lock: apply what the writer did since it last held the lock."""
        for k, (r, b) in self._owed.items():
            c = self._dropped.setdefault(k, [0, 0])
            c[0] += r
            c[1] += b
        self._owed = {}
        o = self._owed_queue
        self._queued -= o[0]
        self._queued_bytes -= o[1]
        self._committed += o[2]
        self._write_failures += o[3]
        self._owed_queue = [0, 0, 0, 0]
        if req_done > self._flush_done:
            self._flush_done = req_done
            self._done.notify_all()

    def _owe(self, key: tuple[str, str], records: int, nbytes: int) -> None:
        """A counter change made by the writer: in its snapshot now, in _dropped at the next settle."""
        c = self._owed.setdefault(key, [0, 0])
        c[0] += records
        c[1] += nbytes
        r, b = self._snap.get(key, (0, 0))
        self._snap[key] = (r + records, b + nbytes)

    def _write_segment(self, seg: _Segment, n: int, nbytes: int) -> None:
        delay = 0.05
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                evicted = self._commit(seg, n, nbytes)
            except sqlite3.Error as e:
                log.error(
                    "buffer.write_failed", path=str(self.path), error=str(e), attempt=attempt, records=n
                )
                if attempt < WRITE_ATTEMPTS and not self._stopping:
                    time.sleep(delay)
                    delay = min(delay * 4, 2.0)
                    continue
                for cls, rows in seg.items():
                    if rows:
                        self._owe((cls, DropReason.WRITE_ERROR), len(rows), sum(len(r[2]) for r in rows))
                self._owed_queue[0] += n
                self._owed_queue[1] += nbytes
                self._owed_queue[3] += 1
                log.error("buffer.write_dropped", path=str(self.path), records=n, bytes=nbytes)
                return
            self._owed_queue[0] += n
            self._owed_queue[1] += nbytes
            self._owed_queue[2] += n
            if evicted:
                self._log_evictions(evicted)
            return

    def _commit(self, seg: _Segment, n: int, nbytes: int) -> dict[tuple[str, str], tuple[int, int]]:
        """One transaction: the segment's rows, the budget, the changed counters."""
        w = self._w
        assert w is not None
        w.execute("BEGIN IMMEDIATE")
        try:
            for cls, rows in seg.items():
                if rows:
                    self._insert(w, cls, rows)
            est, evicted = self._enforce_budget(w, n, nbytes)
            counters = dict(self._snap)
            for k, (r, b) in evicted.items():
                r0, b0 = counters.get(k, (0, 0))
                counters[k] = (r0 + r, b0 + b)
            changed = [
                (str(k[0]), str(k[1]), r, b)
                for k, (r, b) in counters.items()
                if self._persisted.get(k) != (r, b)
            ]
            if changed:
                w.executemany(
                    "INSERT INTO dropped (cls, reason, records, bytes) VALUES (?, ?, ?, ?) ON CONFLICT "
                    "(cls, reason) DO UPDATE SET records = excluded.records, bytes = excluded.bytes",
                    changed,
                )
            w.execute("COMMIT")
        except BaseException:
            self._est_used = None  # what the rolled-back transaction did to the pages is unknown
            self._shrink_pages = 0
            with contextlib.suppress(sqlite3.Error):
                w.execute("ROLLBACK")
            raise
        self._est_used = est
        if self._shrink_pages:
            try:
                self._shrink(w)
            except sqlite3.Error as e:  # the records are committed: this must not fail their write
                log.error("buffer.shrink_failed", path=str(self.path), error=str(e))
        for c, reason, r, b in changed:
            self._persisted[(c, reason)] = (r, b)
        for k, (r, b) in evicted.items():
            self._owe(k, r, b)
        return evicted

    def _insert(self, w: sqlite3.Connection, cls: str, rows: list[_Row]) -> None:
        # Fixed-size multi-row INSERTs, padded with NULL rows that its WHERE skips: one sqlite3 call
        # (one GIL release) for up to _tiers[-1] rows, and no statement is ever prepared twice.
        i, n = 0, len(rows)
        big = self._tiers[-1]
        while i < n:
            left = n - i
            tier = big if left >= big else next(t for t in self._tiers if t >= left)
            params = list(itertools.chain.from_iterable(rows[i : i + tier]))
            if left < tier:
                params += self._pad[: 3 * (tier - left)]
            w.execute(self._insert_sql[(cls, tier)], params)
            i += tier

    def _pages(self, db: sqlite3.Connection) -> tuple[int, int]:
        """(used, total) pages as this connection sees them: inside the writer's transaction, with
        the rows it has just inserted. Free pages are not used: later inserts reuse them."""
        used, total = db.execute(
            "SELECT p.page_count - f.freelist_count, p.page_count "
            "FROM pragma_page_count() AS p, pragma_freelist_count() AS f"
        ).fetchone()
        return int(used), int(total)

    def _enforce_budget(
        self, w: sqlite3.Connection, n: int, nbytes: int
    ) -> tuple[int | None, dict[tuple[str, str], tuple[int, int]]]:
        """Inside the writer's transaction: when the used pages pass the high-water mark, delete
        lowest-priority oldest records until they are under the low-water mark. Returns the new
        estimate of the used pages and the evictions per (class, "budget")."""
        evicted: dict[tuple[str, str], list[int]] = {}
        est = self._est_used
        if est is not None:
            # An upper bound of the pages this segment added (see _sizing): while it stays under the
            # high-water mark, the exact count is not needed.
            est += math.ceil((2 * nbytes + ROW_OVERHEAD * n) / self._page_size) + 2
            if est <= self._high_pages:
                return est, {}
        used, total = self._pages(w)
        if used > self._high_pages:
            while used > self._low_pages:
                if not self._evict(w, (used - self._low_pages) * self._page_size, evicted):
                    break  # nothing left to evict: the schema alone is over budget (it never is)
                used, total = self._pages(w)
        if self._incremental and total > self._file_cap_pages:
            # Free pages are kept for reuse (cheaper than shrinking the file and growing it again),
            # so the file only passes its cap when budget_bytes was lowered: shrink it after the
            # commit (see _shrink).
            self._shrink_pages = total - self._file_cap_pages
        return used, {k: (r, b) for k, (r, b) in evicted.items()}

    def _shrink(self, w: sqlite3.Connection) -> None:
        """Move pages from the end of the file into free ones and truncate it (a transaction of its
        own), then checkpoint so that the file on disk shrinks now rather than at some later
        checkpoint. executescript, because incremental_vacuum frees one page per sqlite3_step and
        execute() steps statements without result columns only once."""
        pages, self._shrink_pages = self._shrink_pages, 0
        w.executescript(f"PRAGMA incremental_vacuum({pages})")
        w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        log.info(
            "buffer.shrunk", path=str(self.path), pages=pages, size_bytes=self._pages(w)[1] * self._page_size
        )
        self._est_used = None

    def _groups(self, w: sqlite3.Connection) -> list[tuple[int, str, str, tuple[int, ...]]]:
        """(priority, class, WHERE clause, its parameters) of every non-empty priority group: the
        rows of a class that follow the class's priority, and one group per put(priority=...)."""
        groups: list[tuple[int, str, str, tuple[int, ...]]] = []
        for cls, prio in w.execute(_GROUPS_SQL):
            if prio is None:
                groups.append((self._prio[cls], cls, "priority IS NULL", ()))
            else:
                groups.append((prio, cls, "priority = ?", (prio,)))
        return groups

    # Eviction is a handful of statements whatever it deletes: the victims are found by window
    # functions inside SQLite, never stepped through row by row in Python, because every step would
    # release the GIL, and under a busy hot path each release costs the writer up to 5 ms.

    def _evict(self, w: sqlite3.Connection, need: int, evicted: dict[tuple[str, str], list[int]]) -> bool:
        """Delete at least ``need`` bytes (payload + ROW_OVERHEAD per row) of the lowest-priority
        records, oldest first: in seq order within one group; by ts across the groups of that
        priority when there are several. False when there is nothing left to delete."""
        groups = self._groups(w)
        if not groups:
            return False
        lowest = min(g[0] for g in groups)
        level = [g for g in groups if g[0] == lowest]
        if len(level) == 1:
            _, cls, cond, args = level[0]
            t = _table(cls)
            # The window streams along the primary key and stops at the first row that reaches
            # ``need``: the cost is the prefix deleted, not the table.
            row = w.execute(
                "SELECT seq, n, bytes FROM (SELECT seq, row_number() OVER win AS n, "
                "sum(length(payload)) OVER win AS bytes, "
                f"sum(length(payload) + {ROW_OVERHEAD}) OVER win AS run "
                f"FROM {t} WHERE {cond} WINDOW win AS (ORDER BY seq ROWS UNBOUNDED PRECEDING)) "
                "WHERE run >= ? LIMIT 1",
                (*args, need),
            ).fetchone()
            if row is None:  # the whole group is less than needed: all of it goes
                row = w.execute(
                    f"SELECT max(seq), count(*), coalesce(sum(length(payload)), 0) FROM {t} WHERE {cond}",
                    args,
                ).fetchone()
            last, count, nbytes = row
            deleted = w.execute(f"DELETE FROM {t} WHERE {cond} AND seq <= ?", (*args, last)).rowcount
            self._count_evicted(evicted, cls, deleted, count, nbytes)
            return True
        # Several groups share the lowest priority: find the ts up to which they hold ``need``
        # bytes, then delete every row of theirs up to it (this sorts them: a rare configuration).
        union = " UNION ALL ".join(
            f"SELECT ts, length(payload) + {ROW_OVERHEAD} AS size FROM {_table(cls)} WHERE {cond}"
            for _, cls, cond, _ in level
        )
        params = [a for g in level for a in g[3]]
        row = w.execute(
            f"SELECT ts FROM (SELECT ts, sum(size) OVER (ORDER BY ts ROWS UNBOUNDED PRECEDING) AS run "
            f"FROM ({union})) WHERE run >= ? LIMIT 1",
            (*params, need),
        ).fetchone()
        cutoff = math.inf if row is None else row[0]
        for _, cls, cond, args in level:
            t = _table(cls)
            count, nbytes = w.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM {t} WHERE {cond} AND ts <= ?",
                (*args, cutoff),
            ).fetchone()
            if count:
                deleted = w.execute(f"DELETE FROM {t} WHERE {cond} AND ts <= ?", (*args, cutoff)).rowcount
                self._count_evicted(evicted, cls, deleted, count, nbytes)
        return True

    def _count_evicted(
        self, evicted: dict[tuple[str, str], list[int]], cls: str, deleted: int, expected: int, nbytes: int
    ) -> None:
        if deleted != expected:  # impossible inside our own write transaction: say so if it happens
            log.error("buffer.evict_mismatch", cls=cls, expected=expected, deleted=deleted)
        c = evicted.setdefault((cls, DropReason.BUDGET), [0, 0])
        c[0] += deleted
        c[1] += nbytes

    def _log_evictions(self, evicted: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """At most one warning a minute, with the evictions since the last one."""
        for (cls, _), (r, _b) in evicted.items():
            self._unlogged[cls] = self._unlogged.get(cls, 0) + r
        now = time.monotonic()
        if now - self._last_evict_log >= 60:
            self._last_evict_log = now
            log.warning(
                "buffer.evicted",
                path=str(self.path),
                reason="budget",
                records=dict(self._unlogged),
                budget_bytes=self._budget,
            )
            self._unlogged.clear()

    def _warn_refusals(self) -> None:
        """One warning a minute per reason while put() refuses records (the hot path cannot log)."""
        now = time.monotonic()
        for (cls, reason), (r, _b) in self._snap.items():
            if reason not in _REFUSALS or now - self._warned.get((cls, reason), -math.inf) < 60:
                continue
            delta = r - self._persisted.get((cls, reason), (0, 0))[0]
            if delta > 0:
                self._warned[(cls, reason)] = now
                log.warning("buffer.refusing", path=str(self.path), cls=cls, reason=reason, records=delta)

    # ---------------------------------------------------------------------------------- readers

    def _reader(self) -> sqlite3.Connection:
        if self._r is None:
            raise BufferUnavailable(f"{self.path} is not open", "call start() first")
        return self._r

    def read_batch(
        self, cls: RecordClass, max_records: int = 1000, max_bytes: int = 4 * MIB, *, after_seq: int = 0
    ) -> list[Record]:
        """The oldest records of a class (seq > after_seq), up to max_records and max_bytes of
        payload; always at least one record when there is one, so a record larger than max_bytes
        cannot stall the uploader. Reading does not remove them: ack() does."""
        cls = RecordClass(cls)
        default = self._prio[cls]
        out: list[Record] = []
        total = 0
        with self._rlock:
            try:
                cur = self._reader().execute(
                    f"SELECT seq, ts, priority, payload FROM {_table(cls)} "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
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
        """Delete records whose upload is confirmed: ``range(first, last + 1)`` (one range delete)
        or any iterable of seqs. Idempotent: seqs already gone are ignored (seqs are never reused).
        Returns how many records this call deleted."""
        cls = RecordClass(cls)
        t = _table(cls)
        deleted = 0
        nbytes = 0
        with self._rlock:
            db = self._reader()
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
        """Disk the buffer occupies now or after the next checkpoint, whichever is more: the main
        file (its logical size, page_count x page_size, or its size on disk if larger) + WAL + shm."""
        with self._rlock:
            db = self._reader()
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

    def stats(self) -> dict[str, Any]:
        """Per class: records, payload bytes, oldest ts, priority, acked; drops per class and reason
        (cumulative since the file was created); committed (since start) and queued. Counting the
        records scans the tables (length() does not read payload pages): call it every few seconds,
        not per request."""
        classes: dict[str, dict[str, Any]] = {}
        with self._rlock:
            db = self._reader()
            try:
                classes = class_counts(db)
            except sqlite3.Error as e:
                raise BufferUnavailable(f"cannot read {self.path}: {e}") from e
        for cls in RecordClass:
            classes[str(cls)]["priority"] = self._prio[cls]
        dropped: dict[str, dict[str, dict[str, int]]] = {}
        with self._lock:
            for (name, reason), (r, b) in sorted(self._dropped.items()):
                dropped.setdefault(str(name), {})[str(reason)] = {"records": r, "bytes": b}
            committed, queued, queued_bytes = self._committed, self._queued, self._queued_bytes
        return {
            "classes": classes,
            "dropped": dropped,
            "committed": committed,
            "queued": queued,
            "queued_bytes": queued_bytes,
            "size_bytes": self.size_bytes(),
            "budget_bytes": self._budget,
        }


def class_counts(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per class, in one snapshot: records, payload bytes, the oldest record's ts and the acked
    (uploaded) totals. Shared by :meth:`Buffer.stats` and ``edge-agent status``, which reads the file
    of a running agent read-only; a class whose table does not exist yet is left out."""
    classes: dict[str, dict[str, Any]] = {}
    db.execute("BEGIN")
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for cls in RecordClass:
            t = _table(cls)
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


# One statement for every class's priority groups (see Buffer._groups).
_GROUPS_SQL: Final = " UNION ALL ".join(
    f"SELECT '{cls}', NULL FROM (SELECT 1 FROM {_table(cls)} WHERE priority IS NULL LIMIT 1) "
    f"UNION ALL SELECT DISTINCT '{cls}', priority FROM {_table(cls)} WHERE priority IS NOT NULL"
    for cls in RecordClass
)
