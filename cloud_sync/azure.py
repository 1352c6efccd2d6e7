"""Azure Blob Storage through a container SAS URL, with plain httpx (no Azure SDK on the device).

The URL is the container's, with a SAS query: ``https://<account>.blob.core.windows.net/<container>
[/<prefix>]?sv=...&sig=...``; for an IP address or localhost (Azurite) the account is the first path
segment: ``http://127.0.0.1:10000/devstoreaccount1/<container>?sv=...``. Every request URL is that
URL with another path and extra query parameters merged in with ``URL.copy_merge_params``: httpx's
``params=`` would replace the query, SAS token included, and the request would fail as anonymous.

Uploads:

- up to ``single_put_max`` bytes (4 MiB): one Put Blob (``x-ms-blob-type: BlockBlob``).
- larger: Put Block for each ``block_size`` piece, then Put Block List. Block ids are deterministic,
  derived from the blob name, the block index and the block's own sha256, so a put that crashed or
  timed out half-way and is tried again (by RetryingBackend, or by the agent after a restart) first
  asks Get Block List which blocks the service already holds (committed or not) and sends only the
  others. The digest is in the id so that a retry with *different* bytes under the same name can never
  commit a stale block of the old bytes; the size reported for the id is checked as well.

Every Put Blob and Put Block carries Content-MD5, so the service refuses a body damaged in transit.
The SAS token is never logged: URLs in messages are stripped of their query, and server messages are
scrubbed of the signature.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import urllib.parse
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any

import httpx

from cloud_sync._http import is_retryable_status, make_client, request_body, transport_error
from cloud_sync.base import check_name, check_prefix, normalise_root, redact
from cloud_sync.pacing import TokenBucket
from edge_core.errors import BlobError, ErrorCode
from edge_core.log import get_logger

log = get_logger("cloud_sync.azure")

#: The REST API version we speak. Any version from 2019-12-12 on has everything used here; Azurite
#: refuses versions newer than it knows unless started with --skipApiVersionCheck.
API_VERSION = "2021-12-02"

BLOCK_SIZE = 4 << 20
#: Azure's own limits: at most 50,000 committed blocks per blob, 4000 MiB per block.
MAX_BLOCKS = 50_000
MAX_BLOCK_SIZE = 4000 << 20

_SERVICE = "Azure Blob"
_PERMISSION = {"put": "write (w)", "get": "read (r)", "list": "list (l)", "delete": "delete (d)"}


def is_sas_url(url: str) -> bool:
    """Whether ``url`` carries an Azure SAS query (a service or account SAS: ``sv=`` and ``sig=``)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return "sig" in query and "sv" in query


def block_id(full_name: str, index: int, block: bytes | memoryview) -> str:
    """The id of block ``index`` of ``full_name`` holding ``block``: deterministic, fixed length (Azure
    requires all ids of a blob to be equally long), at most 64 bytes before base64."""
    h = hashlib.sha256()
    h.update(full_name.encode("utf-8"))
    h.update(index.to_bytes(4, "big"))
    h.update(hashlib.sha256(block).digest())
    return base64.b64encode(f"{index:06d}-{h.hexdigest()[:40]}".encode("ascii")).decode("ascii")


def _md5_b64(data: bytes | memoryview) -> str:
    # MD5 only because it is what the service checks (Content-MD5); it is not a security boundary.
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


