"""The write path (docs/buffer.md, "The write path"): put() on the hot path, the in-memory queue of
batches, and the one thread that commits them to SQLite.

Writes never block inference: :meth:`Writer.put` appends a tuple to an in-memory batch under a
lock held for a few hundred nanoseconds; one writer thread commits whole batches, one transaction
each (several at once when it has fallen behind). A commit that takes the buffer over its disk
budget deletes, in the same transaction, the lowest-priority oldest records and adds them to the
persisted drop counters, so the counters and the deletions can never disagree, even after kill -9.

Every accepted record gets a *ticket*, in the order put() accepted it. After each transaction the
writer tells its listeners the highest ticket it has processed (committed, or dropped by a write
error), so a caller that must not go on before its record is on disk (the scoring API answering a
captured request, ``telemetry.capture_commit = "before_answer"``) can wait for exactly that, without
a thread of its own. :meth:`Writer.put_urgent` also wakes the writer at once instead of at the next
``flush_interval_s``; records that arrive while a transaction runs go into the next one together
(group commit), so one commit serves every request that was waiting.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import orjson

from agent.telemetry.buffer import budget, evict
from agent.telemetry.buffer.budget import Limits, Sizing
from agent.telemetry.buffer.records import PRIO_MAX, PRIO_MIN, DropReason, RecordClass
from agent.telemetry.buffer.schema import table
from edge_core.log import get_logger

log = get_logger("buffer")

#: Tries of one transaction before its records are dropped as write_error (with backoff in between).
WRITE_ATTEMPTS: Final = 5
#: The refusals of put(), counted on the hot path (the others are counted by the writer).
_REFUSALS: Final = frozenset({"too_large", "queue_full", "invalid"})

_Row = tuple[float, int | None, bytes]  # (ts, priority, payload): exactly the INSERT's parameters
_Segment = dict[str, list[_Row]]  # the rows of one transaction, per class
#: A sealed segment: its rows, their count and payload bytes, and the highest ticket among them.
_Sealed = tuple[_Segment, int, int, int]


_now = time.time  # one global lookup on the hot path instead of two


def _encode(payload: Any) -> bytes:
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)  # a copy: the caller may reuse its buffer after put() returns
    if isinstance(payload, str):
        return payload.encode()
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _new_segment() -> _Segment:
    return {str(c): [] for c in RecordClass}


def merge(segments: list[_Sealed], txn_rows: int, txn_bytes: int) -> list[_Sealed]:
    """Consecutive sealed segments joined into transactions of up to txn_rows and txn_bytes."""
    out: list[_Sealed] = []
    for seg, n, nbytes, hi in segments:
        if out and out[-1][1] + n <= txn_rows and out[-1][2] + nbytes <= txn_bytes:
            into, n0, b0, _ = out[-1]
            for cls, rows in seg.items():
                into[cls].extend(rows)
            out[-1] = (into, n0 + n, b0 + nbytes, hi)  # segments are in ticket order
        else:
            out.append((seg, n, nbytes, hi))
    return out


class Writer:
    """The queue shared with the hot path and the thread that commits it. Thread-safe.

    Buffer (the package's facade) validates the settings, opens the file and hands it over to
    :meth:`open`, which starts the thread."""

    def __init__(
        self,
        path: Path,
        limits: Limits,
        sizing: Sizing,
        *,
        flush_interval_s: float,
        queue_max: int,
        queue_max_bytes: int,
        class_priority: Mapping[str, int],
    ) -> None:
        self.path = path
        self._budget = limits.budget_bytes
        self._batch_max = limits.batch_max
        self._max_record = limits.max_record_bytes
        # A writer that fell behind commits up to MERGE_BATCHES sealed batches in one transaction,
        # within the same byte bound (see budget.Limits.txn_bytes).
        self._txn_bytes = limits.txn_bytes
        self._txn_rows = limits.txn_rows
        self._interval = flush_interval_s
        self._queue_max = queue_max
        self._queue_max_bytes = queue_max_bytes
        self._prio = class_priority
        self._sizing = sizing  # open() replaces it with the one for the file's page size

        # Shared with the hot path, guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it
        self._done = threading.Condition(self._lock)  # flush() waits on it
        self._accepting = False
        self._seg: _Segment = _new_segment()
        self._seg_n = 0
        self._seg_b = 0
        self._sealed: list[_Sealed] = []
        self._ticket = 0  # tickets handed out: the open segment holds those after the last sealed one
        self._urgent = False  # put_urgent() was called since the writer last took the segments
        self._queued = 0  # records put and not yet committed (open + sealed + being written)
        self._queued_bytes = 0
        self._committed = 0
        self._flush_req = 0
        self._flush_done = 0
        self._write_failures = 0  # segments dropped as write_error, for flush()'s answer
        self._stopping = False
        self._kick = False  # counters changed with no records to write: the writer should persist them
        # Drop counters, cumulative since the file was created: loaded by open(), then kept here
        # exactly (stats() reads them without touching SQLite) and persisted by every transaction.
        self._dropped: dict[tuple[str, str], list[int]] = {}

        self._w: sqlite3.Connection | None = None  # the writer thread's
        self._thread: threading.Thread | None = None
        # The writer thread's own state (open() sets it up before the thread exists).
        self._persisted: dict[tuple[str, str], tuple[int, int]] = {}  # the dropped table's rows
        self._snap: dict[tuple[str, str], tuple[int, int]] = {}  # _dropped as the writer knows it
        self._owed: dict[tuple[str, str], list[int]] = {}  # counter changes _settle() applies
        self._owed_queue = [0, 0, 0, 0]  # records, bytes, committed, failed segments: same
        self._est_used: int | None = None  # upper bound of the used pages; None: ask SQLite
        self._warned: dict[tuple[str, str], float] = {}
        self._unlogged: dict[str, int] = {}
        self._last_evict_log = -math.inf
        self._incremental = False
        self._tiers: list[int] = []
        self._pad: list[None] = []
        self._insert_sql: dict[tuple[str, int], str] = {}
        self._listeners: list[Callable[[int], None]] = []

    # -------------------------------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def thread(self) -> threading.Thread | None:
        """The writer thread once started (the daemon's supervisor watches it)."""
        return self._thread

    def open(
        self, w: sqlite3.Connection, sizing: Sizing, incremental: bool
    ) -> dict[tuple[str, str], tuple[int, int]]:
        """Take over the writer's connection (schema.open_file()), load the drop counters, enforce
        the budget, accept records and start the thread. Returns the evictions. On a failure the
        connection is closed and the error raised."""
        self._w = w
        self._sizing = sizing
        self._incremental = incremental
        self._prepare_inserts(w)
        try:
            self._dropped.clear()
            for cls, reason, records, nbytes in w.execute("SELECT cls, reason, records, bytes FROM dropped"):
                self._dropped[(cls, reason)] = [records, nbytes]
                self._persisted[(cls, reason)] = self._snap[(cls, reason)] = (records, nbytes)
            # The budget may have been lowered since the last run: enforce it before accepting records.
            self._est_used = None
            evicted = self._commit(_new_segment(), 0, 0)
        except BaseException:
            self._w = None
            w.close()
            raise
        with self._lock:
            self._settle(0)
            self._accepting = True
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()
        return evicted

    def _prepare_inserts(self, w: sqlite3.Connection) -> None:
        # One INSERT takes a whole batch of one class (up to 2048 rows: SQLite runs much bigger
        # VALUES lists slower per row), within its limit on host parameters; the small ones keep a
        # small segment from binding thousands of NULLs.
        limit = max(1, w.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 3)
        big = min(limit, max(64, min(self._batch_max, 2048)))
        self._tiers = sorted({t for t in (8, 64, 512) if t < big} | {big})
        self._pad = [None] * (3 * big)
        self._insert_sql = {
            (str(cls), t): f"INSERT INTO {table(cls)} (ts, priority, payload) "
            "SELECT column1, column2, column3 FROM (VALUES " + ",".join(["(?,?,?)"] * t) + ") "
            "WHERE column3 IS NOT NULL"
            for cls in RecordClass
            for t in self._tiers
        }

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

    def close(self, timeout: float) -> bool:
        """Refuse new records, commit the queued ones and stop the thread, which closes the
        connection. False when the thread did not stop within ``timeout``."""
        with self._lock:
            self._accepting = False
        thread = self._thread
        if thread is not None:
            ok = self.flush(timeout)
            with self._lock:
                self._stopping = True
                self._wake.notify()
            thread.join(timeout)
            if thread.is_alive():  # a hung disk: the thread is a daemon; the next start recovers
                log.error("buffer.writer_stuck", path=str(self.path), queued=self._queued)
                return False
            if not ok:
                log.error("buffer.close_lost", path=str(self.path), queued=self._queued)
            self._thread = None
        return True

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(ticket)`` on the writer thread after each transaction: every record whose ticket
        is at most ``ticket`` is committed, or was dropped by a write error. ``fn`` must be quick and
        must not call back into the buffer (it runs between the writer's transactions)."""
        self._listeners.append(fn)

    def counters(self) -> tuple[dict[str, dict[str, dict[str, int]]], int, int, int]:
        """(drops per class and reason, committed, queued, queued bytes), for stats()."""
        dropped: dict[str, dict[str, dict[str, int]]] = {}
        with self._lock:
            for (name, reason), (r, b) in sorted(self._dropped.items()):
                dropped.setdefault(str(name), {})[str(reason)] = {"records": r, "bytes": b}
            return dropped, self._committed, self._queued, self._queued_bytes

    # --------------------------------------------------------------------------------- hot path

    def put(
        self, cls: RecordClass, payload: Any, priority: int | None = None, ts: float | None = None
    ) -> bool:
        """Queue one record; O(1), never blocks on I/O, never raises (see Buffer.put)."""
        return self._enqueue(cls, payload, priority, ts, False) != 0

    def put_urgent(
        self, cls: RecordClass, payload: Any, priority: int | None = None, ts: float | None = None
    ) -> int:
        """put(), and the writer commits at once (with whatever else arrives meanwhile). Returns the
        record's ticket, 0 when it was refused."""
        return self._enqueue(cls, payload, priority, ts, True)

    def _enqueue(
        self, cls: RecordClass, payload: Any, priority: int | None, ts: float | None, urgent: bool
    ) -> int:
        try:
            if type(payload) is not bytes:
                payload = _encode(payload)
            n = len(payload)
            if n > self._max_record:
                self._count_drop(cls, DropReason.TOO_LARGE, n)
                return 0
            if priority is not None and (type(priority) is not int or not PRIO_MIN <= priority <= PRIO_MAX):
                self._count_drop(cls, DropReason.INVALID, n)
                return 0
            if ts is None:
                ts = _now()
            elif not math.isfinite(ts := float(ts)):
                self._count_drop(cls, DropReason.INVALID, n)
                return 0
            row = (ts, priority, payload)
            ticket = 0
            with self._lock:
                rows = self._seg[cls]  # KeyError for an unknown class: counted below
                if not self._accepting:
                    return 0
                full = self._queued >= self._queue_max or self._queued_bytes + n > self._queue_max_bytes
                if full:
                    c = self._dropped.setdefault((str(cls), DropReason.QUEUE_FULL), [0, 0])
                    c[0] += 1
                    c[1] += n
                    self._kick = True
                else:
                    rows.append(row)
                    self._ticket = ticket = self._ticket + 1
                    self._queued += 1
                    self._queued_bytes += n
                    self._seg_n += 1
                    self._seg_b += n
                    if self._seg_n >= self._batch_max or self._seg_b >= self._txn_bytes:
                        self._seal()
                    elif urgent and not self._urgent:
                        # Once per round: the records that follow while the writer commits ride
                        # along in its next transaction (group commit).
                        self._urgent = True
                        self._wake.notify()
            if full:
                # The writer is behind. If this thread keeps the GIL busy, the writer (which needs
                # the GIL back after every sqlite3 call) may hardly run at all, and the refusals go
                # on and on. Releasing the GIL once, outside the lock, lets it run. This is not a
                # wait for I/O: the record is refused either way (docs/buffer.md, "The write path").
                time.sleep(0)
                return 0
            return ticket
        except Exception:
            with contextlib.suppress(Exception):
                self._count_drop(cls, DropReason.INVALID, len(payload) if isinstance(payload, bytes) else 0)
            return 0

    def _count_drop(self, cls: Any, reason: DropReason, nbytes: int) -> None:
        key = str(cls) if isinstance(cls, str) and cls in self._prio else "unknown"
        with self._lock:
            c = self._dropped.setdefault((key, reason), [0, 0])
            c[0] += 1
            c[1] += nbytes
            self._kick = True

    def _seal(self) -> None:
        """Close the open segment (under _lock): it becomes one transaction."""
        self._sealed.append((self._seg, self._seg_n, self._seg_b, self._ticket))
        self._seg = _new_segment()
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
                    while not (
                        self._sealed
                        or self._urgent
                        or self._stopping
                        or self._kick
                        or self._flush_req > req_done
                    ):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._wake.wait(left)
                    if self._seg_n:
                        self._seal()
                    segments, self._sealed = self._sealed, []
                    req, stop, self._kick, self._urgent = self._flush_req, self._stopping, False, False
                    self._snap = {k: (v[0], v[1]) for k, v in self._dropped.items()}
                self._warn_refusals()
                for seg, n, nbytes, hi in merge(segments, self._txn_rows, self._txn_bytes):
                    self._write_segment(seg, n, nbytes)
                    self._notify(hi)
                if not segments and any(self._persisted.get(k) != v for k, v in self._snap.items()):
                    self._write_segment(_new_segment(), 0, 0)  # only counters changed
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

    def _notify(self, ticket: int) -> None:
        for fn in self._listeners:
            try:
                fn(ticket)
            except Exception:  # a listener's bug must not stop the commits
                log.error("buffer.listener_failed", exc_info=True)

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
        if self._one_statement(w, seg, n, nbytes):
            return {}
        w.execute("BEGIN IMMEDIATE")
        try:
            for cls, rows in seg.items():
                if rows:
                    self._insert(w, cls, rows)
            est, evicted, shrink_pages = evict.enforce(
                w, self._sizing, self._prio, self._est_used, n, nbytes, self._incremental
            )
            changed = budget.counters_to_write(self._snap, evicted, self._persisted)
            if changed:
                w.executemany(
                    "INSERT INTO dropped (cls, reason, records, bytes) VALUES (?, ?, ?, ?) ON CONFLICT "
                    "(cls, reason) DO UPDATE SET records = excluded.records, bytes = excluded.bytes",
                    changed,
                )
            w.execute("COMMIT")
        except BaseException:
            self._est_used = None  # what the rolled-back transaction did to the pages is unknown
            with contextlib.suppress(sqlite3.Error):
                w.execute("ROLLBACK")
            raise
        self._est_used = est
        if shrink_pages:
            # After the commit, because incremental_vacuum is a transaction of its own.
            try:
                evict.shrink(w, shrink_pages, self.path, self._sizing.page_size)
                self._est_used = None
            except sqlite3.Error as e:  # the records are committed: this must not fail their write
                log.error("buffer.shrink_failed", path=str(self.path), error=str(e))
        for c, reason, r, b in changed:
            self._persisted[(c, reason)] = (r, b)
        for k, (r, b) in evicted.items():
            self._owe(k, r, b)
        return evicted

    def _one_statement(self, w: sqlite3.Connection, seg: _Segment, n: int, nbytes: int) -> bool:
        """Commit a small segment of one class as one INSERT in autocommit mode when nothing else
        belongs in its transaction: the budget surely not reached, no counter changed. One sqlite3
        call (one GIL release) instead of BEGIN, INSERT, COMMIT: under a durable capture
        (before_answer) the writer commits a few records per round, and every answer waits for it."""
        est = self._est_used
        if est is None or not 0 < n <= self._tiers[-1]:
            return False
        filled = [(cls, rows) for cls, rows in seg.items() if rows]
        if len(filled) != 1:
            return False
        after = self._sizing.estimate(est, n, nbytes)
        if self._sizing.must_evict(after) or budget.counters_to_write(self._snap, {}, self._persisted):
            return False
        try:
            self._insert(w, *filled[0])
        except BaseException:
            self._est_used = None
            raise
        self._est_used = after
        return True

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
