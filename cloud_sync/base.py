"""Blob storage behind one small interface, chosen by URL scheme (as Litestream's ``ReplicaClient``).

    BlobBackend (Protocol)       put / get / list / delete / download_url / close        base.py
    ├── LocalBackend             file:///path, or a plain path                           local.py
    ├── AzureBackend             https://<account>.blob.core.windows.net/<container>     azure.py
    │                            [/<prefix>]?<SAS> (and Azurite's http://127.0.0.1:...)
    └── S3Backend                s3://<bucket>[/<prefix>], AWS_* credentials, endpoint_url s3.py
    RetryingBackend              wraps any backend: jittered exponential backoff         retry.py
    TokenBucket, paced           the bandwidth cap, drawn as bytes go on the wire        pacing.py
    open_backend                 the scheme-to-backend factory                           factory.py

This module is the interface and the name rules every backend shares; it imports no backend. Every
error of a backend is a :class:`~edge_core.errors.BlobError` with a stable code and ``retryable``:
the uploader retries (or keeps its batch for the next round) exactly when ``retryable`` is true, and
reports the code and hint to the operator otherwise.

Names are ``/``-separated relative paths (see :func:`check_name`); every backend refuses the same
names, so a batch that one backend accepts cannot be refused by another.
"""

from __future__ import annotations

import re
from typing import Protocol

from edge_core.errors import BlobError, ErrorCode

#: Longest name accepted, in UTF-8 bytes: S3's key limit (Azure allows 1024 characters).
MAX_NAME_BYTES = 1024


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

    def download_url(self, name: str, expires_s: int) -> str:
        """A URL that a holder of no credentials can GET the blob from (with Range), valid for at least
        ``expires_s`` seconds where the backend can bound it: an S3 presigned URL, the blob's URL with
        the container's SAS, or a local store's ``public_url`` (the address ``edge-deploy serve``
        serves it from). BlobError(blob_config_invalid) when the backend has no such URL."""
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
