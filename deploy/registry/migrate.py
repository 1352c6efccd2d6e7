"""The registry's schema: numbered plain-SQL migrations (``migrations/NNNN_name.sql``) and their runner.

Each migration runs in its own write transaction together with the row that records it
in ``schema_migrations``: one that fails leaves the file at the version before it, with nothing of
it written, and two processes opening the same registry never apply one twice.

``PRAGMA user_version`` stays equal to the latest version applied. Registries made before
``schema_migrations`` existed kept their version there only; they are adopted (their versions
recorded, nothing re-run). And an older edge-deploy, which reads only ``user_version``, still
refuses a registry newer than itself.

The SQL files are portable (see 0001's header) and this runner applies them to both databases
(deploy/registry/backend.py). On PostgreSQL there is no ``user_version`` (the ledger alone counts),
and each migration's transaction first takes an advisory lock, so replicas that start together
apply each migration once: the second waits, then finds it recorded.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from deploy.registry.backend import Db, SqliteDb
from edge_core.errors import ControlPlaneError, ErrorCode

FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
LEDGER = "schema_migrations"
# Not a migration itself: the runner reads it to know which migrations to run.
LEDGER_DDL = (
    f"CREATE TABLE {LEDGER} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "applied_at DOUBLE PRECISION NOT NULL)"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def statements(self) -> list[str]:
        """The file's statements, one by one: ``executescript`` would COMMIT the open transaction
        first, so the statements and the row that records them could not be one transaction."""
        out: list[str] = []
        buf = ""
        for line in self.sql.splitlines(keepends=True):
            buf += line
            if sqlite3.complete_statement(buf):
                out.append(buf.strip())
                buf = ""
        if any(line.strip() and not line.strip().startswith("--") for line in buf.splitlines()):
            raise ValueError(f"migration {self.label} ends inside a statement (a missing ';'?)")
        return out


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Versions 1, 2, ... N in order: a gap or a duplicate would make "version N" mean two schemas."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migrations must be numbered 1..{len(migrations)} in order, not {versions}")


def load_migrations(folder: Traversable | None = None) -> tuple[Migration, ...]:
    """The ``NNNN_name.sql`` files of ``folder`` (the package's ``migrations/`` by default)."""
    if folder is None:
        folder = resources.files("deploy.registry") / "migrations"
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = FILE_RE.fullmatch(entry.name)
        if match is None:
            raise ValueError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    check_sequence(found)
    return tuple(found)


#: The schema this edge-deploy writes: version ``len(MIGRATIONS)``.
MIGRATIONS: tuple[Migration, ...] = load_migrations()


def _db(conn: sqlite3.Connection | Db) -> Db:
    return SqliteDb(conn) if isinstance(conn, sqlite3.Connection) else conn


def recorded(conn: sqlite3.Connection | Db) -> list[tuple[int, str, float]]:
    """The ledger's rows (version, name, applied_at), oldest first; none before the ledger exists."""
    db = _db(conn)
    if not db.has_table(LEDGER):
        return []
    rows = db.execute(f"SELECT version, name, applied_at FROM {LEDGER} ORDER BY version").fetchall()
    return [(int(v), str(n), float(t)) for v, n, t in rows]


def schema_version(conn: sqlite3.Connection | Db) -> int:
    db = _db(conn)
    return max([db.user_version(), *(v for v, _, _ in recorded(db))])


def migrate(
    conn: sqlite3.Connection | Db,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    where: str = "the registry",
) -> list[int]:
    """Apply the migrations the database lacks, oldest first, one transaction each; the versions applied.

    ``conn`` must be in autocommit mode (``isolation_level=None`` for sqlite3): the runner opens and
    ends its own transactions. ``where`` names the database in messages ("the registry /srv/registry.db")."""
    if isinstance(conn, sqlite3.Connection) and conn.isolation_level is not None:
        raise ValueError("migrate() needs a connection in autocommit mode, outside a transaction")
    db = _db(conn)
    if db.in_transaction:
        raise ValueError("migrate() needs a connection in autocommit mode, outside a transaction")
    check_sequence(migrations)
    applied: list[int] = []
    while True:
        db.begin()
        try:
            # PostgreSQL: replicas starting together queue here, and each then sees the ledger as
            # the one before it left it (SQLite's BEGIN IMMEDIATE already did the same).
            db.lock(LEDGER)
            version = _step(db, migrations, where)
        except BaseException:
            db.rollback()
            raise
        db.commit()
        if version is None:
            return applied
        applied.append(version)


def _step(db: Db, migrations: Sequence[Migration], where: str) -> int | None:
    """Inside one transaction: adopt a pre-ledger file, then apply the next missing migration."""
    user_version = db.user_version()
    has_ledger = db.has_table(LEDGER)
    # before the ledger, user_version N meant migrations 1..N had run
    done = {v for v, _, _ in recorded(db)} if has_ledger else set(range(1, user_version + 1))
    have = max([user_version, *done])
    if have > len(migrations):
        raise ControlPlaneError(
            ErrorCode.REGISTRY_TOO_NEW,
            f"{where} has schema version {have}; this edge-deploy knows up to {len(migrations)}",
            "upgrade edge-deploy; the registry was written by a newer one",
        )
    now = time.time()
    insert = f"INSERT INTO {LEDGER} (version, name, applied_at) VALUES (?, ?, ?)"
    if not has_ledger:
        db.execute(LEDGER_DDL)
        db.executemany(insert, [(m.version, m.name, now) for m in migrations if m.version in done])
    pending = [m for m in migrations if m.version not in done]
    if not pending:
        return None
    m = pending[0]
    try:
        for statement in m.statements():
            db.execute(statement)
    except db.errors as e:
        e.add_note(f"while applying migration {m.label} to {where}, which stays at version {have}")
        raise
    db.execute(insert, [m.version, m.name, now])
    db.set_user_version(max(done | {m.version}))
    return m.version
