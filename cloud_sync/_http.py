"""What the HTTP backends (azure.py, s3.py) share: the client, request bodies, and httpx errors.

httpx's exceptions are translated here, at the boundary, into :class:`BlobError`; a URL in a message
is always stripped of its query first (it may hold a SAS token or a signature).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator

import httpx

from cloud_sync.base import redact
from cloud_sync.pacing import TokenBucket, paced
from edge_core.errors import BlobError, ErrorCode

#: Statuses after which the same request can succeed later: the server is overloaded, restarting or
#: throttling us (Azure's ServerBusy/OperationTimedOut, S3's SlowDown/InternalError).
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def make_client(timeout: float, ca: str | None) -> httpx.Client:
    """One pooled client per backend. No redirects: a storage service that redirects is misconfigured,
    and following one would send our signed headers to another host."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        verify=ssl.create_default_context(cafile=ca) if ca else True,
        follow_redirects=False,
        headers={"User-Agent": "edge-agent-cloud-sync"},
    )


def request_body(data: bytes, throttle: TokenBucket | None) -> bytes | Iterator[bytes]:
    """The body of a put: the bytes themselves, or paced pieces when a bandwidth cap is set.

    The caller must set Content-Length: httpx then sends the pieces as a plain body (no chunked
    encoding, which Azure and S3 refuse for these requests).
    """
    return data if throttle is None else paced(data, throttle)


def transport_error(
    exc: httpx.HTTPError, service: str, op: str, name: str, url: httpx.URL | str
) -> BlobError:
    """An httpx exception (no HTTP status was received) as a BlobError."""
    where = f"{service} {op} {name!r} at {redact(str(url))}"
    if isinstance(exc, httpx.TimeoutException):
        return BlobError(
            ErrorCode.BLOB_UNAVAILABLE,
            f"{where}: timed out ({type(exc).__name__})",
            "check the device's network; the operation is retried",
            retryable=True,
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL | httpx.LocalProtocolError):
        return BlobError(
            ErrorCode.BLOB_CONFIG_INVALID,
            f"{where}: {type(exc).__name__}",
            "check the storage URL",
        )
    if isinstance(exc, httpx.TransportError):  # refused, reset, closed mid-response, TLS failures
        return BlobError(
            ErrorCode.BLOB_UNAVAILABLE,
            f"{where}: {type(exc).__name__}: {_first_line(exc)}",
            "check the device's network and the storage endpoint; the operation is retried",
            retryable=True,
        )
    return BlobError(ErrorCode.BLOB_REQUEST_FAILED, f"{where}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    # httpx messages of transport errors do not carry the URL, but may be long; the first line is enough
    return redact(str(exc).splitlines()[0]) if str(exc) else ""


class _RedactQuery(logging.Filter):
    """httpx logs every request at INFO with its full URL, SAS token included; strip the query.

    Installed on the "httpx" logger once, at import: it only rewrites URLs in records, it never drops
    one, so it changes nothing else for other httpx users in the process (agent/update/fetch.py has the same
    secrets in its URLs and benefits too).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(redact(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


def _install_log_redaction() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactQuery) for f in logger.filters):
        logger.addFilter(_RedactQuery())


_install_log_redaction()
