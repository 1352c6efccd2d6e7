"""The registry's schema: numbered plain-SQL migrations (``migrations/NNNN_name.sql``) and their runner.

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the row that records it
in ``schema_migrations``: one that fails leaves the file at the version before it, with nothing of
it written, and two processes opening the same registry never apply one twice.

``PRAGMA user_version`` stays equal to the latest version applied. Registries made before
``schema_migrations`` existed kept their version there only; they are adopted (their versions
recorded, nothing re-run). And an older edge-deploy, which reads only ``user_version``, still
refuses a registry newer than itself.

The SQL files are portable (see 0001's header); this runner is SQLite's: a PostgreSQL one would
keep the ledger and drop the pragma.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

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


def _has_ledger(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [LEDGER]).fetchone()
    return row is not None


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def recorded(conn: sqlite3.Connection) -> list[tuple[int, str, float]]:
    """The ledger's rows (version, name, applied_at), oldest first; none before the ledger exists."""
    if not _has_ledger(conn):
        return []
    rows = conn.execute(f"SELECT version, name, applied_at FROM {LEDGER} ORDER BY version").fetchall()
    return [(int(v), str(n), float(t)) for v, n, t in rows]


def schema_version(conn: sqlite3.Connection) -> int:
    return max([_user_version(conn), *(v for v, _, _ in recorded(conn))])


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS, *, where: str = "the registry"
) -> list[int]:
    """Apply the migrations the file lacks, oldest first, one transaction each; the versions applied.

    ``conn`` must be in autocommit mode (``isolation_level=None``): the runner opens and ends its
    own transactions. ``where`` names the file in messages ("the registry /srv/registry.db")."""
    if conn.isolation_level is not None or conn.in_transaction:
        raise ValueError("migrate() needs a connection in autocommit mode, outside a transaction")
    check_sequence(migrations)
    applied: list[int] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _step(conn, migrations, where)
        except BaseException:
            # some errors (a full disk) end the transaction inside SQLite already
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if version is None:
            return applied
        applied.append(version)


def _step(conn: sqlite3.Connection, migrations: Sequence[Migration], where: str) -> int | None:
    """Inside one transaction: adopt a pre-ledger file, then apply the next missing migration."""
    user_version = _user_version(conn)
    has_ledger = _has_ledger(conn)
    # before the ledger, user_version N meant migrations 1..N had run
    done = {v for v, _, _ in recorded(conn)} if has_ledger else set(range(1, user_version + 1))
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
        conn.execute(LEDGER_DDL)
        conn.executemany(insert, [(m.version, m.name, now) for m in migrations if m.version in done])
    pending = [m for m in migrations if m.version not in done]
    if not pending:
        return None
    m = pending[0]
    try:
        for statement in m.statements():
            conn.execute(statement)
    except sqlite3.Error as e:
        e.add_note(f"while applying migration {m.label} to {where}, which stays at version {have}")
        raise
    conn.execute(insert, [m.version, m.name, now])
    # an int, not a parameter: PRAGMA takes none
    conn.execute(f"PRAGMA user_version = {max(done | {m.version})}")
    return m.version
