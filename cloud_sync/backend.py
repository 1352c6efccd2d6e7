"""Blob storage behind one small interface, chosen by URL scheme (as Litestream's ``ReplicaClient``).

    BlobBackend (Protocol)       put / get / list / delete / close
    ├── LocalBackend  local.py   file:///path, or a plain path
    ├── AzureBackend  azure.py   https://<account>.blob.core.windows.net/<container>[/<prefix>]?<SAS>
    │                            (and http://127.0.0.1:<port>/<account>/<container>?<SAS> for Azurite)
    └── S3Backend     s3.py      s3://<bucket>[/<prefix>], AWS_* credentials, ``endpoint_url``
    RetryingBackend              wraps any backend: jittered exponential backoff on retryable errors
    TokenBucket                  the bandwidth cap; each backend draws the bytes of ``put`` from it
                                 as they are written, so the rate on the wire is smooth

:func:`open_backend` picks the backend from the URL. Every error of a backend is a :class:`BlobError`
with a stable code and ``retryable``: the uploader retries (or keeps its batch for the next round)
exactly when ``retryable`` is true, and reports the code and hint to the operator otherwise.

Names are ``/``-separated relative paths (see :func:`check_name`); every backend refuses the same
names, so a batch that one backend accepts cannot be refused by another.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.errors import EdgeError, ErrorCode
from agent.fetch import backoff_delays
from agent.log import get_logger

log = get_logger("cloud_sync")

T = TypeVar("T")

#: Longest name accepted, in UTF-8 bytes: S3's key limit (Azure allows 1024 characters).
MAX_NAME_BYTES = 1024

#: The bytes of ``put`` go out in pieces of this size, each drawn from the bandwidth cap's bucket.
PACE_CHUNK = 64 << 10


class BlobError(EdgeError):
    """A blob operation failed. ``retryable`` says whether the same call later can succeed.

    Retryable: timeouts, refused or reset connections, HTTP 5xx, 408 and 429, a full local disk.
    Not retryable: expired or insufficient credentials (403), a missing container or bucket (404), a
    missing blob (``get``), an invalid name or URL. The message never contains a SAS token or a
    signature: URLs in it are stripped of their query.
    """

    def __init__(self, code: ErrorCode, message: str, hint: str = "", *, retryable: bool = False) -> None:
        super().__init__(code, message, hint)
        self.retryable = retryable


class BlobBackend(Protocol):
    """One blob store (a directory, an Azure container, an S3 bucket), optionally under a prefix.

    Every method may block on the network; none of them is called on the inference hot path.
    """

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` as ``name``, replacing any blob of that name (a retried put never duplicates).

        The blob appears whole or not at all: a reader never sees part of it.
        """
        ...

    def get(self, name: str) -> bytes:
        """The blob's bytes; BlobError(blob_not_found) if there is none."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """The names that start with ``prefix`` (a plain string prefix, not a directory), sorted."""
        ...

    def delete(self, name: str) -> None:
        """Remove the blob. Deleting a blob that does not exist succeeds, so a retried delete does too."""
        ...

    def close(self) -> None:
        """Release connections and files. The backend is not used afterwards."""
        ...


# -- names -------------------------------------------------------------------------------------------

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def check_name(name: str, what: str = "blob name") -> str:
    """Return ``name`` if every backend can store it under that exact name, else raise blob_invalid_name.

    Refused: empty, longer than 1024 UTF-8 bytes, absolute, ``..``/``.``/empty segments (they would
    escape a local directory or be normalised away by a server), a trailing ``/``, control characters
    (XML listings cannot carry them) and ``\\`` (Azure turns it into ``/``).
    """
    if not isinstance(name, str) or not name:
        raise _bad_name(name, what, "it is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _bad_name(name[:80] + "...", what, f"it is longer than {MAX_NAME_BYTES} bytes")
    if _BAD_CHARS.search(name):
        raise _bad_name(name, what, "it contains a control character or a backslash")
    if name.startswith("/"):
        raise _bad_name(name, what, "it is absolute")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise _bad_name(name, what, "it has an empty, '.' or '..' segment")
    return name


def check_prefix(prefix: str) -> str:
    """A listing prefix may be empty or end in ``/``, but must not climb out with ``..``."""
    if prefix == "":
        return prefix
    if _BAD_CHARS.search(prefix) or prefix.startswith("/"):
        raise _bad_name(prefix, "listing prefix", "it is absolute or contains a control character")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise _bad_name(prefix, "listing prefix", "it has a '.' or '..' segment")
    return prefix


def _bad_name(name: object, what: str, why: str) -> BlobError:
    return BlobError(
        ErrorCode.BLOB_INVALID_NAME,
        f"{what} {name!r} is not allowed: {why}",
        "use relative '/'-separated names without '.', '..' or empty segments",
    )


def join_prefix(root: str, name: str) -> str:
    """The full key of ``name`` under the backend's own prefix (``root`` is '' or ends with '/')."""
    return root + name


