"""``edge-agent status``: what the agent on this device runs and reports, read from its state directory.

Nothing here writes: the SQLite files are opened read-only (``mode=ro``; they are in WAL mode, so a
reader neither blocks the running agent nor is blocked by it), and ``run.json`` is only read. So the
command is safe to run at any moment, by an operator or a monitoring script, beside a live agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil

from agent.ops import runinfo
from agent.telemetry import buffer
from edge_core.errors import StatusUnavailable

#: run.json not rewritten for this long (the daemon rewrites it at least every 15 s) means the process that
#: wrote it is wedged, or the pid now belongs to another process: either way, no agent is running.
STALE_AFTER_S = 60.0
#: A process created this long after run.json's started_at cannot be the one that wrote it.
_PID_REUSE_SLACK_S = 5.0

T = TypeVar("T")

EXIT_RUNNING = 0
EXIT_UNREADABLE = 2
EXIT_NOT_RUNNING = 3


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def owner_of(path: Path) -> str | None:
    """The user owning ``path`` (or its nearest existing parent), by name; None when unknown."""
    for p in (path, *path.parents):
        try:
            uid = p.stat().st_uid
        except OSError:
            continue
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"
    return None


def run_as_hint(path: Path, command: str = "status") -> str:
    owner = owner_of(path)
    if owner and owner != current_user():
        return f"run it as {owner}, who owns {path}: sudo -u {owner} edge-agent {command} ..."
    return f"check the permissions of {path} (you are {current_user()})"


def epoch(value: Any) -> float | None:
    """A run.json or database timestamp (ISO 8601, or seconds since the epoch) in seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
    return None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pid_alive(pid: int, started_at: float | None = None) -> tuple[bool, str]:
    """Whether ``pid`` is a live process that can have started at ``started_at``, and why not."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, f"pid {pid} has exited (a zombie not yet reaped by its parent)"
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return False, f"pid {pid} is not running"
    except psutil.AccessDenied:
        return True, ""  # another user's process: it exists, which is all we can tell
    if started_at is not None and created > started_at + _PID_REUSE_SLACK_S:
        return False, f"pid {pid} now belongs to a process started after the agent wrote run.json"
    return True, ""


def read_agent(state_dir: Path, now: float | None = None) -> dict[str, Any]:
    """run.json and whether its writer is alive: ``running``, and ``reason`` when it is not."""
    now = time.time() if now is None else now
    doc = runinfo.read(state_dir)
    if doc is None:
        why = "no run.json" if not (state_dir / runinfo.FILENAME).exists() else "run.json is unreadable"
        return {"running": False, "reason": f"{why}: the agent is not running", "run": None}
    pid = doc.get("pid")
    updated = epoch(doc.get("updated_at"))
    out: dict[str, Any] = {"running": False, "reason": None, "run": doc}
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        out["reason"] = f"run.json names no pid ({pid!r})"
        return out
    alive, why = pid_alive(pid, epoch(doc.get("started_at")))
    if not alive:
        out["reason"] = f"stale run.json: {why}"
    elif updated is not None and now - updated > STALE_AFTER_S:
        out["reason"] = (
            f"stale run.json: pid {pid} is alive but has not updated it for {now - updated:.0f} s "
            "(the agent is wedged, or the pid was reused)"
        )
    else:
        out["running"] = True
    return out


@contextlib.contextmanager
def open_ro(path: Path, *, immutable: bool = False) -> Iterator[sqlite3.Connection]:
    """A read-only connection; ``immutable``: without locks and without the -shm file."""
    uri = path.absolute().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=2.0)
    try:
        db.execute("PRAGMA query_only=1")
        yield db
    finally:
        db.close()


def read_db(path: Path, reader: Callable[[sqlite3.Connection], T]) -> T:
    """``reader`` on a read-only view of the SQLite file ``path``, leaving no trace beside it.

    A ``mode=ro`` connection to a WAL database creates the -wal and -shm files when they are missing,
    and cannot delete them again: files owned by whoever ran this command, which an agent running as
    another user could then not open. So ``mode=ro`` is used only where both exist (an agent has the
    file open, or was killed); a file without -wal (closed cleanly) holds every transaction itself
    and is read ``immutable``; one with a -wal but no -shm is read from a private copy of both.
    """
    wal = path.with_name(path.name + "-wal")
    shm = path.with_name(path.name + "-shm")
    if wal.exists() and shm.exists():
        with open_ro(path) as db:
            return reader(db)
    if not wal.exists():
        with open_ro(path, immutable=True) as db:
            return reader(db)
    with tempfile.TemporaryDirectory(prefix="edge-agent-status-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        with open_ro(copy) as db:
            return reader(db)


def _state(db: sqlite3.Connection, store: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"active": None, "deployment": None, "rejected": None, "sync": {}}
    db.execute("BEGIN")  # one snapshot for every query
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "deployments" not in tables:
            return out
        active = _active_digest(store)
        if active is not None:
            out["active"] = {"sha256": active}
            row = db.execute(
                "SELECT generation, deployment_id, payload, updated_at FROM deployments "
                "WHERE state = 'active' AND json_extract(payload, '$.image.sha256') = ? "
                "ORDER BY generation DESC LIMIT 1",
                (active,),
            ).fetchone()
            if row:
                since = db.execute(
                    "SELECT at FROM transitions WHERE generation = ? AND to_state = 'active' "
                    "ORDER BY id DESC LIMIT 1",
                    (row[0],),
                ).fetchone()
                image = _image(row[2])
                out["active"].update(
                    name=image.get("name"),
                    version=image.get("version"),
                    generation=row[0],
                    deployment_id=row[1],
                    since=since[0] if since else row[3],
                )
        row = db.execute(
            "SELECT generation, deployment_id, payload, state, error_code, error_message, error_hint, "
            "recoveries, created_at, updated_at FROM deployments ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        if row:
            image = _image(row[2])
            out["deployment"] = {
                "generation": row[0],
                "deployment_id": row[1],
                "image": {"name": image.get("name"), "version": image.get("version")},
                "state": row[3],
                "error": {"code": row[4], "message": row[5] or "", "hint": row[6] or ""} if row[4] else None,
                "recoveries": row[7],
                "created_at": row[8],
                "updated_at": row[9],
            }
        if "meta" in tables:
            for key, value in db.execute(
                "SELECT key, value FROM meta WHERE key = 'rejected' OR key LIKE 'sync.intent.%'"
            ):
                try:
                    doc = json.loads(value)
                except ValueError:
                    continue
                if doc is None:
                    continue
                if key == "rejected" and isinstance(doc, dict):
                    out["rejected"] = {
                        k: doc.get(k) for k in ("code", "message", "hint", "at", "message_sha256")
                    }
                elif key.startswith("sync.intent.") and isinstance(doc, dict):
                    # the uploader records a batch before it uploads it and clears it once stored
                    out["sync"][key.removeprefix("sync.intent.")] = doc
    finally:
        db.execute("COMMIT")
    return out


def _image(payload: bytes | str) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except ValueError:
        return {}
    image = doc.get("image") if isinstance(doc, dict) else None
    return image if isinstance(image, dict) else {}


def _active_digest(store: Path) -> str | None:
    """The ``current`` symlink's image, as agent/update/store.py reads it: the truth about what is active."""
    try:
        digest = Path(os.readlink(store / "current")).name
    except OSError:
        return None
    return digest if (store / "images" / digest).is_dir() else None


