"""Retries around any backend, on the errors that say a later try can succeed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from cloud_sync.base import BlobBackend
from edge_core.errors import BlobError
from edge_core.log import get_logger
from edge_core.retry import backoff_delays

log = get_logger("cloud_sync")

T = TypeVar("T")


class RetryingBackend:
    """Retries every operation of ``inner`` on retryable BlobErrors, with full-jitter backoff.

    All four operations are safe to repeat: put overwrites by name, delete of a missing blob succeeds,
    get and list read. Azure's block uploads resume on a retry (already uploaded blocks are not sent
    again, see azure.py). ``should_stop`` cuts a backoff wait short (agent shutdown); the last error
    is then raised, still marked retryable, so the caller keeps its batch for the next run.
    """

    def __init__(
        self,
        inner: BlobBackend,
        *,
        retries: int = 4,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.inner = inner
        self.retries = retries
        self._delay = backoff_delays(backoff_min, backoff_max)
        self._should_stop = should_stop

    def _call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except BlobError as exc:
                if not exc.retryable or attempt >= self.retries or self._should_stop():
                    raise
                delay = self._delay(attempt)
                attempt += 1
                log.warning(
                    "blob.retry",
                    op=op,
                    name=name,
                    attempt=attempt,
                    code=str(exc.code),
                    error=exc.message,
                    delay_s=round(delay, 3),
                )
                if not _sleep(delay, self._should_stop):
                    raise

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call("put", name, lambda: self.inner.put(name, data, content_type))

    def get(self, name: str) -> bytes:
        return self._call("get", name, lambda: self.inner.get(name))

    def list(self, prefix: str = "") -> list[str]:
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def delete(self, name: str) -> None:
        self._call("delete", name, lambda: self.inner.delete(name))

    def download_url(self, name: str, expires_s: int) -> str:
        return self.inner.download_url(name, expires_s)  # computed locally: nothing to retry

    def close(self) -> None:
        self.inner.close()


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> bool:
    """Wait ``seconds``; False (at once) when told to stop."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if should_stop():
            return False
        time.sleep(min(0.1, left))
    return True
