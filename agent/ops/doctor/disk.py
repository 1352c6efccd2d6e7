"""The ``disk`` check: state_dir is a writable directory and its file system has room for a deployment
beside the agent's disk margin."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from agent.config import AgentConfig
from agent.ops import status as status_mod
from agent.ops.doctor.report import Result, Verdict, size_text


def disk_verdict(free_bytes: int, margin_bytes: int) -> Verdict:
    """fail below download.disk_margin (no deployment can pass the agent's space check), warn below
    twice the margin (only small bundles can), ok above."""
    if free_bytes < margin_bytes:
        return "fail"
    if free_bytes < 2 * margin_bytes:
        return "warn"
    return "ok"


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if p.is_dir():
                return p
    return Path("/")


def check_disk(cfg: AgentConfig) -> list[Result]:
    sd = cfg.state_dir
    results: list[Result] = []
    try:
        is_dir = sd.is_dir()
    except OSError:
        is_dir = True  # a parent is not searchable: the write test below says so, and as whom to run
    if not is_dir and os.path.lexists(sd):
        results.append(Result("disk", "fail", f"state_dir {sd} is not a directory", "fix state_dir"))
    elif not is_dir:
        results.append(
            Result(
                "disk",
                "warn",
                f"state_dir {sd} does not exist: the agent creates it when it first starts",
                "start the agent once, or check state_dir in the config",
            )
        )
    else:
        try:
            fd, tmp = tempfile.mkstemp(dir=sd, prefix=".doctor-")
        except OSError as exc:
            hint = (
                "the file system is mounted read-only: remount it read-write"
                if exc.errno == errno.EROFS
                else status_mod.run_as_hint(sd, "doctor")
            )
            results.append(
                Result(
                    "disk",
                    "fail",
                    f"state_dir {sd} is not writable by {status_mod.current_user()}: {exc.strerror}",
                    hint,
                )
            )
        else:
            os.close(fd)
            os.unlink(tmp)
    where = _existing(sd)
    free = shutil.disk_usage(where).free
    margin = cfg.download.disk_margin
    verdict = disk_verdict(free, margin)
    # the deployer wants room for the bundle and its unpacked copy on top of the margin
    largest = max(free - margin, 0) // 2
    msg = f"{size_text(free)} free on {where} (download.disk_margin {size_text(margin)})"
    if verdict == "fail":
        results.append(
            Result(
                "disk",
                "fail",
                msg + ": below the margin, every deployment fails with insufficient_disk",
                "free space on that file system, or lower download.disk_margin",
            )
        )
    elif verdict == "warn":
        results.append(
            Result(
                "disk",
                "warn",
                msg + f": below twice the margin, bundles over {size_text(largest)} cannot be installed",
                "free space on that file system, or lower download.disk_margin",
            )
        )
    else:
        results.append(Result("disk", "ok", msg + f"; bundles up to {size_text(largest)} fit"))
    return results
