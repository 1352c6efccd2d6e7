"""cloud_sync: one shared test body over every backend, against real servers (a directory, Azurite,
moto's S3 server with SigV4 authentication enforced), plus each backend's own edge cases.

Fault injection (timeouts, resets, 500s, resumed block uploads, expired SAS) is in
test_cloud_sync_faults.py.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest_blob import Azurite, MotoS3

from cloud_sync.azure import AzureBackend
from cloud_sync.base import BlobBackend
from cloud_sync.factory import open_backend
from cloud_sync.local import TMP_PREFIX, LocalBackend
from cloud_sync.pacing import TokenBucket
from cloud_sync.retry import RetryingBackend
from cloud_sync.s3 import Credentials, S3Backend, presign, sign_headers, uri_encode
from edge_core.errors import BlobError, ErrorCode

KINDS = ["local", "azure", "s3"]

#: Small blocks, so that a 1.3 MiB blob goes through Put Block / Put Block List in 6 blocks.
AZURE_BLOCK = 256 << 10


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


OpenFn = Callable[..., BlobBackend]


@pytest.fixture
def make_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[str], tuple[str, OpenFn]]]:
    """make(kind) -> (url, open): a fresh, empty store of that kind and a function that opens it with
    open_backend(url, **opts). Servers start only for the kinds a test uses."""
    opened: list[BlobBackend] = []

    def make(kind: str) -> tuple[str, OpenFn]:
        store = f"t-{uuid.uuid4().hex[:12]}"
        defaults: dict[str, Any] = {"retries": 0, "timeout": 10.0}
        if kind == "local":
            root = tmp_path / store
            root.mkdir()
            url = root.as_uri()
            defaults.pop("timeout")
        elif kind == "azure":
            azurite: Azurite = request.getfixturevalue("azurite")
            azurite.create_container(store)
            url = azurite.container_url(store)
            defaults.update(block_size=AZURE_BLOCK, list_page_size=2)
        else:
            moto: MotoS3 = request.getfixturevalue("moto")
            url = f"s3://{store}/edge/dev-001"
            defaults.update(
                endpoint_url=moto.endpoint,
                access_key_id=moto.credentials.access_key_id,
                secret_access_key=moto.credentials.secret_access_key,
                list_page_size=2,
            )
            setup = open_backend(url, **defaults)
            assert isinstance(setup, S3Backend)
            setup.create_bucket()  # a signed request of our own client
            setup.close()

        def open_(**opts: object) -> BlobBackend:
            backend = open_backend(url, **{**defaults, **opts})
            opened.append(backend)
            return backend

        return url, open_

    yield make
    for b in opened:
        b.close()


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, make_backend: Callable[[str], tuple[str, OpenFn]]) -> BlobBackend:
    return make_backend(request.param)[1]()


# -- the shared test body ---------------------------------------------------------------------------

ODD = "odd/a b+c=d%e~é,(1).json"  # spaces, '+', '=', '%', non-ASCII: percent-encoding and signing


def test_contract(backend: BlobBackend) -> None:
    assert backend.list() == []

    backend.put("a.txt", b"hello", "text/plain")
    assert backend.get("a.txt") == b"hello"

    backend.put("a.txt", b"world!")  # the same name overwrites: a retried upload never duplicates
    assert backend.get("a.txt") == b"world!"
    assert backend.list() == ["a.txt"]

    names = {"a.txt", "dir/sub/x.bin", "dir/y.bin", "dir2/z", ODD, "empty"}
    for n in sorted(names - {"a.txt"}):
        backend.put(n, n.encode() if n != "empty" else b"")
    assert backend.get("empty") == b""
    assert backend.get(ODD) == ODD.encode()
    assert backend.get("dir/sub/x.bin") == b"dir/sub/x.bin"

    # Listing sees exactly what was put, sorted, paging included (pages of 2 for Azure and S3).
    assert backend.list() == sorted(names)
    assert backend.list("dir/") == ["dir/sub/x.bin", "dir/y.bin"]
    assert backend.list("dir") == ["dir/sub/x.bin", "dir/y.bin", "dir2/z"]
    assert backend.list("odd/a b") == [ODD]
    assert backend.list("nothing/") == []

    # Large data: Azure's block path (6 blocks of 256 KiB), a 1.3 MiB object for S3 and local.
    big = os.urandom(5 * AZURE_BLOCK + 12345)
    backend.put("big/blob.bin", big)
    assert backend.get("big/blob.bin") == big
    # Overwritten with other bytes of another size: nothing of the old blocks may survive.
    big2 = os.urandom(4 * AZURE_BLOCK + 1)
    backend.put("big/blob.bin", big2)
    assert backend.get("big/blob.bin") == big2
    assert backend.list("big/") == ["big/blob.bin"]

    backend.delete("a.txt")
    with pytest.raises(BlobError) as ei:
        backend.get("a.txt")
    assert ei.value.code == ErrorCode.BLOB_NOT_FOUND and not ei.value.retryable
    backend.delete("a.txt")  # deleting what is gone succeeds: a retried delete does too
    assert "a.txt" not in backend.list()

    for n in backend.list():
        backend.delete(n)
    assert backend.list() == []


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/../../x", "/abs", "a//b", "a/", "./a", "a\\b", "a\x00b", "é" * 600]
)
def test_names_that_could_escape_or_be_rewritten_are_refused_everywhere(
    make_backend: Callable[[str], tuple[str, OpenFn]], bad: str
) -> None:
    for kind in KINDS:
        backend = make_backend(kind)[1]()
        for op in ("put", "get", "delete"):
            with pytest.raises(BlobError) as ei:
                if op == "put":
                    backend.put(bad, b"x")
                else:
                    getattr(backend, op)(bad)
            assert ei.value.code == ErrorCode.BLOB_INVALID_NAME and not ei.value.retryable, kind
    with pytest.raises(BlobError) as ei:
        make_backend("local")[1]().list("../")
    assert ei.value.code == ErrorCode.BLOB_INVALID_NAME


@pytest.mark.parametrize("kind", KINDS)
def test_bandwidth_cap_paces_put(make_backend: Callable[[str], tuple[str, OpenFn]], kind: str) -> None:
    n, rate, burst = 384 << 10, 512 << 10, 64 << 10
    bucket = TokenBucket(rate, burst=burst)
    backend = make_backend(kind)[1](bandwidth=bucket)
    data = os.urandom(n)
    t0 = time.monotonic()
    backend.put("capped.bin", data)
    elapsed = time.monotonic() - t0
    # A lower bound only: the first `burst` bytes may leave at once, the rest at `rate`.
    assert elapsed >= 0.95 * (n - burst) / rate, elapsed
    assert backend.get("capped.bin") == data


def test_bandwidth_cap_is_shared_between_backends(make_backend: Callable[[str], tuple[str, OpenFn]]) -> None:
    rate, burst = 512 << 10, 64 << 10
    bucket = TokenBucket(rate, burst=burst)
    a = make_backend("local")[1](bandwidth=bucket)
    b = make_backend("local")[1](bandwidth=bucket)
    t0 = time.monotonic()
    a.put("x", bytes(192 << 10))
    b.put("y", bytes(192 << 10))
    assert time.monotonic() - t0 >= 0.95 * ((384 << 10) - burst) / rate


# -- open_backend ------------------------------------------------------------------------------------


def test_open_backend_picks_by_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_backend(str(tmp_path), retries=0), LocalBackend)
    assert isinstance(open_backend(tmp_path.as_uri(), retries=0), LocalBackend)
    assert isinstance(open_backend(tmp_path.as_uri()), RetryingBackend)
    sas = "sv=2021-12-02&sr=c&sp=rw&se=2030-01-01T00%3A00%3A00Z&sig=abc%2Bdef%3D"
    az = open_backend(f"https://acct.blob.core.windows.net/cont/some/prefix?{sas}", retries=0)
    assert isinstance(az, AzureBackend)
    assert str(az._blob_url("some/prefix/x y")).startswith(
        "https://acct.blob.core.windows.net/cont/some/prefix/x%20y?sv=2021-12-02&"
    )
    assert "sig=abc%2Bdef%3D" in str(az._blob_url("n"))  # the SAS survives, encoded as it came
    azurite_style = open_backend(f"http://127.0.0.1:10000/devstoreaccount1/cont?{sas}", retries=0)
    assert isinstance(azurite_style, AzureBackend)
    assert str(azurite_style._blob_url("n")).startswith("http://127.0.0.1:10000/devstoreaccount1/cont/n?")
    compose = open_backend(f"http://azurite:10000/devstoreaccount1/cont?{sas}", retries=0)  # a service name
    assert str(compose._blob_url("n")).startswith("http://azurite:10000/devstoreaccount1/cont/n?")  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    s3 = open_backend("s3://my-bucket/edge/", retries=0)
    assert isinstance(s3, S3Backend) and s3.region == "eu-west-1"
    assert str(s3._url("edge/x", [])) == "https://my-bucket.s3.eu-west-1.amazonaws.com/edge/x"
    s3 = open_backend("s3://my-bucket", retries=0, endpoint_url="http://minio:9000")
    assert isinstance(s3, S3Backend)
    assert str(s3._url("x", [])) == "http://minio:9000/my-bucket/x"  # path-style for custom endpoints


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://host/x", "unknown scheme"),
        ("https://example.com/container", "SAS"),
        ("https://acct.blob.core.windows.net/cont", "SAS token"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Credential=x", "presigned"),
        ("file://otherhost/x", "local path"),
        ("s3://b/x", "credentials"),
        ("s3://Bad_Bucket/x", "bucket name"),
        ("https://acct.blob.core.windows.net/?sv=1&sig=2", "no container"),
    ],
)
def test_open_backend_refuses_unusable_urls(url: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    if "Bad_Bucket" in url:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    with pytest.raises(BlobError) as ei:
        open_backend(url)
    assert ei.value.code == ErrorCode.BLOB_CONFIG_INVALID and not ei.value.retryable
    assert words in str(ei.value)
    assert "sig=" not in str(ei.value) and "Signature=" not in str(ei.value)


def test_open_backend_refuses_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(BlobError) as ei:
        open_backend(str(tmp_path), block_size=5)
    assert ei.value.code == ErrorCode.BLOB_CONFIG_INVALID and "block_size" in ei.value.message


# -- local directory ---------------------------------------------------------------------------------


def test_local_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    backend = LocalBackend(root, create=True)
    backend.put("a/b.bin", b"old")

    class Boom(TokenBucket):
        def take(self, n: int) -> None:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                raise RuntimeError("power cut")

    interrupted = LocalBackend(root, throttle=Boom(1e12))
    with pytest.raises(RuntimeError):
        interrupted.put("a/b.bin", bytes(1 << 20))  # dies after two 64 KiB pieces were written
    assert backend.get("a/b.bin") == b"old"  # the name still holds the old bytes, whole
    assert [p.name for p in (root / "a").iterdir()] == ["b.bin"]  # and no temporary file is left
    assert backend.list() == ["a/b.bin"]


def test_local_listing_skips_temporary_files_and_refuses_their_names(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("d/x", b"1")
    (tmp_path / "d" / f"{TMP_PREFIX}x.123").write_bytes(b"half")  # a crashed put's leftover
    assert backend.list() == ["d/x"]
    with pytest.raises(BlobError) as ei:
        backend.put(f"d/{TMP_PREFIX}y", b"")
    assert ei.value.code == ErrorCode.BLOB_INVALID_NAME


def test_local_missing_root_is_container_not_found(tmp_path: Path) -> None:
    backend = open_backend((tmp_path / "unmounted").as_uri(), retries=0)
    for call in (lambda: backend.put("x", b""), lambda: backend.get("x"), backend.list):
        with pytest.raises(BlobError) as ei:
            call()
        assert ei.value.code == ErrorCode.BLOB_CONTAINER_NOT_FOUND and not ei.value.retryable
    assert not (tmp_path / "unmounted").exists()  # never created behind the operator's back
    created = open_backend((tmp_path / "made").as_uri(), retries=0, create=True)
    created.put("x", b"1")
    assert created.list() == ["x"]


def test_local_delete_prunes_empty_directories_and_name_collisions_are_refused(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("2026/11/25/batch-1", b"1")
    backend.put("2026/11/keep", b"2")
    backend.delete("2026/11/25/batch-1")
    assert not (tmp_path / "2026" / "11" / "25").exists()
    assert (tmp_path / "2026" / "11" / "keep").exists()
    with pytest.raises(BlobError) as ei:
        backend.put("2026/11/keep/child", b"3")  # 'keep' is a blob, it cannot be a directory too
    assert ei.value.code == ErrorCode.BLOB_REQUEST_FAILED and "collide" in ei.value.message


def test_local_read_only_directory_is_access_denied(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(BlobError) as ei:
            LocalBackend(root).put("x", b"1")
        assert ei.value.code == ErrorCode.BLOB_ACCESS_DENIED and not ei.value.retryable
    finally:
        root.chmod(0o700)


# -- S3 ----------------------------------------------------------------------------------------------


def test_sigv4_matches_the_aws_documentation_examples() -> None:
    # "Signature Calculations for the Authorization Header" and "Authenticating Requests: Using Query
    # Parameters" (Amazon S3 API reference): GET Object with a Range header, and a presigned GET.
    creds = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    now = datetime(2013, 5, 24, tzinfo=UTC)
    url = httpx.URL("https://examplebucket.s3.amazonaws.com/test.txt")
    headers = sign_headers("GET", url, b"", creds, "us-east-1", headers={"Range": "bytes=0-9"}, now=now)
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert presign("GET", url, creds, "us-east-1", 86400, now=now).endswith(
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )
    assert repr(creds) == "Credentials(access_key_id='AKIAIOSFODNN7EXAMPLE')"  # the secret never prints


def _s3(moto: MotoS3, bucket: str, creds: Credentials | None = None, **opts: object) -> S3Backend:
    return S3Backend(bucket, "", credentials=creds or moto.credentials, endpoint_url=moto.endpoint, **opts)  # type: ignore[arg-type]


def test_s3_wrong_secret_or_unknown_key_is_403_and_not_retried(moto: MotoS3) -> None:
    good = _s3(moto, "creds-bucket")
    good.create_bucket()
    cases = [
        (Credentials(moto.credentials.access_key_id, "not-the-secret"), "secret access key is wrong"),
        (Credentials("AKIDUNKNOWN000000000", "x"), "access key id is unknown"),
    ]
    for creds, words in cases:
        backend = _s3(moto, "creds-bucket", creds)
        with pytest.raises(BlobError) as ei:
            backend.put("x", b"1")
        assert ei.value.code == ErrorCode.BLOB_ACCESS_DENIED and not ei.value.retryable
        assert words in ei.value.message, ei.value.message
        assert "not-the-secret" not in str(ei.value)
        backend.close()
    good.put("x", b"1")
    assert good.get("x") == b"1"
    good.close()


def test_s3_missing_bucket_is_not_retryable(moto: MotoS3) -> None:
    backend = _s3(moto, "no-such-bucket-here")
    for call in (lambda: backend.put("x", b"1"), backend.list, lambda: backend.get("x")):
        with pytest.raises(BlobError) as ei:
            call()
        assert ei.value.code == ErrorCode.BLOB_CONTAINER_NOT_FOUND and not ei.value.retryable
        assert "create the bucket" in ei.value.hint
    backend.close()


def test_presigned_urls_match_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto cannot check query-signed requests while IAM authentication is on, so presigned URLs are
    # compared with botocore's (installed with moto; never on the device) besides the AWS example.
    auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    monkeypatch.setattr(auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    for token in (None, "FQoGZXIvYXdzEXAMPLETOKEN/+="):
        creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
        for method, key in (("GET", "a/b.json"), ("PUT", ODD)):
            url = f"http://127.0.0.1:9000/bucket/{uri_encode(key, keep_slash=True)}"
            ours = presign(method, url, creds, "eu-west-1", 300, now=now)
            request = AWSRequest(method=method, url=url)
            auth.S3SigV4QueryAuth(
                BotoCredentials(creds.access_key_id, creds.secret_access_key, token),
                "s3",
                "eu-west-1",
                expires=300,
            ).add_auth(request)
            theirs = dict(httpx.URL(request.url).params)
            assert dict(httpx.URL(ours).params) == theirs, (method, key, token)


# -- retries (unit) ----------------------------------------------------------------------------------


class _Flaky:
    """A stand-in backend for the retry wrapper's unit tests: fails ``n`` times, then succeeds."""

    def __init__(self, n: int, retryable: bool = True) -> None:
        self.n, self.calls, self.retryable = n, 0, retryable

    def put(self, name: str, data: bytes, content_type: str = "") -> None:
        self.calls += 1
        if self.calls <= self.n:
            raise BlobError(ErrorCode.BLOB_UNAVAILABLE, "flaky", retryable=self.retryable)

    def get(self, name: str) -> bytes:
        return b""

    def list(self, prefix: str = "") -> list[str]:
        return []

    def delete(self, name: str) -> None:
        pass

    def download_url(self, name: str, expires_s: int) -> str:
        return name

    def close(self) -> None:
        pass


