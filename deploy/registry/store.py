"""The registry's file: the connection, its write transactions, and what every part of it shares."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from deploy.registry.migrate import MIGRATIONS, migrate, schema_version

#: Deployment states in which a deployment still owns its devices (docs/control-plane.md).
LIVE_STATES = ("running", "paused", "rolling_back")


def now() -> float:
    return time.time()


def dump(value: Any) -> str:
    """JSON as stored: sorted and compact, so equal documents are equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def load(text: str | None, default: Any = None) -> Any:
    return json.loads(text) if text else default


def tag_filter(column: str, tags: Mapping[str, str]) -> tuple[str, list[Any]]:
    """A WHERE clause matching every tag; the key is quoted so a '.' in it is not a JSON path step."""
    clauses, params = [], []
    for k, v in tags.items():
        clauses.append(f"json_extract({column}, ?) = ?")
        params += ["$." + json.dumps(k), v]
    return " AND ".join(clauses), params


class Store:
    """One SQLite file on WAL, its schema brought up to date when opened (migrate.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        try:
            migrate(conn, MIGRATIONS, where=f"the registry {path}")
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction (BEGIN IMMEDIATE: two edge-deploy processes never interleave)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield self.db
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return schema_version(self.db.conn)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, list(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def _insert(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows that all have the same columns; plain SQL, so it reads the same on PostgreSQL."""
        if not rows:
            return
        cols = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self.db.conn.executemany(sql, [[r[c] for c in cols] for r in rows])

    def _next_id(self, table: str) -> int:
        """The id of a new row, assigned here rather than by the database: no AUTOINCREMENT, serial or
        rowid to port. Call it inside the write transaction that inserts the row, which holds the
        file's write lock, so no other process can take the same id."""
        row = self.db.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()
        return int(row[0])
