"""The scheme-to-backend factory: the one module that imports every backend (Litestream's
``replica_url.go``). Callers name a URL; this picks the implementation."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.azure import AzureBackend, is_sas_url
from cloud_sync.base import BlobBackend, redact
from cloud_sync.local import LocalBackend
from cloud_sync.pacing import TokenBucket
from cloud_sync.retry import RetryingBackend
from cloud_sync.s3 import S3Backend
from edge_core.errors import BlobError, ErrorCode


def local_path(url: str) -> Path | None:
    """The directory a ``file://`` URL or plain path names; None for a remote store."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parts.path)).absolute()
    if parts.scheme == "":
        return Path(url).absolute()
    return None


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
