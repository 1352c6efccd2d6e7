"""The fetcher against real HTTP(S) servers: private-CA HTTPS, size cap, resume with a server that
ignores Range, and the retry budget."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.config import DownloadConfig
from agent.update.fetch import Fetcher
from deploy import pki
from edge_core.errors import DownloadError, ErrorCode
from simulators.bundle_server import BundleServer, Fault

DATA = bytes(range(256)) * 1024  # 256 KiB
SHA = hashlib.sha256(DATA).hexdigest()


def cfg(**kw: object) -> DownloadConfig:
    base: dict[str, object] = {"timeout": 5.0, "retries": 2, "backoff_min": 0.05, "backoff_max": 0.1}
    base.update(kw)
    return DownloadConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def tls_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca, ca_key = pki.create_ca("bundles-ca")
    cert, key = pki.issue_cert(ca, ca_key, "localhost", server=True, sans=["127.0.0.1", "localhost"])
    for name, data, private in (("ca.pem", ca, False), ("srv.pem", cert, False), ("srv.key", key, True)):
        pki.write_pem(tmp_path / name, data, private=private)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "b.tar").write_bytes(DATA)
    with BundleServer(tmp_path / "root", tls=(tmp_path / "srv.pem", tmp_path / "srv.key")) as srv:
        yield srv, tmp_path / "ca.pem"


def test_https_with_a_private_ca(tls_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv, ca = tls_server
    url = srv.url_for("b.tar")
    assert url.startswith("https://")
    f = Fetcher(cfg(ca=ca))
    try:
        assert f.fetch([url], tmp_path / "p", len(DATA)) == SHA
    finally:
        f.close()
    untrusting = Fetcher(cfg())  # the system roots do not know this CA: refused, never downloaded
    try:
        with pytest.raises(DownloadError) as ei:
            untrusting.fetch([url], tmp_path / "q", len(DATA))
    finally:
        untrusting.close()
    assert ei.value.code == ErrorCode.DOWNLOAD_FAILED and "CERTIFICATE_VERIFY_FAILED" in ei.value.message
    assert not (tmp_path / "q").exists() or (tmp_path / "q").stat().st_size == 0


def test_resume_against_a_server_that_ignores_range_restarts_cleanly(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "b.tar").write_bytes(DATA)
    with BundleServer(tmp_path / "root") as srv:
        srv.set_fault("b.tar", Fault(cut_after=100_000, cut_times=1, ignore_range=True))
        f = Fetcher(cfg())
        try:
            assert f.fetch([srv.url_for("b.tar")], tmp_path / "p", len(DATA)) == SHA
        finally:
            f.close()
        reqs = [r for r in srv.requests if r.name == "b.tar"]
    assert reqs[1].range == "bytes=100000-" and reqs[1].status == 200  # asked to resume, got it all
    assert (tmp_path / "p").read_bytes() == DATA  # not the prefix twice


def test_a_body_longer_than_declared_is_refused_before_it_is_written(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "b.tar").write_bytes(DATA)
    with BundleServer(tmp_path / "root") as srv:
        f = Fetcher(cfg())
        try:
            with pytest.raises(DownloadError) as ei:
                f.fetch([srv.url_for("b.tar")], tmp_path / "p", len(DATA) - 1)
        finally:
            f.close()
    assert ei.value.code == ErrorCode.SIZE_EXCEEDED
    assert not (tmp_path / "p").exists() or (tmp_path / "p").stat().st_size == 0


def test_file_urls(tmp_path: Path) -> None:
    (tmp_path / "b.tar").write_bytes(DATA)
    f = Fetcher(cfg())
    try:
        assert f.fetch([f"file://{tmp_path / 'b.tar'}"], tmp_path / "p", len(DATA)) == SHA
        with pytest.raises(DownloadError) as ei:
            f.fetch([f"file://{tmp_path / 'missing.tar'}"], tmp_path / "q", len(DATA))
    finally:
        f.close()
    assert ei.value.code == ErrorCode.DOWNLOAD_FAILED
