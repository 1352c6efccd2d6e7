"""The buffer's file (docs/buffer.md, "Schema"): one table per record class, the migrations that make
them, and opening the file: WAL, the budget's pragmas, and a malformed file set aside rather than
allowed to keep the agent from serving.

Every file has an *epoch*: an id made when the file is created (or, for a file from before epochs,
when it is first opened by an agent that knows them). Sequence numbers restart at 1 in a new file, so
the uploader names blobs by epoch and sequence range together: a buffer set aside as corrupt, or
deleted, can never overwrite the blobs of the one before it (docs/monitoring.md, "Upload")."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.telemetry.buffer.budget import Limits, Sizing, plan
from agent.telemetry.buffer.records import RecordClass
from edge_core.errors import BufferUnavailable
from edge_core.log import get_logger

log = get_logger("buffer")


def table(cls: str) -> str:
    return f"records_{cls}"


def _class_tables(cls: str) -> list[str]:
    t = table(cls)
    return [
        # One table per class: inserts touch a single b-tree with no secondary index, read_batch and
        # ack are primary-key ranges, and evicting a class's oldest rows frees whole pages instead of
        # punching holes into pages shared with other classes. AUTOINCREMENT: a seq is never reused,
        # even after the table was emptied, so a repeated ack can never delete a newer record.
        f"CREATE TABLE {t} (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
        "priority INTEGER, payload BLOB NOT NULL)",
        # NULL priority = the class's priority (Buffer(priorities=...)). Only put(priority=...)
        # stores one, and only those rows are indexed, so the common insert pays nothing for it.
        f"CREATE INDEX {t}_priority ON {t} (priority, seq) WHERE priority IS NOT NULL",
    ]


def _migration_v1() -> list[str]:
    # The classes of version 1, named: a class added later gets its table from a later migration,
    # so a version-1 file and a new one end up with the same tables.
    stmts = [s for cls in ("capture", "inference", "system", "event") for s in _class_tables(cls)]
    stmts.append(
        "CREATE TABLE dropped (cls TEXT NOT NULL, reason TEXT NOT NULL, records INTEGER NOT NULL, "
        "bytes INTEGER NOT NULL, PRIMARY KEY (cls, reason)) WITHOUT ROWID"
    )
    stmts.append(
        "CREATE TABLE acked (cls TEXT PRIMARY KEY, records INTEGER NOT NULL, bytes INTEGER NOT NULL) "
        "WITHOUT ROWID"
    )
    return stmts


#: Version 2: Azure ML data-collector records (RecordClass.COLLECTION).
_MIGRATION_V2 = _class_tables(RecordClass.COLLECTION)


def _migration_v3() -> list[str]:
    # Facts about the file itself (its epoch), as text: a new fact needs no migration.
    return ["CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"]


#: MIGRATIONS[i] takes user_version i to i + 1, in one transaction with the version bump.
MIGRATIONS: Final[tuple[list[str], ...]] = (_migration_v1(), _MIGRATION_V2, _migration_v3())
SCHEMA_VERSION: Final = len(MIGRATIONS)
#: The first version with an epoch: a file migrated from an older one was used without epochs.
EPOCH_VERSION: Final = 3


def new_epoch(now: float | None = None) -> str:
    """16 hex digits: the creation time in seconds (so blob names of later files sort after those of
    earlier ones while the device's clock is right), then 32 random bits (so they never collide,
    even when it is not: a device without a real-time clock boots in 1970)."""
    t = int(time.time() if now is None else now)
    return f"{max(0, t) & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
    db.execute("PRAGMA busy_timeout=10000")
    # Per connection, and ack() deletes on the reader's: with a SQLite built with secure_delete on
    # (Debian's), full secure delete would zero and log every freed page, 4x slower and over budget.
    db.execute("PRAGMA secure_delete=FAST")
    return db


@dataclass(frozen=True, slots=True)
class Opened:
    """The writer's connection to a file ready for records, and the budget for its page size."""

    db: sqlite3.Connection
    sizing: Sizing
    incremental: bool  # auto_vacuum=INCREMENTAL: the file can be shrunk (budget.Sizing.shrink_by)
    epoch: str
    #: The file was written by an agent without epochs: upload intents recorded without one are its.
    pre_epoch: bool


