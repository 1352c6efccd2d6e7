"""cloud_sync under faults, on real sockets: a proxy in front of Azurite and moto answers 500, stalls
past the client's timeout or resets the connection; expired and insufficient SAS tokens, missing
containers, crashed block uploads resumed without sending the uploaded blocks again, and the SAS
signature kept out of every log line and error message."""

from __future__ import annotations

import logging
import os
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest_blob import Azurite, FaultProxy, MotoS3, fail_times

from cloud_sync.base import BlobBackend
from cloud_sync.factory import open_backend
from edge_core.errors import BlobError, ErrorCode

BLOCK = 256 << 10
#: Seven blocks: six whole ones and a short last one.
BIG = os.urandom(6 * BLOCK + 100)
FAST_RETRY: dict[str, Any] = {"retries": 3, "backoff_min": 0.01, "backoff_max": 0.05}


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


class Proxied:
    """A fresh container (or bucket) behind a FaultProxy; ``open`` makes backends that go through it."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.store = f"f-{uuid.uuid4().hex[:12]}"
        self.opened: list[BlobBackend] = []
        if kind == "azure":
            self.azurite: Azurite = request.getfixturevalue("azurite")
            self.azurite.create_container(self.store)
            self.proxy = FaultProxy(("127.0.0.1", self.azurite.port)).start()
        else:
            self.moto: MotoS3 = request.getfixturevalue("moto")
            self.proxy = FaultProxy(("127.0.0.1", self.moto.port)).start()
            self.open(retries=0).create_bucket()  # type: ignore[attr-defined]

    def url(self, **sas: object) -> str:
        if self.kind == "azure":
            return self.azurite.container_url(self.store, base=self.proxy.origin, **sas)  # type: ignore[arg-type]
        return f"s3://{self.store}/p"

    def open(self, url: str | None = None, **opts: Any) -> BlobBackend:
        base: dict[str, Any] = {"retries": 0, "timeout": 5.0}
        if self.kind == "azure":
            base.update(block_size=BLOCK)
        else:
            base.update(
                endpoint_url=self.proxy.origin,
                access_key_id=self.moto.credentials.access_key_id,
                secret_access_key=self.moto.credentials.secret_access_key,
            )
        backend = open_backend(url or self.url(), **{**base, **opts})
        self.opened.append(backend)
        return backend

    def close(self) -> None:
        for b in self.opened:
            b.close()
        self.proxy.stop()


@pytest.fixture
def proxied(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Proxied]]:
    made: list[Proxied] = []

    def make(kind: str) -> Proxied:
        p = Proxied(kind, request)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# -- transient faults: retryable, and retried -------------------------------------------------------


@pytest.mark.parametrize("kind", ["azure", "s3"])
def test_500_is_retryable_and_retried(proxied: Callable[[str], Proxied], kind: str) -> None:
    p = proxied(kind)
    p.proxy.fault = fail_times(1, "500", "PUT")
    with pytest.raises(BlobError) as ei:
        p.open().put("x", b"data")
    assert ei.value.code == ErrorCode.BLOB_UNAVAILABLE and ei.value.retryable
    assert "HTTP 500" in ei.value.message

    p.proxy.reset()
    p.proxy.fault = fail_times(2, "500", "PUT")
    backend = p.open(**FAST_RETRY)
    backend.put("x", b"data")
    assert p.proxy.count("PUT") == 3  # two 500s, then the upload that stuck
    assert backend.get("x") == b"data"
    assert backend.list() == ["x"]  # retried, not duplicated


@pytest.mark.parametrize("kind", ["azure", "s3"])
@pytest.mark.parametrize("fault", ["stall", "reset"])
def test_timeout_and_connection_reset_are_retryable_and_retried(
    proxied: Callable[[str], Proxied], kind: str, fault: str
) -> None:
    p = proxied(kind)
    p.proxy.fault = fail_times(1, fault, "PUT")
    with pytest.raises(BlobError) as ei:
        p.open(timeout=0.5).put("x", b"data")
    assert ei.value.code == ErrorCode.BLOB_UNAVAILABLE and ei.value.retryable
    assert ("timed out" if fault == "stall" else "Error") in ei.value.message

    p.proxy.fault = fail_times(1, fault, "GET")
    backend = p.open(timeout=0.5, **FAST_RETRY)
    backend.put("x", b"data")
    assert backend.get("x") == b"data"  # the first GET failed, the second got through
    assert p.proxy.count("GET") >= 2


# -- Azure: credentials and containers --------------------------------------------------------------


def test_azure_expired_sas_is_403_not_retried_with_a_clear_message(proxied: Callable[[str], Proxied]) -> None:
    p = proxied("azure")
    backend = p.open(p.url(expiry=timedelta(hours=-1)), **FAST_RETRY)
    with pytest.raises(BlobError) as ei:
        backend.put("x", b"data")
    err = ei.value
    assert err.code == ErrorCode.BLOB_ACCESS_DENIED and not err.retryable
    assert "SAS token expired at" in err.message and "HTTP 403" in err.message
    assert "issue a new SAS URL" in err.hint
    assert p.proxy.count("PUT") == 1  # not retried: it cannot succeed
    for call in (backend.list, lambda: backend.get("x")):
        with pytest.raises(BlobError) as ei:
            call()
        assert ei.value.code == ErrorCode.BLOB_ACCESS_DENIED


def test_azure_sas_without_write_permission(proxied: Callable[[str], Proxied]) -> None:
    p = proxied("azure")
    read_only = p.open(p.url(permissions="rl"))
    with pytest.raises(BlobError) as ei:
        read_only.put("x", b"data")
    assert ei.value.code == ErrorCode.BLOB_ACCESS_DENIED and not ei.value.retryable
    assert "has expired or lacks write (w) permission" in ei.value.message and "sp=rl" in ei.value.message
    assert "issue a new SAS URL" in ei.value.hint
    assert read_only.list() == []  # what it may do still works

    # A write-only device credential: the block upload cannot ask which blocks are there (that needs
    # read), so it sends them all, and still succeeds.
    write_only = p.open(p.url(permissions="cw"))
    write_only.put("big", BIG)
    with pytest.raises(BlobError) as ei:
        write_only.get("big")
    assert ei.value.code == ErrorCode.BLOB_ACCESS_DENIED and "read (r)" in ei.value.message
    assert p.open().get("big") == BIG


def test_azure_missing_container_is_404_not_retryable(proxied: Callable[[str], Proxied]) -> None:
    p = proxied("azure")
    backend = p.open(p.azurite.container_url("no-such-container", base=p.proxy.origin), **FAST_RETRY)
    for call in (
        lambda: backend.put("x", b"small"),
        lambda: backend.put("x", BIG),  # the block path asks Get Block List first: also a 404
        backend.list,
        lambda: backend.get("x"),
    ):
        with pytest.raises(BlobError) as ei:
            call()
        assert ei.value.code == ErrorCode.BLOB_CONTAINER_NOT_FOUND and not ei.value.retryable
        assert "create the container" in ei.value.hint
    assert p.proxy.count("PUT") == 1  # none of them was retried


# -- Azure: block uploads resume -------------------------------------------------------------------


def test_azure_crashed_block_upload_resumes_without_resending_blocks(
    proxied: Callable[[str], Proxied],
) -> None:
    p = proxied("azure")
    # The connection dies during the 4th Put Block: blocks 0-2 are on the service, uncommitted.
    p.proxy.fault = _nth_put_block(4, "reset")
    with pytest.raises(BlobError) as ei:
        p.open().put("batch/1.bin", BIG)
    assert ei.value.retryable
    assert p.proxy.count("PUT", "comp=block&") == 4

    # The agent restarts: a new backend, the same name and bytes. Only blocks 3-6 travel again.
    p.proxy.reset()
    backend = p.open()
    backend.put("batch/1.bin", BIG)
    assert p.proxy.count("GET", "comp=blocklist") == 1
    assert p.proxy.count("PUT", "comp=block&") == 4
    assert p.proxy.count("PUT", "comp=blocklist") == 1
    assert backend.get("batch/1.bin") == BIG

    # The commit's answer was lost and the put is repeated: every block is already committed.
    p.proxy.reset()
    backend.put("batch/1.bin", BIG)
    assert p.proxy.count("PUT", "comp=block&") == 0
    assert backend.get("batch/1.bin") == BIG
    assert backend.list() == ["batch/1.bin"]


def test_azure_block_upload_resumes_within_retries(proxied: Callable[[str], Proxied]) -> None:
    p = proxied("azure")
    p.proxy.fault = _nth_put_block(5, "500")
    p.open(**FAST_RETRY).put("b", BIG)
    # 7 blocks + the one that failed; the retry skipped the 4 blocks that had been uploaded.
    assert p.proxy.count("PUT", "comp=block&") == 8
    assert p.open().get("b") == BIG


def test_azure_retry_with_other_bytes_never_commits_stale_blocks(proxied: Callable[[str], Proxied]) -> None:
    p = proxied("azure")
    p.proxy.fault = _nth_put_block(4, "reset")
    with pytest.raises(BlobError):
        p.open().put("same-name", BIG)
    p.proxy.reset()
    other = os.urandom(len(BIG))  # same name, same size, other bytes (a batch rebuilt after a crash)
    backend = p.open()
    backend.put("same-name", other)
    assert p.proxy.count("PUT", "comp=block&") == 7  # no block of the old bytes was reused
    assert backend.get("same-name") == other


def _nth_put_block(n: int, action: str) -> Callable[[str, str], str | None]:
    seen = [0]

    def fault(method: str, path: str) -> str | None:
        if method == "PUT" and "comp=block&" in path:
            seen[0] += 1
            if seen[0] == n:
                return action
        return None

    return fault


# -- the SAS token stays secret ---------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)
        self.lines.append(f"{record.getMessage()} {getattr(record, 'fields', {})}")


def test_no_log_line_or_error_message_contains_the_sas_signature(
    proxied: Callable[[str], Proxied], tmp_path: Path
) -> None:
    p = proxied("azure")
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in ("edge", "httpx")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.DEBUG)
    errors: list[BlobError] = []
    urls = [p.url(), p.url(expiry=timedelta(hours=-1)), p.url(permissions="rl")]
    try:
        p.proxy.fault = fail_times(1, "500", "PUT")
        ok = p.open(urls[0], **FAST_RETRY)
        ok.put("x", b"data")  # a retry: logged with the error message
        p.proxy.fault = _nth_put_block(2, "reset")
        ok.put("big", BIG)  # a resumed block upload: logged too
        cases: list[tuple[str, Callable[[BlobBackend], object]]] = [
            (urls[1], lambda b: b.put("x", b"1")),  # expired
            (urls[2], lambda b: b.put("x", b"1")),  # no write permission
            (urls[0], lambda b: b.get("missing")),  # 404 blob
            (p.azurite.container_url("nope", base=p.proxy.origin), lambda b: b.list()),  # 404 container
        ]
        for url, call in cases:
            with pytest.raises(BlobError) as ei:
                call(p.open(url, **FAST_RETRY))
            errors.append(ei.value)
        p.proxy.fault = fail_times(10, "stall", "GET")
        with pytest.raises(BlobError) as ei:
            p.open(urls[0], timeout=0.3, retries=1, backoff_min=0.01, backoff_max=0.02).get("x")
        errors.append(ei.value)
    finally:
        for lg, level in saved:
            lg.removeHandler(collect)
            lg.setLevel(level)

    assert "httpx" in collect.names and "edge.cloud_sync" in collect.names  # both were really listened to
    assert any("blob.retry" in line for line in collect.lines)
    assert any("blob.put_resumed" in line for line in collect.lines)
    texts = collect.lines + [f"{e} {e.hint} {e!r} {e.as_dict()}" for e in errors]
    secrets = set()
    for url in urls:
        sig = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["sig"][0]
        secrets |= {sig, urllib.parse.quote(sig, safe="")}
    for text in texts:
        assert "sig=" not in text, text
        assert not any(s in text for s in secrets), text
    assert {e.code for e in errors} == {
        ErrorCode.BLOB_ACCESS_DENIED,
        ErrorCode.BLOB_NOT_FOUND,
        ErrorCode.BLOB_CONTAINER_NOT_FOUND,
        ErrorCode.BLOB_UNAVAILABLE,
    }
