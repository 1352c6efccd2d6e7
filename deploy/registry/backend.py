"""The registry's two databases, behind one small interface: SQLite (a file, the default) and
PostgreSQL (``postgresql://...``, for several control-plane replicas on one database).

Everything that differs between them is here and nowhere else: the parameter style (the registry's
SQL is written with ``?``; PostgreSQL's driver wants ``%s``), how a write transaction starts,
reading a field of a JSON document, row locks, the lock that serialises ids handed out as
``MAX(id) + 1``, and what the migration runner needs to know about the schema.

Both connections run in autocommit mode and the registry opens its own transactions with
``begin()``: on SQLite ``BEGIN IMMEDIATE`` takes the file's write lock at once, so two processes
never interleave; on PostgreSQL a plain ``BEGIN`` (READ COMMITTED) and, where a read decides a write,
a row lock (``SELECT ... FOR UPDATE``, :attr:`Db.for_update`) or an advisory lock
(:meth:`Db.lock`).
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import psycopg


class Cursor(Protocol):
    """What both drivers' cursors give the registry."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redact(location: str | Path) -> str:
    """The location for logs and messages: a URL's password left out."""
    text = str(location)
    if not is_postgres_url(text):
        return text
    scheme, _, rest = text.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return text
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else text


class Db:
    """One connection, in autocommit mode; the registry brackets its writes with begin/commit."""

    kind: str
    #: the errors of this driver (a failed statement), for notes and retries
    errors: tuple[type[BaseException], ...]
    #: appended to a SELECT whose rows the transaction goes on to update
    for_update: str = ""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        raise NotImplementedError

    def lock(self, name: str) -> None:
        """Hold ``name`` until the transaction ends, against every other connection. SQLite's
        ``BEGIN IMMEDIATE`` already serialises all writers, so this is PostgreSQL's only."""

    def json_field(self, column: str) -> str:
        """SQL for the text of one top-level field of the JSON in ``column``; its one ``?`` takes
        :meth:`json_key` of the field's name."""
        raise NotImplementedError

    def json_key(self, key: str) -> str:
        raise NotImplementedError

    def table_names(self) -> list[str]:
        raise NotImplementedError

    # -- for the migration runner --------------------------------------------------------------------

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def user_version(self) -> int:
        """SQLite's ``PRAGMA user_version``: the version of registries made before the ledger."""
        return 0

    def set_user_version(self, version: int) -> None:
        """Kept equal to the ledger on SQLite, so an older edge-deploy still refuses a newer file."""


class SqliteDb(Db):
    kind = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: Path) -> SqliteDb:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return cls(conn)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(sql, list(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, list(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def rollback(self) -> None:
        # some errors (a full disk) end the transaction inside SQLite already
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    def json_field(self, column: str) -> str:
        return f"json_extract({column}, ?)"

    def json_key(self, key: str) -> str:
        # the key quoted, so a '.' in it is not a JSON path step
        return "$." + json.dumps(key)

    def table_names(self) -> list[str]:
        rows = self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [str(r[0]) for r in rows.fetchall()]

    def user_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def set_user_version(self, version: int) -> None:
        # an int, not a parameter: PRAGMA takes none
        self.conn.execute(f"PRAGMA user_version = {int(version)}")


def _pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s``. The registry's SQL has no '?' or '%' in literals;
    a '%' is doubled all the same, so one added later is not read as a placeholder."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresDb(Db):
    kind = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        import psycopg

        self.conn = conn
        self.errors = (psycopg.Error,)

    @classmethod
    def open(cls, url: str) -> PostgresDb:
        try:
            import psycopg
        except ImportError:  # an optional dependency: say which
            from edge_core.errors import ConfigError

            raise ConfigError(
                "registry.url", "a PostgreSQL registry needs psycopg: pip install 'edge-ml[postgres]'"
            ) from None
        return cls(psycopg.connect(url, autocommit=True, connect_timeout=10))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(_pg_sql(sql), list(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), [list(r) for r in rows])

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(_pg_sql(sql), list(params))
        cols = [c.name for c in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.conn.info.transaction_status != TransactionStatus.IDLE

    def begin(self) -> None:
        # READ COMMITTED: a single UPDATE ... WHERE re-checks its condition on the row it waited
        # for (the lease), and a read that decides a write locks its rows (for_update, lock()).
        self.execute("BEGIN")

    def close(self) -> None:
        self.conn.close()

    def lock(self, name: str) -> None:
        # crc32: a stable 32-bit key per name (Python's hash() differs between processes)
        self.execute("SELECT pg_advisory_xact_lock(?)", [zlib.crc32(name.encode())])

    def json_field(self, column: str) -> str:
        # the cast: psycopg sends a str untyped, and ->> has both a text and an int form
        return f"(({column})::jsonb ->> CAST(? AS TEXT))"

    def json_key(self, key: str) -> str:
        return key

    def table_names(self) -> list[str]:
        rows = self.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() ORDER BY table_name"
        )
        return [str(r[0]) for r in rows.fetchall()]


def connect(location: str | Path) -> Db:
    """A PostgreSQL URL, or the path of a SQLite file."""
    if is_postgres_url(location):
        return PostgresDb.open(str(location))
    return SqliteDb.open(Path(location))
