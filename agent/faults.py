"""Crash points for fault-injection tests: ``EDGE_AGENT_CRASH_AT=<point>`` makes the agent SIGKILL
itself when it reaches that point, exactly as a power cut or the OOM killer would.

Points are named after the deployer's states (``state:<name>``, reached right after the transition
into that state was persisted) plus a few inside activation and install. The variable is read once
at import; with it unset, :func:`point` is a single comparison.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGE_AGENT_CRASH_AT"
_target = os.environ.get(ENV, "")


def point(name: str) -> None:
    if _target and _target == name:
        os.kill(os.getpid(), signal.SIGKILL)
