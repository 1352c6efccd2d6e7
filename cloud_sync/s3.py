"""S3 (and S3-compatible servers: MinIO, Ceph RGW, moto) with plain httpx and AWS Signature Version 4.

The signature is computed here (hmac/hashlib, no botocore on the device) over the real sha256 of the
payload, never ``UNSIGNED-PAYLOAD``: the service then refuses a body changed in transit, and every
PUT also carries Content-MD5. The query string of each request is built here in its canonical form
and sent exactly as signed (``URL.copy_with(query=...)``), so what is signed is byte for byte what
the server sees; httpx's ``params=`` would encode it its own way (and replace any existing query).

Addressing: with ``endpoint_url`` (any S3-compatible server), path-style ``<endpoint>/<bucket>/<key>``;
on AWS, virtual-hosted ``https://<bucket>.s3.<region>.amazonaws.com/<key>`` (path-style for bucket
names with dots, which virtual-hosted TLS cannot serve).

Presigned URLs: :func:`presign` (and :meth:`S3Backend.presigned_url`) make SigV4 query-signed URLs,
for a control plane that hands a device one URL per object instead of credentials. A device that
only holds presigned URLs cannot list or choose names, so such URLs do not make a BlobBackend; see
docs/cloud_sync.md for how they plug in.

Objects are uploaded in one PUT (S3 takes up to 5 GiB that way); multipart upload is not built, as
the agent uploads batches of a few MiB.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from cloud_sync._http import is_retryable_status, make_client, request_body, transport_error
from cloud_sync.base import check_name, check_prefix, normalise_root, redact
from cloud_sync.pacing import TokenBucket
from edge_core.errors import BlobError, ErrorCode

_SERVICE = "S3"
ALGORITHM = "AWS4-HMAC-SHA256"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
#: Query parameters as (name, value) pairs (an alias: the class's ``list`` method shadows the builtin).
_Query = list[tuple[str, str]]

_PERMISSION = {
    "put": "s3:PutObject",
    "get": "s3:GetObject",
    "list": "s3:ListBucket",
    "delete": "s3:DeleteObject",
}
_REGION_CODES = ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException")


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


# -- Signature Version 4 (pure functions) ------------------------------------------------------------


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """RFC 3986 encoding as SigV4 wants it: everything but A-Z a-z 0-9 - _ . ~ (and '/' in paths)."""
    return urllib.parse.quote(value, safe="/" if keep_slash else "")


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _query_pairs(raw_query: str) -> list[tuple[str, str]]:
    # Decode exactly what is on the wire ('+' is a literal plus in SigV4, not a space).
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        k, _, v = part.partition("=")
        pairs.append((urllib.parse.unquote(k), urllib.parse.unquote(v)))
    return pairs


def signing_key(secret: str, datestamp: str, region: str, service: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), datestamp.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _canonical_headers(headers: dict[str, str]) -> tuple[str, str]:
    items = sorted((k.lower().strip(), " ".join(v.strip().split())) for k, v in headers.items())
    return "".join(f"{k}:{v}\n" for k, v in items), ";".join(k for k, _ in items)


def signature(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: dict[str, str],
    payload_sha256: str,
    credentials: Credentials,
    region: str,
    service: str,
    amz_date: str,
) -> tuple[str, str, str]:
    """(signature, signed headers, credential scope) of one request. ``raw_path`` is the path as sent
    (already percent-encoded once; S3 does not encode it again); ``headers`` are the ones to sign."""
    datestamp = amz_date[:8]
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    canon_headers, signed = _canonical_headers(headers)
    canonical_request = "\n".join(
        [
            method,
            raw_path or "/",
            canonical_query(_query_pairs(raw_query)),
            canon_headers,
            signed,
            payload_sha256,
        ]
    )
    to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()]
    )
    key = signing_key(credentials.secret_access_key, datestamp, region, service)
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest(), signed, scope


def sign_headers(
    method: str,
    url: httpx.URL,
    payload: bytes,
    credentials: Credentials,
    region: str,
    *,
    service: str = "s3",
    headers: dict[str, str] | None = None,
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers that make a signed request of ``method url`` with body ``payload``: ``headers``
    plus Host, X-Amz-Date, X-Amz-Content-Sha256, X-Amz-Security-Token and Authorization. Every header
    given is signed, so send exactly these."""
    amz_date = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    payload_sha256 = hashlib.sha256(payload).hexdigest()
    out = dict(headers or {})
    # The Host header httpx sends: the port appears only when it is not the scheme's default.
    out["Host"] = url.netloc.decode("ascii")
    out["X-Amz-Date"] = amz_date
    out["X-Amz-Content-Sha256"] = payload_sha256
    if credentials.session_token:
        out["X-Amz-Security-Token"] = credentials.session_token
    raw_path, _, raw_query = url.raw_path.decode("ascii").partition("?")
    sig, signed, scope = signature(
        method=method,
        raw_path=raw_path,
        raw_query=raw_query,
        headers=out,
        payload_sha256=payload_sha256,
        credentials=credentials,
        region=region,
        service=service,
        amz_date=amz_date,
    )
    out["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, SignedHeaders={signed}, Signature={sig}"
    )
    return out


