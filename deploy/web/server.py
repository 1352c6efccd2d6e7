"""The HTTP server of the operators' API and dashboard: a listener of its own beside the artifact
endpoint (that one serves devices, unauthenticated bundles that are verified by signature; this one
serves people and scripts, authenticated, and may be bound to another interface).

Standard library only (ThreadingHTTPServer): the API is small, and one thread per connection suits
the long-lived event streams. Authentication: a bearer token compared in constant time, and/or
mutual TLS (the handshake refuses clients without a certificate from ``api.client_ca``). The page
and its static files carry no data and are served without the token; the page asks for it.
"""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import json
import queue
import secrets
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

from deploy.config import ApiConfig, ControlPlaneConfig
from deploy.plane import ControlPlane
from deploy.web.events import EventHub, Watcher
from edge_core.errors import ConfigError, EdgeError, ErrorCode
from edge_core.fsutil import atomic_write

from . import routes

#: request bodies above this are refused before they are read
MAX_BODY = 1 << 20
#: a comment on idle event streams this often, so proxies and the page see the connection alive
KEEPALIVE_S = 15.0

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}

_STATUS = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NO_SUCH_ROUTE: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.IMAGE_NOT_FOUND: 404,
    ErrorCode.DEVICE_NOT_FOUND: 404,
    ErrorCode.DEPLOYMENT_NOT_FOUND: 404,
    ErrorCode.IN_USE: 409,
    ErrorCode.DEVICE_BUSY: 409,
    ErrorCode.DEPLOYMENT_STATE_CONFLICT: 409,
    ErrorCode.BROKER_UNREACHABLE: 503,
    ErrorCode.REGISTRY_TOO_NEW: 503,
}


def ensure_token(path: Path) -> str:
    """The operator token: read from ``path``, or created there (mode 0600) when absent."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (token + "\n").encode(), mode=0o600)
        return token
    if len(token) < 16:
        raise ConfigError("api.token_file", f"{path} holds no token of at least 16 characters")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(api: ApiConfig, host: str) -> None:
    """Refuse an unauthenticated API off loopback unless ``allow_open`` says so (as the agent's API)."""
    authenticated = api.require_token or api.client_ca is not None
    if not authenticated and not is_loopback(host) and not api.allow_open:
        raise ConfigError(
            "api.listen",
            f"{host} is not loopback and the API would need neither a token nor a client certificate; "
            "set api.require_token, or api.client_ca (mutual TLS), or api.allow_open = true",
        )


def tls_context(api: ApiConfig) -> ssl.SSLContext | None:
    if api.cert is None or api.key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(api.cert), str(api.key))
    if api.client_ca is not None:
        ctx.load_verify_locations(str(api.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ApiServer


class _Refused(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.error = status, {"code": str(code), "message": message, "hint": hint}


class ApiHandler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-deploy"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: `serve`'s output is its one JSON line and errors."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the page loads nothing from elsewhere and runs no inline script
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc, default=str).encode(), "application/json")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            if method == "GET" and path in _STATIC:
                name, ctype = _STATIC[path]
                self._send(200, _static(name), ctype)
                return
            found = routes.find(method, path)
            if found is None:
                code = ErrorCode.NO_SUCH_ROUTE
                if routes.path_exists(path):
                    raise _Refused(405, code, f"{path} takes no {method}", "see /api/openapi.json")
                raise _Refused(404, code, f"no route {path}", "see /api/openapi.json")
            self._authenticate()
            route, params = found
            if route.op_id == "openapi":
                self._json(200, routes.openapi())
                return
            if route.op_id == "events":
                self._stream()
                return
            assert route.handler is not None
            rq = routes.Request(params, parse_qs(url.query), self._body() if method == "POST" else None)
            with self.server.owner.open_plane() as cp:
                self._json(200, route.handler(cp, rq))
        except _Refused as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            self._send(exc.status, json.dumps({"error": exc.error}).encode(), "application/json", extra)
        except EdgeError as exc:
            self._json(_STATUS.get(exc.code, 400), {"error": exc.as_dict()})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug answers 500 with a code, and the server lives on
            self._json(
                500, {"error": {"code": str(ErrorCode.INTERNAL_ERROR), "message": repr(exc), "hint": ""}}
            )

    def _authenticate(self) -> None:
        token = self.server.owner.token
        if token is None:
            return  # mutual TLS alone (the handshake checked the certificate), or an allowed open API
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise _Refused(
                401,
                ErrorCode.UNAUTHORIZED,
                "this API needs the operator token: Authorization: Bearer <token>",
                f"the token is in {self.server.owner.token_hint}",
            )

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            raise _Refused(
                400, ErrorCode.BAD_REQUEST, f"a body of {MAX_BODY} bytes at most, with Content-Length"
            )
        raw = self.rfile.read(length)
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise _Refused(
                400, ErrorCode.MALFORMED_JSON, f"the body is not JSON: {exc}", "send a JSON object"
            ) from None

    def _stream(self) -> None:
        hub = self.server.owner.hub
        q = hub.subscribe()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.wfile.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            self.wfile.flush()
            while not self.server.owner.stopping.is_set():
                try:
                    ev = q.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    self.wfile.write(b": keepalive\n\n")
                    self.wfile.flush()
                    continue
                if ev is None:
                    return
                self.wfile.write(ev.encode())
                self.wfile.flush()
        finally:
            hub.unsubscribe(q)


def _static(name: str) -> bytes:
    return importlib.resources.files("deploy.web").joinpath("static", name).read_bytes()


class ApiServer:
    """The API and page on ``host:port`` (0: a free port), serving in daemon threads."""

    def __init__(
        self,
        cfg: ControlPlaneConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        open_plane: Callable[[], ControlPlane] | None = None,
        poll: float = 0.5,
    ) -> None:
        self.cfg, self.host, self._port, self.token, self.tls = cfg, host, port, token, tls
        self.token_hint = str(cfg.api.token_file)
        self.open_plane = open_plane or (lambda: ControlPlane(cfg))
        self.hub = EventHub()
        self.watcher = Watcher(self.open_plane, self.hub, poll)
        self.stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: ControlPlaneConfig, listen: str | None = None) -> Self:
        host, _, port = (listen or cfg.api.listen).rpartition(":")
        host = host.strip("[]")
        check_exposure(cfg.api, host)
        token = ensure_token(cfg.api.token_file) if cfg.api.require_token else None
        return cls(cfg, host=host, port=int(port), token=token, tls=tls_context(cfg.api), poll=cfg.serve.poll)

    def start(self) -> Self:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        _Server.address_family = family
        server = _Server((self.host, self._port), ApiHandler, bind_and_activate=False)
        server.owner = self
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        if self.tls is not None:
            # the handshake runs in the connection's thread: a slow client cannot stall the accept loop
            server.socket = self.tls.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.watcher.start()
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="api-server", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.hub.close()
        self.watcher.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"


def start_api(cfg: ControlPlaneConfig, listen: str) -> ApiServer | None:
    """The API for `serve`, or None when its port cannot be bound: rollouts and artifacts matter more
    than the dashboard, so `serve` goes on without it and says so on stderr. A configuration that
    would expose it unauthenticated is still refused (ConfigError)."""
    try:
        return ApiServer.from_config(cfg, listen).start()
    except OSError as exc:
        print(json.dumps({"api_error": f"cannot listen on {listen}: {exc}"}), file=sys.stderr, flush=True)
        return None
