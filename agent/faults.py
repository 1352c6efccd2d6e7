"""Fault points for fault-injection tests, named after what happens there.

``EDGE_FAULT_CRASH_AT=<point>`` makes the agent SIGKILL itself when it reaches that point, exactly
as a power cut or the OOM killer would. ``EDGE_FAULT_FAIL_AT=<point>`` raises an I/O error there
instead, once per process, as a transient disk error would.

Points are the deployer's states (``state:<name>``, reached right after the transition into that
state was persisted and reported) and a few steps inside install and activation
(``installing.before_rename``, ``activating.before_switch``, ``activating.after_switch``). The
variables are read once at import; unset, :func:`point` is a single comparison. (They are not
``EDGE_AGENT_*``: that prefix is the agent's configuration.)
"""

from __future__ import annotations

import errno
import os
import signal

CRASH_ENV = "EDGE_FAULT_CRASH_AT"
FAIL_ENV = "EDGE_FAULT_FAIL_AT"
_crash = os.environ.get(CRASH_ENV, "")
_fail = os.environ.get(FAIL_ENV, "")


def point(name: str) -> None:
    global _fail
    if _crash == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if _fail == name:
        _fail = ""
        raise OSError(errno.EIO, f"injected I/O error at {name}")
