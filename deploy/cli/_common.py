"""What every command group shares: exit codes, output (JSON or a table), progress lines, errors."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from deploy import config
from deploy.artifacts import Progress
from deploy.plane import ControlPlane
from deploy.registry import parse_ref
from edge_core.errors import ControlPlaneError, ErrorCode

if TYPE_CHECKING:
    # Not subscriptable at run time, so the alias exists for the type checker only.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HELD, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


def listing(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def home_of(args: argparse.Namespace) -> Path:
    """The control plane's home as ``config.load`` resolves it (--home, $EDGE_DEPLOY_HOME, default)."""
    return config.load(args.home).home


def open_plane(args: argparse.Namespace) -> ControlPlane:
    cfg = config.load(args.home)
    if not cfg.home.is_dir():
        # Opening the registry would create one here, in whatever directory the command ran in.
        raise ControlPlaneError(
            ErrorCode.HOME_MISSING,
            f"{cfg.home.absolute()} is no control-plane home (it does not exist)",
            "create one with `edge-deploy init` (or `edge-deploy pki init`), or pass --home / set "
            "EDGE_DEPLOY_HOME to an existing one",
        )
    return ControlPlane(cfg)


def fail(err: dict[str, str]) -> None:
    hint = f"\n  hint: {err['hint']}" if err.get("hint") else ""
    print(f"edge-deploy: {err['code']}: {err['message']}{hint}", file=sys.stderr)


def out(args: argparse.Namespace, doc: Any, columns: list[str] | None = None) -> None:
    """One JSON document with --json, or for a command that has no table; else a table."""
    if getattr(args, "json", False) or columns is None:
        print(
            json.dumps(doc, indent=None if getattr(args, "json", False) else 2, sort_keys=True, default=str)
        )
        return
    rows = doc if isinstance(doc, list) else [doc]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in sorted(v.items())) or "-"
    if isinstance(v, list | tuple):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, float) and v > 1e9:
        return datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


class ProgressLine:
    """One line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, text: str) -> None:
        if self.tty and text != self.last:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
            self.last = text

    def done(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")


def upload_progress() -> tuple[ProgressLine, Progress]:
    line = ProgressLine()

    def show(name: str, sent: int, total: int) -> None:
        line(f"uploading {name} {bar(sent, total)} {sent / 2**20:.1f}/{total / 2**20:.1f} MiB")

    return line, show


def bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def versioned(ref: str, what: str) -> tuple[str, int]:
    name, version = parse_ref(ref, what)
    if version is None:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"deleting needs an exact version: {what} {ref}:<version>",
            f"see `edge-deploy {what} list --name {name}`",
        )
    return name, version