def presign(
    method: str,
    url: httpx.URL | str,
    credentials: Credentials,
    region: str,
    expires: int = 3600,
    *,
    service: str = "s3",
    now: datetime | None = None,
) -> str:
    """A query-signed URL for ``method url``, valid ``expires`` seconds (at most 7 days). The payload is
    ``UNSIGNED-PAYLOAD``, as for every presigned URL: the signer does not know the bytes to come."""
    url = httpx.URL(url)
    amz_date = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    raw_path, _, raw_query = url.raw_path.decode("ascii").partition("?")
    pairs = [
        *_query_pairs(raw_query),
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{credentials.access_key_id}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.session_token:
        pairs.append(("X-Amz-Security-Token", credentials.session_token))
    query = canonical_query(pairs)
    sig, _, _ = signature(
        method=method,
        raw_path=raw_path,
        raw_query=query,
        headers={"host": url.netloc.decode("ascii")},
        payload_sha256="UNSIGNED-PAYLOAD",
        credentials=credentials,
        region=region,
        service=service,
        amz_date=amz_date,
    )
    return str(url.copy_with(query=f"{query}&X-Amz-Signature={sig}".encode("ascii")))


# -- the backend -------------------------------------------------------------------------------------


class S3Backend:
    def __init__(
        self,
        bucket: str,
        root: str = "",
        *,
        credentials: Credentials,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        throttle: TokenBucket | None = None,
        timeout: float = 30.0,
        ca: str | None = None,
        list_page_size: int = 1000,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"{bucket!r} is not a valid S3 bucket name",
                "3-63 lowercase letters, digits, '.' and '-'",
            )
        self.bucket = bucket
        self.region = region
        self._root = root
        self._credentials = credentials
        self.throttle = throttle
        self.list_page_size = list_page_size
        self._clock = clock or (lambda: datetime.now(UTC))
        self._client = client or make_client(timeout, ca)
        if endpoint_url:
            base = httpx.URL(endpoint_url.rstrip("/"))
            self._base = base.copy_with(path=base.path.rstrip("/") + "/" + bucket)
        elif "." in bucket:
            self._base = httpx.URL(f"https://s3.{region}.amazonaws.com/{bucket}")
        else:
            self._base = httpx.URL(f"https://{bucket}.s3.{region}.amazonaws.com")
        self._base_path = self._base.raw_path.split(b"?", 1)[0].decode("ascii").rstrip("/")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        **opts: Any,
    ) -> S3Backend:
        parts = urllib.parse.urlsplit(url)
        env = os.environ
        key_id = access_key_id or env.get("AWS_ACCESS_KEY_ID")
        secret = secret_access_key or env.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"storage {redact(url)}: no S3 credentials",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                "credentials) in the agent's environment, or pass them as options",
            )
        return cls(
            parts.netloc,
            normalise_root(urllib.parse.unquote(parts.path)),
            credentials=Credentials(key_id, secret, session_token or env.get("AWS_SESSION_TOKEN") or None),
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            **opts,
        )

    # -- the interface -------------------------------------------------------------------------------

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        key = self._root + check_name(name)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")
        self._request(
            "PUT",
            key,
            "put",
            name,
            payload=data,
            headers={"Content-Type": content_type, "Content-MD5": md5},
            ok=(200,),
        )

    def get(self, name: str) -> bytes:
        return self._request("GET", self._root + check_name(name), "get", name, ok=(200,)).content

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        names: list[str] = []
        token = ""
        while True:
            query = [
                ("list-type", "2"),
                ("prefix", self._root + prefix),
                ("max-keys", str(self.list_page_size)),
            ]
            if token:
                query.append(("continuation-token", token))
            resp = self._request("GET", None, "list", prefix, query=query, ok=(200,))
            root = _xml(resp, "list", prefix)
            for el in root.iterfind("{*}Contents/{*}Key"):
                key = el.text or ""
                if key.startswith(self._root):
                    names.append(key[len(self._root) :])
            truncated = (root.findtext("{*}IsTruncated") or "").strip().lower() == "true"
            token = (root.findtext("{*}NextContinuationToken") or "").strip()
            if not truncated or not token:
                return sorted(names)

    def delete(self, name: str) -> None:
        # S3 answers 204 for a key that does not exist, too: delete is idempotent by itself.
        self._request("DELETE", self._root + check_name(name), "delete", name, ok=(200, 204))

    def close(self) -> None:
        self._client.close()

    # -- extras (not part of BlobBackend) ------------------------------------------------------------

    def create_bucket(self) -> None:
        """Create the bucket (for setup scripts and tests); an existing bucket of ours is fine."""
        body = b""
        if self.region != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        try:
            self._request("PUT", None, "create bucket", self.bucket, payload=body, ok=(200,))
        except BlobError as exc:
            if "BucketAlreadyOwnedByYou" not in exc.message:
                raise

    def presigned_url(self, name: str, method: str = "GET", expires: int = 3600) -> str:
        """A presigned URL for one object, to hand to a holder of no credentials (see :func:`presign`)."""
        url = self._url(self._root + check_name(name), [])
        return presign(method, url, self._credentials, self.region, expires, now=self._clock())

    def download_url(self, name: str, expires_s: int) -> str:
        return self.presigned_url(name, "GET", expires_s)

    # -- HTTP ----------------------------------------------------------------------------------------

    def _url(self, key: str | None, query: _Query) -> httpx.URL:
        path = self._base_path + ("/" + uri_encode(key, keep_slash=True) if key is not None else "")
        return self._base.copy_with(path=path or "/", query=canonical_query(query).encode("ascii") or None)

    def _request(
        self,
        method: str,
        key: str | None,
        op: str,
        name: str,
        *,
        query: _Query | None = None,
        payload: bytes = b"",
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...],
    ) -> httpx.Response:
        url = self._url(key, query or [])
        signed = sign_headers(
            method, url, payload, self._credentials, self.region, headers=headers, now=self._clock()
        )
        content: Any = None
        if payload or method == "PUT":
            signed["Content-Length"] = str(len(payload))  # not signed: httpx would add it anyway
            content = request_body(payload, self.throttle) if op == "put" else payload
        try:
            resp = self._client.request(method, url, headers=signed, content=content)
        except httpx.HTTPError as exc:
            raise transport_error(exc, _SERVICE, op, name, url) from None
        if resp.status_code in ok:
            return resp
        raise self._status_error(resp, op, name)

    def _status_error(self, resp: httpx.Response, op: str, name: str) -> BlobError:
        status = resp.status_code
        code, detail, request_id = _error_details(resp)
        where = f"{_SERVICE} {op} {name!r} at {redact(str(resp.request.url))}"
        said = _SIG_RE.sub(r"\1=REDACTED", f"HTTP {status} {code}: {detail}".rstrip(": "))
        if request_id:
            said += f" (request id {request_id})"
        if code == "RequestTimeTooSkewed":
            # Common on devices that boot without a real-time clock: NTP usually fixes it within
            # minutes, so this one is worth retrying.
            return BlobError(
                ErrorCode.BLOB_ACCESS_DENIED,
                f"{where}: the device's clock differs from the server's by more than 15 minutes; {said}",
                "fix the device's time synchronisation (NTP)",
                retryable=True,
            )
        if status in (401, 403) or code in _AUTH_CODES:
            why, hint = _AUTH_CODES.get(code, _AUTH_CODES["AccessDenied"])
            need = _PERMISSION.get(op, op)
            return BlobError(
                ErrorCode.BLOB_ACCESS_DENIED,
                f"{where}: {why.format(need=need)}; {said}",
                hint.format(need=need, bucket=self.bucket),
            )
        if code in _REGION_CODES:
            return BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"{where}: the bucket is in another region than {self.region}; {said}",
                "set the bucket's region (AWS_REGION or the region option)",
            )
        if status == 404 and code == "NoSuchBucket":
            return BlobError(
                ErrorCode.BLOB_CONTAINER_NOT_FOUND,
                f"{where}: the bucket does not exist; {said}",
                "create the bucket, or fix its name in the storage URL",
            )
        if status == 404:
            return BlobError(ErrorCode.BLOB_NOT_FOUND, f"{where}: no such object; {said}")
        # 400 RequestTimeout: S3 gave up waiting for a slow body (a thin uplink): send it again.
        retryable = is_retryable_status(status) or code in ("RequestTimeout", "SlowDown", "InternalError")
        return BlobError(
            ErrorCode.BLOB_UNAVAILABLE if retryable else ErrorCode.BLOB_REQUEST_FAILED,
            f"{where}: {said}",
            "the operation is retried" if retryable else "see the message; report it if it persists",
            retryable=retryable,
        )


