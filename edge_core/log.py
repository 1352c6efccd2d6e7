"""Structured logs: one JSON object per line on stderr (journald keeps them under systemd).

log = get_logger("deployer")
log.info("deployment.state", deployment_id=d, state="downloading")
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_ROOT = "edge"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            doc[key if key not in doc else f"field_{key}"] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class Logger:
    """A thin wrapper so call sites pass fields as keywords, not format strings."""

    def __init__(self, name: str) -> None:
        self._l = logging.getLogger(f"{_ROOT}.{name}")

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._l.isEnabledFor(level):
            self._l.log(level, event, exc_info=exc_info, extra={"fields": fields}, stacklevel=3)

    def debug(self, event: str, /, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, /, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, /, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def setup(level: str = "info") -> None:
    root = logging.getLogger(_ROOT)
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
