"""Real blob servers for tests/test_cloud_sync*.py: Azurite, moto's S3 server, and a misbehaving proxy.

- :class:`Azurite` runs ``node_modules/.bin/azurite-blob`` (the pinned version in package.json; install
  it with ``npm ci``) on a free loopback port, in its own process group, and makes SAS URLs signed with
  HMAC-SHA256 by the emulator's well-known account key, exactly as a real account key signs them.
- :class:`MotoS3` runs ``moto_server`` with IAM authentication switched on: it creates an IAM user, an
  access key and a policy while authentication is still off, then turns it on, so every later request
  must carry a valid SigV4 signature (moto recomputes it with botocore), and a wrong secret is a 403.
- :class:`FaultProxy` is an HTTP proxy on a real socket in front of either server. It forwards every
  request, counts them, and can answer a chosen request with a 500, stall it past the client's timeout,
  or reset the connection (RST), as a flaky network or an overloaded service would.

Not a conftest.py (those load for every test module): the cloud sync tests import it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from cloud_sync.s3 import Credentials, sign_headers
from simulators.broker import free_port

REPO = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO / "node_modules" / ".bin" / "azurite-blob"

#: Azurite's well-known development account (documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SAS_VERSION = "2021-12-02"

START_TIMEOUT_S = 30.0


def _sas_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hmac_b64(key_b64: str, text: str) -> str:
    digest = hmac.new(base64.b64decode(key_b64), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def service_sas(
    account: str,
    key_b64: str,
    container: str,
    permissions: str,
    expiry: datetime,
    start: datetime | None = None,
) -> str:
    """A container service SAS (sr=c), string-to-sign of versions 2020-12-06 and later."""
    st = _sas_time(start) if start else ""
    se = _sas_time(expiry)
    to_sign = "\n".join(
        [
            permissions,
            st,
            se,
            f"/blob/{account}/{container}",
            "",  # signed identifier (stored access policy)
            "",  # signed IP
            "",  # signed protocol
            SAS_VERSION,
            "c",  # signed resource: the container
            "",  # snapshot time
            "",  # encryption scope
            "",  # rscc
            "",  # rscd
            "",  # rsce
            "",  # rscl
            "",  # rsct
        ]
    )
    q = {"sv": SAS_VERSION, "sr": "c", "sp": permissions, "se": se, "sig": _hmac_b64(key_b64, to_sign)}
    if st:
        q["st"] = st
    return urllib.parse.urlencode(q, quote_via=urllib.parse.quote)


def account_sas(account: str, key_b64: str, permissions: str, expiry: datetime) -> str:
    """An account SAS for the blob service over service, container and object resources."""
    se = _sas_time(expiry)
    to_sign = "\n".join([account, permissions, "b", "sco", "", se, "", "", SAS_VERSION, "", ""])
    q = {"sv": SAS_VERSION, "ss": "b", "srt": "sco", "sp": permissions, "se": se}
    q["sig"] = _hmac_b64(key_b64, to_sign)
    return urllib.parse.urlencode(q, quote_via=urllib.parse.quote)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (node and anything it started), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    _kill_group(proc)
    raise RuntimeError(f"{what} did not answer within {START_TIMEOUT_S} s: {log.read_text(errors='replace')}")


class Azurite:
    """azurite-blob on 127.0.0.1:<free port>, with its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        if not os.access(AZURITE_BIN, os.X_OK):
            raise RuntimeError(
                f"{AZURITE_BIN} is missing: run `npm ci` in {REPO} (package.json pins azurite)"
            )
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port("127.0.0.1")
        self.log = workdir / "azurite.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def start(self) -> Azurite:
        with open(self.log, "wb") as out:
            self._proc = subprocess.Popen(
                [
                    str(AZURITE_BIN),
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--location",
                    str(self.workdir / "data"),
                    "--silent",
                    "--skipApiVersionCheck",
                    "--loose",
                    "--disableTelemetry",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # its own process group, so stop() can end all of it
            )
        _wait_http(self.account_url + "?comp=list", self._proc, self.log, "azurite")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc)
            self._proc = None

    def create_container(self, name: str) -> None:
        sas = account_sas(AZURITE_ACCOUNT, AZURITE_KEY, "rwdlac", datetime.now(UTC) + timedelta(hours=1))
        r = httpx.put(
            f"{self.account_url}/{name}?restype=container&{sas}", headers={"x-ms-version": SAS_VERSION}
        )
        assert r.status_code == 201, (r.status_code, r.text)

    def container_url(
        self,
        container: str,
        permissions: str = "racwdl",
        expiry: timedelta = timedelta(hours=1),
        *,
        base: str | None = None,
    ) -> str:
        """The container's SAS URL; ``base`` replaces ``http://127.0.0.1:<port>`` (to go through a proxy)."""
        sas = service_sas(AZURITE_ACCOUNT, AZURITE_KEY, container, permissions, datetime.now(UTC) + expiry)
        origin = base or f"http://127.0.0.1:{self.port}"
        return f"{origin}/{AZURITE_ACCOUNT}/{container}?{sas}"


