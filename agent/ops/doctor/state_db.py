"""The ``state-db`` check: agent.db and telemetry.db pass SQLite's quick_check, opened read-only so the
running agent is not disturbed, and telemetry.db's schema is one this agent can use."""

from __future__ import annotations

import os
import sqlite3

from agent.config import AgentConfig
from agent.ops import status as status_mod
from agent.ops.doctor.report import Result, size_text

_DAMAGED_HINT = {
    "agent.db": "stop the agent and restore agent.db from a backup; moving it aside makes the device forget "
    "its deployment history and accept any generation (the active image keeps serving from store/current)",
    "telemetry.db": "restart the agent: it moves a damaged telemetry.db aside (log buffer.quarantined) and "
    "starts an empty one; the records not yet uploaded are lost",
}


def check_state_dbs(cfg: AgentConfig) -> list[Result]:
    results = []
    for name in ("agent.db", "telemetry.db"):
        path = cfg.state_dir / name
        try:
            present = path.exists()
        except OSError:
            present = True  # not reachable: opening it below says so, and as whom to run
        if not present:
            results.append(Result("state-db", "ok", f"{name} does not exist yet (the agent creates it)"))
            continue

        def quick_check(db: sqlite3.Connection) -> tuple[list[str], int]:
            rows = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
            return rows, int(db.execute("PRAGMA user_version").fetchone()[0])

        try:
            rows, version = status_mod.read_db(path, quick_check)
        except Exception as exc:  # sqlite3.Error, or OSError from a vanished file
            if not os.access(path, os.R_OK):
                results.append(
                    Result(
                        "state-db",
                        "fail",
                        f"cannot open {path} read-only as {status_mod.current_user()}: {exc}",
                        status_mod.run_as_hint(path, "doctor"),
                    )
                )
            else:
                results.append(
                    Result(
                        "state-db",
                        "fail",
                        f"{path} is not a readable SQLite database: {exc}",
                        _DAMAGED_HINT[name],
                    )
                )
            continue
        if rows != ["ok"]:
            results.append(
                Result(
                    "state-db",
                    "fail",
                    f"{path}: quick_check found {len(rows)} problem(s), the first: {rows[0]}",
                    _DAMAGED_HINT[name],
                )
            )
            continue
        if name == "telemetry.db":
            from agent.telemetry.buffer import SCHEMA_VERSION

            if version > SCHEMA_VERSION:
                results.append(
                    Result(
                        "state-db",
                        "warn",
                        f"{path}: schema version {version} is newer than this agent's ({SCHEMA_VERSION}): "
                        "a newer agent wrote it, this one will not use it (buffer_unavailable)",
                        "upgrade the agent again, or move the file away (its records are lost to the upload)",
                    )
                )
                continue
        results.append(Result("state-db", "ok", f"{name}: quick_check ok ({size_text(path.stat().st_size)})"))
    return results
