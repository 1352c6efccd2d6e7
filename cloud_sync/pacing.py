"""The bandwidth cap: a token bucket that each backend draws the bytes of ``put`` from as they are
written, so the rate on the wire is smooth."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from edge_core.errors import BlobError, ErrorCode

#: The bytes of ``put`` go out in pieces of this size, each drawn from the bandwidth cap's bucket.
PACE_CHUNK = 64 << 10


class TokenBucket:
    """A bandwidth cap in bytes per second, shared by every put that is given it (thread-safe).

    The bucket holds at most ``burst`` bytes of credit. :meth:`take` spends ``n`` bytes at once and,
    if that leaves the bucket in debt, sleeps until the debt is paid: a piece larger than the burst
    still goes out (no deadlock), and over any long transfer the average rate stays at ``rate``.
    Sending N bytes from a full bucket therefore takes at least ``(N - burst) / rate`` seconds.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"bandwidth cap must be a positive number of bytes per second, got {rate!r}",
                "set a positive cap, or none for no cap",
            )
        self.rate = float(rate)
        # A quarter of a second of traffic, but at least one piece: small enough that a burst does not
        # saturate a thin uplink, large enough that the piece size does not dominate the rate.
        self.burst = int(burst) if burst is not None else max(PACE_CHUNK, int(rate / 4))
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


def paced(data: bytes, bucket: TokenBucket | None, chunk: int = PACE_CHUNK) -> Iterator[bytes]:
    """``data`` in pieces, each paid for in ``bucket`` before it is handed on (to a socket or a file)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        piece = view[start : start + chunk]
        if bucket is not None:
            bucket.take(len(piece))
        yield bytes(piece)
