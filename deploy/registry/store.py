"""The registry's database: the connection, its write transactions, and what every part of it shares."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.registry.backend import Db, connect, redact
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


def tag_filter(db: Db, column: str, tags: Mapping[str, str]) -> tuple[str, list[Any]]:
    """A WHERE clause matching every tag (each key one top-level field of the JSON in ``column``)."""
    clauses, params = [], []
    for k, v in tags.items():
        clauses.append(f"{db.json_field(column)} = ?")
        params += [db.json_key(k), v]
    return " AND ".join(clauses), params


class Store:
    """One database (a SQLite file on WAL, or PostgreSQL), its schema brought up to date when opened
    (migrate.py). ``location`` is a path or a ``postgresql://`` URL (backend.py)."""

    def __init__(self, location: Path | str) -> None:
        self.location = location
        self.db: Db = connect(location)
        try:
            migrate(self.db, MIGRATIONS, where=f"the registry {redact(location)}")
        except BaseException:
            self.db.close()
            raise

    @property
    def path(self) -> Path | str:
        return self.location

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[Db]:
        """One write transaction. SQLite: BEGIN IMMEDIATE, so two edge-deploy processes never
        interleave. PostgreSQL: READ COMMITTED, with row locks where a read decides a write."""
        db = self.db
        if db.in_transaction:
            yield db
            return
        db.begin()
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        db.commit()

    @property
    def schema_version(self) -> int:
        return schema_version(self.db)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.db.query(sql, params)

    def _insert(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows that all have the same columns; plain SQL, so it reads the same on PostgreSQL."""
        if not rows:
            return
        cols = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self.db.executemany(sql, [[r[c] for c in cols] for r in rows])

    def _next_id(self, table: str) -> int:
        """The id of a new row, assigned here rather than by the database: no AUTOINCREMENT, serial or
        rowid to port. Call it inside the write transaction that inserts the row: on SQLite that holds
        the file's write lock; on PostgreSQL the lock taken here does the same for this table, until
        the transaction ends, so no other replica can take the same id."""
        self.db.lock(f"next_id:{table}")
        row = self.db.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()
        return int(row[0])
