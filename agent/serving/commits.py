"""Answers that wait for their capture record to be committed (``telemetry.capture_commit =
"before_answer"``), without a thread per request and without blocking the event loop.

The buffer's writer thread calls :meth:`CommitWaiter.notify` after each transaction with the
highest ticket it has processed; that schedules the release of every waiting future up to it on the
event loop (``call_soon_threadsafe``). A request awaits its future, bounded by ``timeout_s``: a
wedged disk must not stop the device from serving, so a request whose record is not committed in
time is answered anyway, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from edge_core.log import get_logger

log = get_logger("api")


class CommitWaiter:
    """Futures keyed by ticket, on one event loop; notified from the buffer's writer thread."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout
        self.timeouts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # In ticket order: requests take their tickets on this loop's thread and register at once,
        # without yielding in between, so insertion order is ticket order and a release pops from
        # the front. Expired entries go at once too (_sweep): nothing piles up on a wedged disk.
        self._waiting: dict[int, tuple[asyncio.Future[bool], float]] = {}  # and its deadline
        # One timer for all of them rather than one per request: answers expire in the order they
        # started waiting, so a sweep looks at the front only.
        self._sweep_s = max(0.01, min(0.1, timeout_s / 10))
        self._sweeper: asyncio.TimerHandle | None = None
        #: The highest ticket the writer reported. Written by its thread, read on the loop: the check
        #: in wait() that makes a notification that found no loop yet impossible to miss.
        self._latest = 0
        self._last_warning = -float("inf")

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, ticket: int) -> None:
        """Any thread (the buffer's writer): every record up to ``ticket`` is committed or dropped."""
        self._latest = ticket
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the API has stopped, nobody waits
            loop.call_soon_threadsafe(self._release, ticket)

    def _release(self, ticket: int) -> None:
        waiting = self._waiting
        while waiting:
            first = next(iter(waiting))
            if first > ticket:
                break
            fut = waiting.pop(first)[0]
            if not fut.done():
                fut.set_result(True)

    async def wait(self, ticket: int) -> bool:
        """On the event loop: True once the record with ``ticket`` is committed (or dropped by a
        write error, which the buffer counts), False when ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop  # before reading _latest: see notify()
        if ticket <= self._latest:
            return True
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiting[ticket] = (fut, loop.time() + self.timeout_s)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_s, self._sweep, loop)
        try:
            done = await fut
        finally:
            if fut.cancelled():  # the client went away, or the server is stopping
                self._waiting.pop(ticket, None)
        if not done:
            self._timed_out(ticket)
        return done

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer the requests whose wait has lasted timeout_s (give or take one sweep period)."""
        self._sweeper = None
        now = loop.time()
        expired = []
        for ticket, (_, deadline) in self._waiting.items():
            if deadline > now:
                break
            expired.append(ticket)
        for ticket in expired:
            fut = self._waiting.pop(ticket)[0]
            if not fut.done():
                fut.set_result(False)
        if self._waiting:
            self._sweeper = loop.call_later(self._sweep_s, self._sweep, loop)

    @property
    def waiting(self) -> int:
        """Requests whose answer waits for its record's commit now."""
        return len(self._waiting)

    def _timed_out(self, ticket: int) -> None:
        self.timeouts += 1
        if self.on_timeout is not None:
            self.on_timeout()
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning(
                "api.capture_commit_timeout",
                ticket=ticket,
                committed=self._latest,
                timeout_s=self.timeout_s,
                timeouts=self.timeouts,
            )