def test_retrying_backend_retries_only_retryable_errors_and_stops_when_told() -> None:
    flaky = _Flaky(2)
    RetryingBackend(flaky, retries=3, backoff_min=0.001, backoff_max=0.002).put("x", b"")
    assert flaky.calls == 3

    final = _Flaky(1, retryable=False)
    with pytest.raises(BlobError):
        RetryingBackend(final, retries=3, backoff_min=0.001).put("x", b"")
    assert final.calls == 1

    exhausted = _Flaky(10)
    with pytest.raises(BlobError):
        RetryingBackend(exhausted, retries=2, backoff_min=0.001, backoff_max=0.002).put("x", b"")
    assert exhausted.calls == 3

    stopping = _Flaky(10)
    t0 = time.monotonic()
    with pytest.raises(BlobError) as ei:
        RetryingBackend(
            stopping, retries=5, backoff_min=30, backoff_max=60, should_stop=lambda: stopping.calls >= 1
        ).put("x", b"")
    assert time.monotonic() - t0 < 1 and ei.value.retryable  # the 30 s backoff was cut short


def test_token_bucket_arithmetic() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(1000, burst=100, clock=lambda: now[0], sleep=sleep)
    bucket.take(100)  # the burst: free
    assert slept == []
    bucket.take(500)  # 500 bytes of debt at 1000 B/s
    assert slept == [pytest.approx(0.5)]
    now[0] += 10  # idle: credit refills only up to the burst
    bucket.take(300)
    assert slept[-1] == pytest.approx(0.2)
    with pytest.raises(BlobError):
        TokenBucket(0)