def normalise_root(prefix: str) -> str:
    """A backend's own prefix from a URL path: '' or 'a/b/' (so names join with a plain +)."""
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    check_name(prefix, "storage URL prefix")
    return prefix + "/"


def redact(url: str) -> str:
    """A URL fit for a log line or an error message: without its query (a SAS token or a signature)."""
    return url.split("?", 1)[0].split("#", 1)[0]


# -- bandwidth cap -----------------------------------------------------------------------------------


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


# -- retries -----------------------------------------------------------------------------------------


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


# -- choosing a backend ------------------------------------------------------------------------------


def open_backend(
    url: str,
    *,
    retries: int = 4,
    backoff_min: float = 0.5,
    backoff_max: float = 30.0,
    bandwidth: float | TokenBucket | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    **opts: Any,
) -> BlobBackend:
    """The backend for ``url``, wrapped in a :class:`RetryingBackend` unless ``retries`` is 0.

    - ``file:///var/lib/x`` or ``/var/lib/x``: a local directory (``create=True`` makes it).
    - ``https://<account>.blob.core.windows.net/<container>[/<prefix>]?<SAS>``, or any http(s) URL
      whose query is a SAS (``sv=`` and ``sig=``), such as Azurite's
      ``http://127.0.0.1:10000/devstoreaccount1/<container>?<SAS>``: Azure Blob Storage.
    - ``s3://<bucket>[/<prefix>]``: S3; credentials from ``access_key_id``/``secret_access_key``/
      ``session_token`` or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, the region from
      ``region`` or AWS_REGION/AWS_DEFAULT_REGION, and ``endpoint_url`` (or AWS_ENDPOINT_URL_S3 /
      AWS_ENDPOINT_URL) for S3-compatible servers (MinIO, Ceph, moto), addressed path-style.

    ``bandwidth`` caps the bytes per second of put (a number, or a TokenBucket to share one cap
    between backends). Other ``opts`` go to the backend's constructor (``timeout``, ``ca``,
    ``block_size``, ...; see each module).
    """
    bucket = TokenBucket(bandwidth) if isinstance(bandwidth, int | float) else bandwidth
    backend = _open(url, bucket, opts)
    if retries > 0:
        return RetryingBackend(
            backend,
            retries=retries,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            should_stop=should_stop,
        )
    return backend


def _open(url: str, bucket: TokenBucket | None, opts: dict[str, Any]) -> BlobBackend:
    # Imported here: each backend module imports this one for BlobError and the helpers.
    from cloud_sync.azure import AzureBackend, is_sas_url
    from cloud_sync.local import LocalBackend
    from cloud_sync.s3 import S3Backend

    if not isinstance(url, str) or not url.strip():
        raise _bad_url("", "it is empty")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise _bad_url(url, "a file:// URL must name a local path (file:///path)")
            return LocalBackend(Path(urllib.parse.unquote(parts.path)), throttle=bucket, **opts)
        if scheme == "":
            return LocalBackend(Path(url), throttle=bucket, **opts)
        if scheme == "s3":
            return S3Backend.from_url(url, throttle=bucket, **opts)
        if scheme in ("http", "https"):
            if is_sas_url(url):
                return AzureBackend.from_url(url, throttle=bucket, **opts)
            query = urllib.parse.parse_qs(parts.query)
            if "X-Amz-Signature" in query:
                raise _bad_url(
                    url,
                    "an S3 presigned URL names one object, not a place to store many",
                    "use s3://<bucket>/<prefix> with credentials (docs/cloud_sync.md)",
                )
            if parts.hostname and parts.hostname.endswith(".blob.core.windows.net"):
                raise _bad_url(
                    url, "an Azure Blob URL needs a SAS token in its query (the sv and sig parameters)"
                )
            raise _bad_url(
                url, "an http(s) URL is accepted only with an Azure SAS query (its sv and sig parameters)"
            )
    except TypeError as exc:
        if "keyword argument" not in str(exc):  # a bug, not an option the backend does not take
            raise
        raise BlobError(
            ErrorCode.BLOB_CONFIG_INVALID,
            f"storage {redact(url)}: {exc}",
            "remove the option; see docs/cloud_sync.md for each backend's options",
        ) from None
    raise _bad_url(url, f"unknown scheme {scheme!r}")


def _bad_url(url: str, why: str, hint: str = "") -> BlobError:
    return BlobError(
        ErrorCode.BLOB_CONFIG_INVALID,
        f"storage URL {redact(url)!r} is not usable: {why}",
        hint or "use file:///path, s3://bucket/prefix or an Azure container SAS URL (docs/cloud_sync.md)",
    )