def used_pages(db: sqlite3.Connection) -> tuple[int, int]:
    """(used, total) pages as this connection sees them: inside the writer's transaction, with
    the rows it has just inserted. Free pages are not used: later inserts reuse them."""
    used, total = db.execute(
        "SELECT p.page_count - f.freelist_count, p.page_count "
        "FROM pragma_page_count() AS p, pragma_freelist_count() AS f"
    ).fetchone()
    return int(used), int(total)


def open_file(path: Path, synchronous: str, limits: Limits) -> Opened:
    """Open, create or migrate the file for the writer. A file that is not a database, or is
    malformed (a bad sector, a file written by something else), is set aside for analysis and the
    buffer starts empty: telemetry must not keep the agent from serving. Any other failure
    (permissions, disk I/O, a newer schema) is BufferUnavailable."""
    try:
        return _open(path, synchronous, limits)
    except sqlite3.DatabaseError as e:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
        if code not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise BufferUnavailable(f"cannot open {path}: {e}") from e
        set_aside(path, e)
        try:
            return _open(path, synchronous, limits)
        except sqlite3.Error as e2:
            raise BufferUnavailable(f"cannot create {path}: {e2}") from e2
    except sqlite3.Error as e:
        raise BufferUnavailable(f"cannot open {path}: {e}") from e


def set_aside(path: Path, error: Exception) -> Path:
    """Move a damaged file, with its WAL and shm, to ``<name>.corrupt-<unix time>``."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    log.error("buffer.quarantined", path=str(path), moved_to=str(aside), error=str(error))
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


def _open(path: Path, synchronous: str, limits: Limits) -> Opened:
    db = connect(path)
    try:
        # Only takes effect on a new, empty file; must precede the first table (docs/buffer.md).
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise BufferUnavailable(f"{path}: cannot use WAL mode (a network file system?)")
        db.execute(f"PRAGMA synchronous={synchronous}")
        # connect() set secure_delete=FAST: deleted records are zeroed where that costs no extra
        # I/O (captured inputs may be personal data), but freed pages are not rewritten, so an
        # eviction or an ack stays small in the WAL, which the budget relies on.
        epoch, pre_epoch = migrate(db, path)
        incremental = db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        sizing = plan(limits, db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA wal_autocheckpoint={sizing.wal_pages}")
        # After a checkpoint the WAL restarts from its beginning; this truncates it back to its
        # budgeted size if a long reader ever made it grow past it.
        db.execute(f"PRAGMA journal_size_limit={sizing.wal_max}")
        used_pages(db)  # reads page 1: a file that is not a database fails here, not later
    except BaseException:
        db.close()
        raise
    return Opened(db, sizing, incremental, epoch, pre_epoch)


def migrate(db: sqlite3.Connection, path: Path) -> tuple[str, bool]:
    """Bring the file to SCHEMA_VERSION; returns its epoch, and whether it predates epochs."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BufferUnavailable(
                f"{path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}",
                "a newer agent wrote it: upgrade the agent again, or move the file away to start empty",
            )
        for i in range(version, SCHEMA_VERSION):
            for stmt in MIGRATIONS[i]:
                db.execute(stmt)
        # In the migration's transaction: a new file never exists without its epoch. INSERT OR IGNORE
        # keeps the one a file has (and gives one to a file whose row was lost).
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (new_epoch(),))
        if 0 < version < EPOCH_VERSION:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('pre_epoch', '1')")
        epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        pre_epoch = db.execute("SELECT 1 FROM meta WHERE key = 'pre_epoch'").fetchone() is not None
        # user_version lives in the file header, so it commits (or not) with the migration.
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    if version < SCHEMA_VERSION:
        log.info("buffer.migrated", path=str(path), from_version=version, to_version=SCHEMA_VERSION)
    return str(epoch), pre_epoch
