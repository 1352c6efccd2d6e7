"""The agent's durable state: deployments and their transitions, in one SQLite file.

Every transition is committed (WAL, synchronous=FULL) before the work of the next state begins, so
a restart after kill -9 or a power cut finds the state the agent was really in.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_core.clock import now_iso

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    generation     INTEGER PRIMARY KEY,
    deployment_id  TEXT NOT NULL,
    message_sha256 TEXT NOT NULL,
    payload        BLOB NOT NULL,
    keyid          TEXT NOT NULL,
    state          TEXT NOT NULL,
    error_code     TEXT,
    error_message  TEXT,
    error_hint     TEXT,
    recoveries     INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    id          INTEGER PRIMARY KEY,
    generation  INTEGER NOT NULL,
    from_state  TEXT,
    event       TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    error_code  TEXT,
    at          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class DeploymentRow:
    generation: int
    deployment_id: str
    message_sha256: str
    payload: bytes
    keyid: str
    state: str
    error_code: str | None
    error_message: str | None
    error_hint: str | None
    recoveries: int
    created_at: str
    updated_at: str


class StateDB:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA user_version=1")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> DeploymentRow | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return DeploymentRow(*row) if row else None

    _COLS = (
        "generation, deployment_id, message_sha256, payload, keyid, state, error_code, error_message, "
        "error_hint, recoveries, created_at, updated_at"
    )

    def latest(self) -> DeploymentRow | None:
        return self._one(f"SELECT {self._COLS} FROM deployments ORDER BY generation DESC LIMIT 1")

    def get(self, generation: int) -> DeploymentRow | None:
        return self._one(f"SELECT {self._COLS} FROM deployments WHERE generation = ?", (generation,))

    def last_generation(self) -> int:
        with self._lock:
            (g,) = self._db.execute("SELECT COALESCE(MAX(generation), 0) FROM deployments").fetchone()
        return int(g)

    def last_active_with_digest(self, digest: str) -> DeploymentRow | None:
        """The newest deployment that activated this image (what the status calls 'active')."""
        return self._one(
            f"SELECT {self._COLS} FROM deployments WHERE state = 'active' "
            "AND json_extract(payload, '$.image.sha256') = ? ORDER BY generation DESC LIMIT 1",
            (digest,),
        )

    def insert(
        self, generation: int, deployment_id: str, message_sha256: str, payload: bytes, keyid: str, state: str
    ) -> None:
        at = now_iso()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO deployments (generation, deployment_id, message_sha256, payload, keyid, state, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (generation, deployment_id, message_sha256, payload, keyid, state, at, at),
            )
            self._db.execute(
                "INSERT INTO transitions (generation, from_state, event, to_state, at) "
                "VALUES (?, NULL, ?, ?, ?)",
                (generation, "accepted", state, at),
            )
            self._db.execute("COMMIT")

    def transition(
        self, generation: int, from_state: str, event: str, to_state: str, error: dict[str, str] | None = None
    ) -> None:
        at = now_iso()
        code = error["code"] if error else None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "UPDATE deployments SET state = ?, error_code = ?, error_message = ?, error_hint = ?, "
                "updated_at = ? WHERE generation = ? AND state = ?",
                (
                    to_state,
                    code,
                    error and error["message"],
                    error and error.get("hint"),
                    at,
                    generation,
                    from_state,
                ),
            )
            if cur.rowcount != 1:
                self._db.execute("ROLLBACK")
                raise RuntimeError(f"deployment {generation} is not in state {from_state}")
            self._db.execute(
                "INSERT INTO transitions (generation, from_state, event, to_state, error_code, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (generation, from_state, event, to_state, code, at),
            )
            self._db.execute("COMMIT")

    def count_recovery(self, generation: int) -> int:
        with self._lock:
            self._db.execute(
                "UPDATE deployments SET recoveries = recoveries + 1 WHERE generation = ?", (generation,)
            )
            (n,) = self._db.execute(
                "SELECT recoveries FROM deployments WHERE generation = ?", (generation,)
            ).fetchone()
        return int(n)

    def history(self, generation: int) -> list[tuple[str | None, str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT from_state, event, to_state FROM transitions WHERE generation = ? ORDER BY id",
                (generation,),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def get_meta(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None