#: S3 error code -> (what is wrong, what to do).
_AUTH_CODES: dict[str, tuple[str, str]] = {
    "AccessDenied": (
        "the credentials are not allowed to do this (it needs {need})",
        "grant {need} on bucket {bucket} to the device's credentials",
    ),
    "SignatureDoesNotMatch": (
        "the request signature does not match: the secret access key is wrong",
        "check AWS_SECRET_ACCESS_KEY (it must belong to AWS_ACCESS_KEY_ID)",
    ),
    "InvalidAccessKeyId": (
        "the access key id is unknown to the server",
        "check AWS_ACCESS_KEY_ID, and that the key is active on this server",
    ),
    "ExpiredToken": (
        "the session token has expired",
        "refresh the temporary credentials (AWS_SESSION_TOKEN)",
    ),
    "InvalidToken": (
        "the session token is malformed or invalid",
        "refresh the temporary credentials (AWS_SESSION_TOKEN)",
    ),
}

_SIG_RE = re.compile(r"(?i)\b(signature|x-amz-signature|x-amz-security-token)=[^&\s\"'<,]*")


def _xml(resp: httpx.Response, op: str, name: str) -> ET.Element:
    try:
        return ET.fromstring(resp.content)
    except ET.ParseError as exc:
        raise BlobError(
            ErrorCode.BLOB_UNAVAILABLE,
            f"{_SERVICE} {op} {name!r}: the response is not valid XML ({exc})",
            "a proxy between the device and the server may be interfering; the operation is retried",
            retryable=True,
        ) from None


def _error_details(resp: httpx.Response) -> tuple[str, str, str]:
    """(error code, first line of the message, request id) from S3's XML error body."""
    code = detail = ""
    request_id = resp.headers.get("x-amz-request-id", "")
    if resp.content:
        try:
            root = ET.fromstring(resp.content)
            code = root.findtext("Code") or ""
            message = (root.findtext("Message") or "").strip()
            detail = message.splitlines()[0] if message else ""
            request_id = request_id or root.findtext("RequestId") or ""
        except ET.ParseError:
            text = resp.text.strip()
            detail = text.splitlines()[0][:200] if text else ""
    return code or resp.reason_phrase, detail, request_id