def _buffer(db: sqlite3.Connection, path: Path) -> dict[str, Any]:
    classes = {
        cls: {
            "records": c["records"],
            "bytes": c["bytes"],
            "oldest": _iso(c["oldest_ts"]) if c["oldest_ts"] is not None else None,
            "uploaded": c["acked"],
        }
        for cls, c in buffer.class_counts(db).items()
    }
    dropped: dict[str, dict[str, dict[str, int]]] = {}
    # The buffer keeps its drop counters in memory and writes them here: what a stopped agent left.
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dropped'").fetchone():
        for cls, reason, records, nbytes in db.execute(
            "SELECT cls, reason, records, bytes FROM dropped ORDER BY cls, reason"
        ):
            dropped.setdefault(cls, {})[reason] = {"records": records, "bytes": nbytes}
    size = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            size += os.stat(f"{path}{suffix}").st_size
    return {"classes": classes, "dropped": dropped, "size_bytes": size}


def _check_dir(state_dir: Path) -> None:
    try:
        exists = state_dir.is_dir()
    except PermissionError:
        exists = True  # a parent is not searchable: reported below, with whom to run as
    if not exists and not os.path.lexists(state_dir):
        raise StatusUnavailable(
            f"state directory {state_dir} does not exist",
            "check state_dir in the config (the agent creates it when it first starts)",
        )
    if not exists:
        raise StatusUnavailable(f"state_dir {state_dir} is not a directory", "fix state_dir in the config")
    try:
        os.listdir(state_dir)
    except OSError as exc:
        raise StatusUnavailable(
            f"cannot read state directory {state_dir} as {current_user()}: {exc.strerror}",
            run_as_hint(state_dir),
        ) from None