class AzureBackend:
    def __init__(
        self,
        container_url: httpx.URL,
        root: str = "",
        *,
        throttle: TokenBucket | None = None,
        timeout: float = 30.0,
        ca: str | None = None,
        block_size: int = BLOCK_SIZE,
        single_put_max: int | None = None,
        list_page_size: int = 5000,
        client: httpx.Client | None = None,
    ) -> None:
        """``container_url``: the container's URL with its SAS query; ``root``: '' or 'prefix/'."""
        if not 0 < block_size <= MAX_BLOCK_SIZE:
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"block_size {block_size} is outside 1..{MAX_BLOCK_SIZE}",
                "use a few MiB",
            )
        self._url = container_url
        # Already percent-encoded (account and container names are plain ASCII); blob paths join it.
        self._container_path = container_url.raw_path.split(b"?", 1)[0].decode("ascii")
        self._root = root
        self.throttle = throttle
        self.block_size = block_size
        self.single_put_max = block_size if single_put_max is None else single_put_max
        self.list_page_size = list_page_size
        self._client = client or make_client(timeout, ca)
        sas = urllib.parse.parse_qs(container_url.query.decode("ascii", "replace"))
        self._sas_expiry = (sas.get("se") or [""])[0]
        self._sas_permissions = (sas.get("sp") or [""])[0]
        # The signature, raw and percent-encoded, to scrub from anything a server says back.
        sig = (sas.get("sig") or [""])[0]
        self._secrets = [s for s in {sig, urllib.parse.quote(sig, safe="")} if s]

    @classmethod
    def from_url(cls, url: str, *, account_in_path: bool | None = None, **opts: Any) -> AzureBackend:
        """``account_in_path``: whether the first path segment is the account (emulators). By default
        it is for an IP address, ``localhost`` or a single-label host (``http://azurite:10000/...`` in
        a container network); a ``*.blob.core.windows.net`` host names the account itself."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID, f"storage URL {redact(url)!r} is not a valid URL"
            ) from None
        segments = [s for s in parsed.path.split("/") if s]
        host = parsed.host
        if account_in_path is None:
            account_in_path = host == "localhost" or "." not in host or _is_ip(host)
        need = 2 if account_in_path else 1
        if len(segments) < need:
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"storage URL {redact(url)!r} names no container",
                "use the container's SAS URL: https://<account>.blob.core.windows.net/<container>?<SAS>",
            )
        container_path = "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments[:need])
        root = normalise_root("/".join(segments[need:]))
        return cls(parsed.copy_with(path=container_path), root, **opts)

    # -- the interface -------------------------------------------------------------------------------

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        full = self._root + check_name(name)
        if len(data) <= self.single_put_max:
            self._put_blob(full, name, data, content_type)
        else:
            self._put_blocks(full, name, data, content_type)

    def get(self, name: str) -> bytes:
        full = self._root + check_name(name)
        resp = self._send("GET", self._blob_url(full), "get", name, ok=(200,))
        data = resp.content
        md5 = resp.headers.get("content-md5")
        if md5 and md5 != _md5_b64(data):
            raise BlobError(
                ErrorCode.BLOB_UNAVAILABLE,
                f"{_SERVICE} get {name!r}: the bytes received do not match the blob's Content-MD5",
                "the transfer was damaged; the operation is retried",
                retryable=True,
            )
        return data

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        names: list[str] = []
        marker = ""
        while True:
            params = {
                "restype": "container",
                "comp": "list",
                "prefix": self._root + prefix,
                "maxresults": str(self.list_page_size),
            }
            if marker:
                params["marker"] = marker
            resp = self._send("GET", self._url.copy_merge_params(params), "list", prefix, ok=(200,))
            root = self._xml(resp, "list", prefix)
            for el in root.iterfind("./Blobs/Blob/Name"):
                full = el.text or ""
                if full.startswith(self._root):
                    names.append(full[len(self._root) :])
            marker = (root.findtext("NextMarker") or "").strip()
            if not marker:
                return sorted(names)

    def delete(self, name: str) -> None:
        full = self._root + check_name(name)
        try:
            self._send(
                "DELETE",
                self._blob_url(full),
                "delete",
                name,
                headers={"x-ms-delete-snapshots": "include"},
                ok=(202,),
            )
        except BlobError as exc:
            if exc.code != ErrorCode.BLOB_NOT_FOUND:
                raise

    def download_url(self, name: str, expires_s: int = 0) -> str:
        """The blob's URL with the container's SAS: a device can GET it (with Range) if the SAS grants
        read (``sp`` has ``r``) and until the SAS expires (its ``se``: ``expires_s`` cannot extend it)."""
        return str(self._blob_url(self._root + check_name(name)))

    def close(self) -> None:
        self._client.close()

    # -- uploads -------------------------------------------------------------------------------------

    def _put_blob(self, full: str, name: str, data: bytes, content_type: str) -> None:
        headers = {
            "x-ms-blob-type": "BlockBlob",
            "Content-Type": content_type,
            "Content-Length": str(len(data)),
            "Content-MD5": _md5_b64(data),
        }
        self._send(
            "PUT",
            self._blob_url(full),
            "put",
            name,
            headers=headers,
            content=request_body(data, self.throttle),
            ok=(201,),
        )

    def _put_blocks(self, full: str, name: str, data: bytes, content_type: str) -> None:
        view = memoryview(data)
        count = -(-len(data) // self.block_size)
        if count > MAX_BLOCKS:
            raise BlobError(
                ErrorCode.BLOB_REQUEST_FAILED,
                f"{_SERVICE} put {name!r}: {len(data)} bytes in blocks of {self.block_size} would be "
                f"{count} blocks, more than Azure's {MAX_BLOCKS}",
                "raise block_size",
            )
        url = self._blob_url(full)
        have = self._existing_blocks(url, name)
        ids: list[str] = []
        sent = 0
        for index in range(count):
            block = bytes(view[index * self.block_size : (index + 1) * self.block_size])
            bid = block_id(full, index, block)
            ids.append(bid)
            if have.get(bid) == len(block):
                continue  # uploaded by an earlier attempt that did not get to commit
            self._send(
                "PUT",
                url.copy_merge_params({"comp": "block", "blockid": bid}),
                "put",
                name,
                headers={"Content-Length": str(len(block)), "Content-MD5": _md5_b64(block)},
                content=request_body(block, self.throttle),
                ok=(201,),
            )
            sent += 1
        if sent < count:
            log.info("blob.put_resumed", name=name, blocks=count, reused=count - sent)
        body = (
            '<?xml version="1.0" encoding="utf-8"?><BlockList>'
            + "".join(f"<Latest>{bid}</Latest>" for bid in ids)
            + "</BlockList>"
        ).encode("ascii")
        self._send(
            "PUT",
            url.copy_merge_params({"comp": "blocklist"}),
            "put",
            name,
            headers={
                "x-ms-blob-content-type": content_type,
                "Content-Type": "application/xml",
                "Content-MD5": _md5_b64(body),
            },
            content=body,
            ok=(201,),
        )

    def _existing_blocks(self, url: httpx.URL, name: str) -> dict[str, int]:
        """Block id -> size of the blocks the service holds for this blob, committed or not.

        Nothing (upload every block) when the blob has no blocks, or when the SAS may write but not
        read (a write-only device credential): resuming is an optimisation, not a requirement.
        """
        try:
            resp = self._send(
                "GET",
                url.copy_merge_params({"comp": "blocklist", "blocklisttype": "all"}),
                "put",
                name,
                ok=(200,),
            )
        except BlobError as exc:
            if exc.code in (ErrorCode.BLOB_NOT_FOUND, ErrorCode.BLOB_ACCESS_DENIED):
                return {}
            raise
        have: dict[str, int] = {}
        for block in self._xml(resp, "put", name).iterfind(".//Block"):
            bid, size = block.findtext("Name"), block.findtext("Size")
            if bid and size and size.isdigit():
                have[bid] = int(size)
        return have

    # -- HTTP ----------------------------------------------------------------------------------------

    def _blob_url(self, full: str) -> httpx.URL:
        # Percent-encode every byte that is not unreserved; '/' stays, it is the virtual directory.
        return self._url.copy_with(path=self._container_path + "/" + urllib.parse.quote(full, safe="/"))

    def _send(
        self,
        method: str,
        url: httpx.URL,
        op: str,
        name: str,
        *,
        headers: dict[str, str] | None = None,
        content: Any = None,
        ok: tuple[int, ...],
    ) -> httpx.Response:
        h = {"x-ms-version": API_VERSION}
        if headers:
            h.update(headers)
        try:
            resp = self._client.request(method, url, headers=h, content=content)
        except httpx.HTTPError as exc:
            raise transport_error(exc, _SERVICE, op, name, url) from None
        if resp.status_code in ok:
            return resp
        raise self._status_error(resp, op, name)

    def _xml(self, resp: httpx.Response, op: str, name: str) -> ET.Element:
        try:
            return ET.fromstring(resp.content)
        except ET.ParseError as exc:
            raise BlobError(
                ErrorCode.BLOB_UNAVAILABLE,
                f"{_SERVICE} {op} {name!r}: the response is not valid XML ({exc})",
                "a proxy between the device and Azure may be interfering; the operation is retried",
                retryable=True,
            ) from None

    def _status_error(self, resp: httpx.Response, op: str, name: str) -> BlobError:
        status = resp.status_code
        code, detail = _error_details(resp)
        request_id = resp.headers.get("x-ms-request-id", "")
        where = f"{_SERVICE} {op} {name!r} at {redact(str(resp.request.url))}"
        said = self._scrub(f"HTTP {status} {code}: {detail}".rstrip(": "))
        if request_id:
            said += f" (request id {request_id})"
        if status in (401, 403):
            need = _PERMISSION.get(op, op)
            if self._sas_expired():
                why = f"the SAS token expired at {self._sas_expiry}"
            else:
                why = (
                    f"the SAS token has expired or lacks {need} permission "
                    f"(it grants sp={self._sas_permissions or '?'}, se={self._sas_expiry or '?'})"
                )
            return BlobError(
                ErrorCode.BLOB_ACCESS_DENIED,
                f"{where}: {why}; {said}",
                f"issue a new SAS URL for the container with {need} permission and a later expiry",
            )
        if status == 404 and code == "ContainerNotFound":
            return BlobError(
                ErrorCode.BLOB_CONTAINER_NOT_FOUND,
                f"{where}: the container does not exist; {said}",
                "create the container, or fix its name in the storage URL",
            )
        if status == 404:
            return BlobError(ErrorCode.BLOB_NOT_FOUND, f"{where}: no such blob; {said}")
        # A block list naming blocks the service has discarded (uncommitted blocks expire after a week,
        # or a concurrent Put Blob dropped them): a new attempt asks again and uploads them.
        retryable = is_retryable_status(status) or code == "InvalidBlockList"
        return BlobError(
            ErrorCode.BLOB_UNAVAILABLE if retryable else ErrorCode.BLOB_REQUEST_FAILED,
            f"{where}: {said}",
            "the operation is retried" if retryable else "see the message; report it if it persists",
            retryable=retryable,
        )

    def _sas_expired(self) -> bool:
        try:
            expiry = datetime.fromisoformat(self._sas_expiry.replace("Z", "+00:00"))
        except ValueError:
            return False
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=UTC)
        # By the device's clock; the message says "expired" only when it is clearly past.
        return datetime.now(UTC) > expiry

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "REDACTED")
        return _SIG_RE.sub(r"\1=REDACTED", text)


_SIG_RE = re.compile(r"(?i)\b(sig|signature)=[^&\s\"'<]*")


def _error_details(resp: httpx.Response) -> tuple[str, str]:
    """(error code, first line of the message) from Azure's XML error body or its headers."""
    code = resp.headers.get("x-ms-error-code", "")
    detail = ""
    if resp.content:
        try:
            root = ET.fromstring(resp.content)
            code = code or root.findtext("Code") or ""
            message = (root.findtext("Message") or "").strip()
            detail = message.splitlines()[0] if message else ""
            auth = root.findtext("AuthenticationErrorDetail")
            if auth:
                detail += f" ({auth.strip().splitlines()[0]})"
        except ET.ParseError:
            detail = resp.text[:200].strip().splitlines()[0] if resp.text.strip() else ""
    return code or resp.reason_phrase, detail


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
