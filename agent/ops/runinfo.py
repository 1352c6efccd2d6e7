"""``<state_dir>/run.json``: what the running agent is doing now, for ``edge-agent status``.

The daemon rewrites it (atomically) from its main loop when something in it changed, and at least
every 15 s. Fields::

    pid, version, started_at, updated_at   the process, and when it last wrote this file
    ready                                  READY=1 was sent (connected and serving, or offline too long)
    status                                 the last STATUS= line sent to systemd
    channel                                {"transport", "endpoint", "connected", "last_error"}
    api                                    the scoring API's address, or null

A reader treats a file whose ``pid`` is not alive, or whose ``updated_at`` is old, as stale.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from edge_core.fsutil import atomic_write

FILENAME = "run.json"


def write(state_dir: Path, doc: dict[str, Any]) -> None:
    # Readers see the old file or the new one, never half of one. Not fsynced: it says what the
    # process is doing now, is rewritten every 15 s, and the state directory is often an SD card.
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    atomic_write(state_dir / FILENAME, data, durable=False)


def read(state_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((state_dir / FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def remove(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / FILENAME).unlink()
