"""``edge-agent doctor``: checks of a device's setup, each with a verdict, a message and a hint.

The checks look at what the agent needs to work, in the order it needs it: its config, its
certificates and trusted keys, the control channel (DNS, TCP, TLS with the client certificate), the
disk, its SQLite files, onnxruntime's execution providers and the scoring API's port. None of them
changes anything the agent owns: databases are opened read-only, the TLS probe sends no MQTT packet
(so it cannot take over the running agent's session), and the port check binds only while no agent
runs. Verdicts and check names are listed in docs/cli.md.

One module per check: :mod:`.config`, :mod:`.certificates`, :mod:`.trust_keys`, :mod:`.channel`,
:mod:`.disk`, :mod:`.state_db`, :mod:`.providers` (the ``onnxruntime`` check) and :mod:`.api_port`;
:mod:`.report` has :class:`Result` and the output. This module runs them in order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.ops import status as status_mod
from agent.ops.doctor.api_port import check_api_port
from agent.ops.doctor.certificates import check_certificates
from agent.ops.doctor.channel import IOTHUB_PORT, check_channel, probe_channel
from agent.ops.doctor.config import check_config
from agent.ops.doctor.disk import check_disk, disk_verdict
from agent.ops.doctor.providers import check_onnxruntime
from agent.ops.doctor.report import Result, Verdict, exit_code, format_human
from agent.ops.doctor.state_db import check_state_dbs
from agent.ops.doctor.trust_keys import check_trust_keys

__all__ = [
    "CHECKS",
    "DEFAULT_TIMEOUT_S",
    "IOTHUB_PORT",
    "Result",
    "Verdict",
    "check_api_port",
    "check_certificates",
    "check_channel",
    "check_config",
    "check_disk",
    "check_onnxruntime",
    "check_state_dbs",
    "check_trust_keys",
    "disk_verdict",
    "exit_code",
    "format_human",
    "probe_channel",
    "run_checks",
]

DEFAULT_TIMEOUT_S = 5.0

CHECKS = ("config", "certificates", "trust-keys", "channel", "disk", "state-db", "onnxruntime", "api-port")


def run_checks(
    config_path: Path | None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> list[Result]:
    env = os.environ if env is None else env
    now = datetime.now(UTC) if now is None else now
    cfg, first = check_config(config_path, env)
    if cfg is None:
        return [first]  # every other check reads the config: they would only repeat its failure
    agent: dict[str, Any] = {"running": False, "run": None}
    with contextlib.suppress(OSError):  # an unreadable state_dir is the disk check's to report
        if cfg.state_dir.is_dir():
            agent = status_mod.read_agent(cfg.state_dir)
    # The lambdas look the checks up in this package's namespace when they run, so that replacing one
    # here (monkeypatch.setattr(doctor, "check_disk", ...)) replaces it in the run.
    steps: list[tuple[str, Callable[[], list[Result]]]] = [
        ("certificates", lambda: check_certificates(cfg, now)),
        ("trust-keys", lambda: check_trust_keys(cfg)),
        ("channel", lambda: check_channel(cfg, timeout)),
        ("disk", lambda: check_disk(cfg)),
        ("state-db", lambda: check_state_dbs(cfg)),
        ("onnxruntime", lambda: check_onnxruntime(cfg)),
        ("api-port", lambda: check_api_port(cfg, agent)),
    ]
    results = [first]
    for name, step in steps:
        try:
            results += step()
        except Exception as exc:  # a check that breaks must not hide the others' verdicts
            results.append(
                Result(
                    name,
                    "fail",
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a bug",
                )
            )
    return results
