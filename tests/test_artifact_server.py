"""The control plane's artifact endpoint (deploy/artifact_server.py), on a real loopback socket.

Devices resume interrupted downloads with Range and must never be able to read outside the
artifact store, so both are checked against the plain server, without the simulators' faults.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from deploy.artifact_server import ArtifactHandler, ArtifactServer, Body

DATA = os.urandom(50_000)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ArtifactServer]:
    with ArtifactServer(tmp_path / "root") as srv:
        srv.put("images/app-1.tar", DATA)
        yield srv


def _raw_get(srv: ArtifactServer, path: str) -> int:
    """GET ``path`` exactly as written: httpx would normalise ``..`` away before sending it."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_range_requests(server: ArtifactServer) -> None:
    url = server.url_for("images/app-1.tar")
    full = httpx.get(url)
    assert full.status_code == 200 and full.content == DATA
    assert full.headers["accept-ranges"] == "bytes"

    middle = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert middle.status_code == 206 and middle.content == DATA[100:200]
    assert middle.headers["content-range"] == f"bytes 100-199/{len(DATA)}"
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == DATA[-10:]
    resumed = httpx.get(url, headers={"Range": "bytes=49000-"})
    assert resumed.status_code == 206 and resumed.content == DATA[49000:]

    beyond = httpx.get(url, headers={"Range": f"bytes={len(DATA)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(DATA)}"
    several = httpx.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.content == DATA  # RFC 9110 lets us ignore it

    ranged = [(r.range, r.status, r.bytes_sent) for r in server.requests if r.range]
    assert ranged == [
        ("bytes=100-199", 206, 100),
        ("bytes=-10", 206, 10),
        ("bytes=49000-", 206, 1000),
        (f"bytes={len(DATA)}-", 416, 0),
        ("bytes=0-1,5-6", 200, len(DATA)),
    ]


def test_head(server: ArtifactServer) -> None:
    head = httpx.head(server.url_for("images/app-1.tar"))
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(DATA))
    assert head.headers["accept-ranges"] == "bytes" and "last-modified" in head.headers
    assert httpx.head(server.url_for("images/missing.tar")).status_code == 404
    assert server.counts("images/app-1.tar", "HEAD") == 1


def test_nothing_outside_the_root_is_served(server: ArtifactServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for devices")
    (server.root / "link.txt").symlink_to(secret)

    assert _raw_get(server, "/../secret.txt") == 404
    assert _raw_get(server, "/%2e%2e/secret.txt") == 404
    assert _raw_get(server, "/images/../../secret.txt") == 404
    assert _raw_get(server, "/link.txt") == 404  # a symlink out of the root is outside too
    assert _raw_get(server, "/images") == 404  # a directory is not a file
    assert _raw_get(server, "/") == 404
    assert _raw_get(server, "/images/app-1.tar") == 200
    with pytest.raises(ValueError, match="escapes the server root"):
        server.put("../secret.txt", b"overwritten")
    assert secret.read_text() == "not for devices"


class _Padded(Body):
    honours_range = False

    @property
    def size(self) -> int:
        return self.file_size + 1

    def send(self, handler: ArtifactHandler, start: int, stop: int) -> None:
        self.file.seek(start)
        handler.write_body(self.file.read(stop - start - 1) + b"!")


class _Hooked(ArtifactServer):
    """The hooks the simulators' fault injection builds on, used directly."""

    def _intercept(self, name: str) -> int | None:
        return 503 if name == "busy.tar" else None

    def _body(self, name: str, file: BinaryIO, file_size: int) -> Body:
        return _Padded(file, file_size) if name == "padded.tar" else super()._body(name, file, file_size)


def test_subclass_hooks(tmp_path: Path) -> None:
    with _Hooked(tmp_path) as srv:
        srv.put("padded.tar", b"abc")
        assert httpx.get(srv.url_for("busy.tar")).status_code == 503
        padded = httpx.get(srv.url_for("padded.tar"), headers={"Range": "bytes=1-"})
        assert padded.status_code == 200 and padded.content == b"abc!"
        assert [r.bytes_sent for r in srv.requests] == [4, 4]
