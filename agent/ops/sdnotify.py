"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), spoken directly.

The protocol is one datagram per message on the AF_UNIX socket named by ``$NOTIFY_SOCKET``: newline
separated ``KEY=VALUE`` assignments (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``).
A name starting with ``@`` is in the abstract namespace (the ``@`` stands for a NUL byte). It is
written here rather than taken from a library because it is a dozen lines and the agent must
not gain a dependency (a C extension, libsystemd) for it.

Two rules shape the code. Without ``$NOTIFY_SOCKET`` (a terminal, a container, a test) every call
is a no-op, so the daemon calls it unconditionally. And a notification must never take the agent
down or hold it up: a failed send is logged once and otherwise ignored (systemd then restarts
the service on its own timeouts, which is the right outcome), and sends time out instead of blocking
the main loop if the manager stops reading.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

from edge_core.log import get_logger

log = get_logger("sdnotify")

NOTIFY_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
#: systemd drops notification datagrams longer than its receive buffer (a few KiB); a STATUS built
#: from an error message of unknown length is cut well below that.
MAX_VALUE_CHARS = 1024
#: A send that cannot complete in this time is abandoned: the manager is not reading, and the main
#: loop (which also serves the watchdog) must not stall on it.
SEND_TIMEOUT_S = 1.0


def socket_address(name: str) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None when it is not one we speak.

    An absolute path is a filesystem socket; ``@name`` is abstract (NUL-prefixed bytes, because
    Python's str address would be taken as a path). Anything else (a relative path, systemd 254's
    ``vsock:`` addresses) is refused rather than guessed at.
    """
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when the watchdog is not enabled for us.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so that one late tick does not
    cost a restart. ``$WATCHDOG_PID`` names the process the watchdog is meant for: set to another
    pid, the variables were inherited from a parent and are not ours to act on.
    """
    raw = env.get(WATCHDOG_USEC_ENV, "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    want_pid = env.get(WATCHDOG_PID_ENV, "")
    if want_pid:
        try:
            if int(want_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def _clean(value: str) -> str:
    # A newline in a value would start a new assignment: an error text holding "\nREADY=1" must not
    # be able to tell systemd anything.
    return " ".join(value.splitlines())[:MAX_VALUE_CHARS]


class Notifier:
    """Sends notifications to the service manager; every method is safe to call without one."""

    def __init__(self, notify_socket: str | None, watchdog_interval_s: float | None = None) -> None:
        self.name = notify_socket or ""
        self.address = socket_address(self.name) if self.name else None
        #: How often to send ``WATCHDOG=1`` (half of WatchdogSec); None: no watchdog to feed.
        self.watchdog_interval = watchdog_interval_s if self.address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False
        if self.name and self.address is None:
            log.warning("sdnotify.unsupported_socket", notify_socket=self.name)

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` and the watchdog variables of ``env`` (os.environ).

        ``unset`` removes the variables, as sd_notify(3)'s ``unset_environment`` does: the agent's
        child processes (score.py workers) inherit its environment, and a child that believed it
        was the service would confuse the manager (``NotifyAccess=main`` ignores it, but a log of
        rejected messages is noise).
        """
        env = os.environ if env is None else env
        notifier = cls(env.get(NOTIFY_ENV) or None, watchdog_interval(env))
        if unset:
            for name in (NOTIFY_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` assignments (keys as systemd spells them) in one datagram.

        One datagram matters: ``READY=1`` and the ``STATUS`` that explains it arrive together.
        Returns whether the message was handed to the socket; never raises.
        """
        if self.address is None or not fields:
            return False
        msg = "\n".join(f"{key}={_clean(str(value))}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(SEND_TIMEOUT_S)
                self._sock = sock
            self._sock.sendto(msg, self.address)
        except OSError as exc:
            if not self._failing:
                # Once, not every tick: a manager that went away would otherwise fill the journal.
                log.warning("sdnotify.send_failed", notify_socket=self.name, error=str(exc))
                self._failing = True
            return False
        if self._failing:
            log.info("sdnotify.send_recovered", notify_socket=self.name)
            self._failing = False
        return True

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start (or stop) timeout fires.

        For a start that is slow for a known, bounded reason (loading an image whose score.py
        ``init()`` may take ``runtime.init_timeout``): the unit's TimeoutStartSec stays short for
        every other kind of hang.
        """
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