class MotoS3:
    """moto_server on 127.0.0.1:<free port> with IAM authentication enforced; ``credentials`` may do s3:*.

    ``auth=False`` leaves authentication off: moto cannot check query-signed (presigned) requests
    while it is on, so a test that downloads by presigned URL runs without it (the signatures
    themselves are checked against botocore in test_cloud_sync.py)."""

    REGION = "us-east-1"

    def __init__(self, workdir: Path, *, auth: bool = True) -> None:
        self.auth = auth
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port("127.0.0.1")
        self.log = workdir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.credentials = Credentials("", "")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        moto_server = Path(sys.executable).with_name("moto_server")
        if not moto_server.exists():
            found = shutil.which("moto_server")
            if not found:
                raise RuntimeError(
                    "moto_server is missing: pip install 'moto[server]' (the dev extra has it)"
                )
            moto_server = Path(found)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log, "wb") as out:
            self._proc = subprocess.Popen(
                [str(moto_server), "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        _wait_http(self.endpoint + "/moto-api/", self._proc, self.log, "moto_server")
        if self.auth:
            self._enable_auth()
        else:
            self.credentials = Credentials("AKIAEXAMPLEEXAMPLE00", "not-checked")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc)
            self._proc = None

    def _iam(self, creds: Credentials, **form: str) -> str:
        body = urllib.parse.urlencode({**form, "Version": "2010-05-08"}).encode()
        url = httpx.URL(self.endpoint + "/")
        headers = sign_headers(
            "POST",
            url,
            body,
            creds,
            self.REGION,
            service="iam",
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 200, (form, r.status_code, r.text)
        return r.text

    def _enable_auth(self) -> None:
        bootstrap = Credentials("AKIDBOOTSTRAP", "bootstrap")  # accepted only while auth is off
        self._iam(bootstrap, Action="CreateUser", UserName="edge-device")
        policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
        self._iam(
            bootstrap, Action="PutUserPolicy", UserName="edge-device", PolicyName="s3", PolicyDocument=policy
        )
        text = self._iam(bootstrap, Action="CreateAccessKey", UserName="edge-device")
        key_id = text.split("<AccessKeyId>")[1].split("</AccessKeyId>")[0]
        secret = text.split("<SecretAccessKey>")[1].split("</SecretAccessKey>")[0]
        self.credentials = Credentials(key_id, secret)
        # From now on every request is authenticated and authorised (0 more unauthenticated actions).
        r = httpx.post(self.endpoint + "/moto-api/reset-auth", content=b"0")
        assert r.status_code == 200, r.text


# -- the misbehaving proxy -------------------------------------------------------------------------

#: A fault decides what to do with one request: None forwards it; "500", "stall", "reset" misbehave.
FaultFn = Callable[[str, str], str | None]

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """An HTTP/1.1 reverse proxy on 127.0.0.1:<free port> forwarding to ``upstream`` (host, port).

    ``fault(method, path_and_query)`` is asked for every request, in order; ``requests`` records
    (method, path_and_query) of every request received, faulty or not. The Host header is passed
    through unchanged (S3 signs it). A "stall" holds the request without answering for ``stall_s``.
    """

    def __init__(self, upstream: tuple[str, int], stall_s: float = 3.0) -> None:
        self.upstream = upstream
        self.stall_s = stall_s
        self.fault: FaultFn = lambda method, path: None
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    action = proxy.fault(self.command, self.path)
                if action == "500":
                    payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action == "stall":
                    proxy._stop.wait(proxy.stall_s)
                    self.close_connection = True
                    return
                if action == "reset":
                    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def finish(self) -> None:
                with contextlib.suppress(OSError):  # the "reset" fault closed the socket under us
                    super().finish()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.fault = lambda method, path: None

    def count(self, method: str, contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and contains in p)


def fail_times(n: int, action: str, method: str | None = None, contains: str = "") -> FaultFn:
    """A fault that misbehaves (``action``) for the first ``n`` matching requests, then forwards."""
    left = [n]

    def fault(m: str, path: str) -> str | None:
        if left[0] > 0 and (method is None or m == method) and contains in path:
            left[0] -= 1
            return action
        return None

    return fault