def read_status(state_dir: Path, now: float | None = None) -> dict[str, Any]:
    """Everything ``edge-agent status`` shows, as one JSON-able document. Raises StatusUnavailable."""
    _check_dir(state_dir)
    agent = read_agent(state_dir, now)
    doc: dict[str, Any] = {
        "state_dir": str(state_dir),
        "agent": agent,
        "active": None,
        "deployment": None,
        "rejected": None,
        "buffer": None,
        "sync": {"pending": {}},
    }
    store = state_dir / "store"
    db_path = state_dir / "agent.db"
    if db_path.exists():
        try:
            state = read_db(db_path, lambda db: _state(db, store))
        except sqlite3.Error as exc:
            hint = (
                run_as_hint(db_path)
                if not os.access(db_path, os.R_OK)
                else "the file may be damaged: `edge-agent doctor` checks it (state-db)"
            )
            raise StatusUnavailable(f"cannot read {db_path} as {current_user()}: {exc}", hint) from None
        for key in ("active", "deployment", "rejected"):
            doc[key] = state[key]
        doc["sync"]["pending"] = state["sync"]
    else:
        digest = _active_digest(store)
        doc["active"] = {"sha256": digest} if digest else None
    tel = state_dir / "telemetry.db"
    if tel.exists():
        try:
            doc["buffer"] = read_db(tel, lambda db: _buffer(db, tel))
        except sqlite3.Error as exc:
            # the buffer is secondary: the agent quarantines a damaged one itself (docs/buffer.md)
            doc["buffer"] = {"error": f"cannot read {tel}: {exc}"}
    return doc


def exit_code(doc: dict[str, Any]) -> int:
    return EXIT_RUNNING if doc["agent"]["running"] else EXIT_NOT_RUNNING


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def format_human(doc: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [("state_dir", doc["state_dir"])]
    agent = doc["agent"]
    run = agent.get("run") or {}
    if agent["running"]:
        bits = [f"running, pid {run.get('pid')}"]
        if run.get("version"):
            bits.append(f"version {run['version']}")
        bits.append("ready" if run.get("ready") else "starting (not ready yet)")
        if run.get("started_at"):
            bits.append(f"since {run['started_at']}")
        rows.append(("agent", ", ".join(bits)))
    else:
        rows.append(("agent", f"not running ({agent['reason']})"))
    if run.get("status"):
        rows.append(("status", str(run["status"]) + ("" if agent["running"] else " (last seen)")))
    channel = run.get("channel")
    if isinstance(channel, dict):
        state = "connected" if channel.get("connected") else "not connected"
        line = f"{channel.get('transport')} {channel.get('endpoint')}, {state}"
        if channel.get("last_error"):
            line += f" (last error: {channel['last_error']})"
        rows.append(("channel", line))
    if run.get("api"):
        rows.append(("api", str(run["api"])))
    active = doc["active"]
    if active is None:
        rows.append(("image", "none active"))
    elif active.get("name") is not None:
        rows.append(
            (
                "image",
                f"{active['name']}:{active['version']}, generation {active['generation']}, deployment "
                f"{active['deployment_id']}, since {active['since']} (sha256 {active['sha256'][:12]})",
            )
        )
    else:
        rows.append(("image", f"sha256 {active['sha256'][:12]} (no deployment record names it)"))
    dep = doc["deployment"]
    if dep is not None:
        img = dep["image"]
        rows.append(
            (
                "deployment",
                f"generation {dep['generation']} ({dep['deployment_id']}, {img['name']}:{img['version']}): "
                f"{dep['state']} at {dep['updated_at']}",
            )
        )
        if dep["error"]:
            rows.append(("error", f"{dep['error']['code']}: {dep['error']['message']}"))
            if dep["error"]["hint"]:
                rows.append(("hint", dep["error"]["hint"]))
    rej = doc["rejected"]
    if rej is not None:
        rows.append(("rejected", f"{rej['code']}: {rej['message']} (at {rej['at']})"))
        if rej.get("hint"):
            rows.append(("hint", str(rej["hint"])))
    buf = doc["buffer"]
    if buf is not None and "error" in buf:
        rows.append(("buffer", buf["error"]))
    elif buf is not None:
        parts = [f"{c} {v['records']} ({_size(v['bytes'])})" for c, v in buf["classes"].items()]
        rows.append(("buffer", ", ".join(parts) + f"; {_size(buf['size_bytes'])} on disk"))
        up = [
            f"{c} {v['uploaded']['records']}" for c, v in buf["classes"].items() if v["uploaded"]["records"]
        ]
        rows.append(("uploaded", ", ".join(up) if up else "nothing yet"))
        drops = [
            f"{c} {n['records']} ({reason})" for c, by in buf["dropped"].items() for reason, n in by.items()
        ]
        rows.append(("dropped", ", ".join(drops) if drops else "none"))
    for cls, intent in doc["sync"]["pending"].items():
        rows.append(
            (
                "uploading",
                f"{cls} records {intent.get('first')}-{intent.get('last')} as {intent.get('name')} "
                "(retried until stored)",
            )
        )
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)
