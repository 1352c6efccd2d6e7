"""Watching a process's long-lived background threads, so that the owner sees any of them die.

A thread that dies in a long-running daemon is the worst kind of failure: the process looks alive,
systemd sees nothing, and one capability (the uploads, the control channel, the API) is silently
gone. The owner registers each long-lived thread with a :class:`Supervisor` and asks it, on every tick
of its main loop, which of them is no longer alive; an uncaught exception in any thread is logged with
its traceback as one structured line (:func:`log_thread_crashes`). The daemon's answer to a casualty
is to exit non-zero, so that the service manager restarts it whole (aiomqtt's supervised loop, whose
death the client sees, is the model).
"""

from __future__ import annotations

import threading
import traceback

from edge_core.log import get_logger

log = get_logger("supervise")


class Supervisor:
    def __init__(self) -> None:
        self._threads: list[tuple[str, threading.Thread]] = []

    def watch(self, name: str, thread: threading.Thread) -> None:
        """Watch ``thread`` (started, or about to be) until the owner stops watching at shutdown."""
        self._threads.append((name, thread))

    def casualties(self) -> list[str]:
        """The names of watched threads that have started and are no longer alive."""
        return [name for name, t in self._threads if t.ident is not None and not t.is_alive()]


def log_thread_crashes() -> None:
    """Route every uncaught exception of a thread to the structured log (one line, with the stack)."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.error(
            "thread.crashed",
            thread=args.thread.name if args.thread is not None else "?",
            error=f"{args.exc_type.__name__}: {args.exc_value}",
            traceback="".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)),
        )

    threading.excepthook = hook
