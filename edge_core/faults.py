"""Fault points for fault-injection tests, named after what happens there.

``EDGE_FAULT_CRASH_AT=<point>`` makes the agent SIGKILL itself when it reaches that point, exactly
as a power cut or the OOM killer would. ``EDGE_FAULT_FAIL_AT=<point>`` raises an I/O error there
instead, once per process, as a transient disk error would. ``EDGE_FAULT_HANG_AT=<point>[@N]``
blocks the thread that reaches that point (the N-th time, default the first) forever, as a
deadlock or a stuck system call would: the process stays alive and does nothing more there, which
is what systemd's watchdog exists to catch.

Points are the deployer's states (``state:<name>``, reached right after the transition into that
state was persisted and reported), a few steps inside install and activation
(``installing.before_rename``, ``installing.after_rename``, ``activating.before_switch``,
``activating.after_switch``), ``main.tick``, the start of every tick of the daemon's main loop (the
one that sends the watchdog pings), ``api.request``, every request on the scoring API's event loop,
and ``telemetry.loop``, each round of the heartbeat thread, outside its own error guard (a failure
there kills the thread). The variables are read once at import; unset, :func:`point` is a single
comparison. (They are not ``EDGE_AGENT_*``: that prefix is the agent's configuration.)
"""

from __future__ import annotations

import errno
import os
import signal
import threading

CRASH_ENV = "EDGE_FAULT_CRASH_AT"
FAIL_ENV = "EDGE_FAULT_FAIL_AT"
HANG_ENV = "EDGE_FAULT_HANG_AT"
_crash = os.environ.get(CRASH_ENV, "")
_fail = os.environ.get(FAIL_ENV, "")
_hang, _, _hang_nth = os.environ.get(HANG_ENV, "").partition("@")
#: Hits of the hang point still to pass before it blocks.
_hang_skip = max(int(_hang_nth) - 1, 0) if _hang_nth.isdigit() else 0


def point(name: str) -> None:
    global _fail, _hang_skip
    if _crash == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if _fail == name:
        _fail = ""
        raise OSError(errno.EIO, f"injected I/O error at {name}")
    if _hang == name:
        if _hang_skip > 0:
            _hang_skip -= 1
            return
        _block_forever(name)


def _block_forever(name: str) -> None:
    from edge_core.log import get_logger

    # Logged first, so that a test knows the hang has begun rather than guessing from silence.
    get_logger("faults").warning("fault.hang", point=name)
    threading.Event().wait()
