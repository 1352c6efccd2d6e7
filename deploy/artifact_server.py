"""The control plane's artifact endpoint: a static HTTP(S) server for the files under one directory.

``edge-deploy serve`` runs it over the local artifact store, so devices download bundles from it.
What devices need is what a resumable download needs: ``Range`` (one range, RFC 9110 semantics,
416 beyond the end), ``HEAD``, ``Accept-Ranges`` and ``Last-Modified``. Files go out through
``sendfile(2)``, so the server is never the bottleneck of a download of hundreds of MiB. Requests
may name only regular files inside the root: ``..`` and symlinks leading out of it are answered
404, as missing files are.

The server holds no test logic, but the simulators' :class:`~simulators.bundle_server.BundleServer`
subclasses it to inject the failures real networks produce. Two hooks make that possible:
:meth:`ArtifactServer._intercept` answers a request with a status before any file is looked up, and
:meth:`ArtifactServer._body` returns the :class:`Body` that shapes one file's response (its declared
size, whether it honours Range, how many bytes it promises and how it sends them).
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import re
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, cast
from urllib.parse import quote, unquote, urlsplit

__all__ = ["ArtifactHandler", "ArtifactServer", "Body", "RangeNotSatisfiable", "RequestRecord", "parse_range"]

log = logging.getLogger(__name__)

#: An idle keep-alive connection is closed after this long, so handler threads do not pile up.
IDLE_TIMEOUT_S = 60.0

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw and answered it."""

    method: str
    path: str
    #: The file name the path maps to (URL-decoded, without the leading slash).
    name: str
    #: The request's Range header, verbatim, or None.
    range: str | None
    status: int
    #: Body bytes actually written; less than Content-Length for a cut or an aborted transfer.
    bytes_sent: int


class RangeNotSatisfiable(Exception):
    """The Range header is well-formed but selects no byte of the file (answered with 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a single-range ``Range`` header into ``(start, stop)`` with ``stop`` exclusive.

    Supports ``bytes=START-``, ``bytes=START-END`` and the suffix form ``bytes=-N``. Returns None when
    the header should be ignored and the whole file served, which RFC 9110 allows for headers that
    are invalid or ask for several ranges. Raises :class:`RangeNotSatisfiable` when the range starts
    beyond the end of the file.
    """
    if header is None:
        return None
    match = _RANGE_RE.match(header)
    if match is None:
        return None  # malformed, or several ranges (a comma): serve the whole file
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    stop = min(int(last) + 1, size) if last else size
    return start, stop


class Body:
    """How one file's response body is produced: the file as it is, sent by the kernel.

    A subclass may declare a different size, ignore Range, promise fewer bytes than the headers
    announce or send different bytes; the handler asks this object rather than deciding itself.
    """

    #: Whether a Range header selects part of the body (False: always 200 with all of it).
    honours_range: bool = True

    def __init__(self, file: BinaryIO, file_size: int) -> None:
        self.file = file
        self.file_size = file_size

    @property
    def size(self) -> int:
        """The entity length the response declares (Content-Range, Content-Length of a 200)."""
        return self.file_size

    def plan(self, start: int, stop: int, *, head: bool) -> int:
        """The body bytes the response will send for ``[start, stop)``; called once, after the
        status line and headers are chosen and before they are sent."""
        return 0 if head else stop - start

    def send(self, handler: ArtifactHandler, start: int, stop: int) -> None:
        handler.send_file(self.file, start, stop - start)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its owner and the connections it has open."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: ArtifactServer) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, ArtifactHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        with self._connections_lock:
            self._connections.add(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down open keep-alive connections so their handler threads end now."""
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or fails its TLS handshake is expected here (devices lose their
        # links, tests cut connections on purpose); anything else is a bug worth a traceback, in the
        # log rather than on stderr.
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s ended with an error", client_address, exc_info=True)
        else:
            log.exception("artifact server: error while serving %s", client_address)


class ArtifactHandler(BaseHTTPRequestHandler):
    """One connection. The methods a :class:`Body` calls to send are ``send_file``, ``write_body``
    and ``drop_connection``; they keep the count of body bytes that the request's record reports."""

    protocol_version = "HTTP/1.1"
    server_version = "edge-ml-bundle-server"
    timeout = IDLE_TIMEOUT_S

    # Per-request state, reset by _serve.
    _serving: bool = False
    _name: str = ""
    _status_sent: int = 0
    _planned: int = 0  # the body length the response promises (less for a planned cut)
    _body_sent: int = 0
    _record: RequestRecord | None = None

    @property
    def _owner(self) -> ArtifactServer:
        return cast(_Server, self.server).owner

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request stderr logging; keep it at debug level."""
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- sending a body (for Body) ---------------------------------------------------------------

    def send_file(self, file: BinaryIO, offset: int, count: int) -> None:
        """The fast path: the kernel copies the file to the socket (a plain send loop under TLS)."""
        self.wfile.flush()
        sent = self.connection.sendfile(file, offset, count)
        self._body_sent = sent
        if sent != count:
            # The file shrank while being served: the response is now wrong, close the connection.
            self.close_connection = True

    def write_body(self, data: bytes) -> None:
        self.wfile.write(data)
        self._body_sent += len(data)

    def drop_connection(self) -> None:
        """End the connection the way a dropped link would, whatever the headers promised."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)

    # -- responses -------------------------------------------------------------------------------

    def _simple(self, status: int, *, head: bool, headers: dict[str, str] | None = None) -> None:
        body = b"" if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE else f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self._planned = 0 if head else len(body)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
            self._body_sent = len(body)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status_sent = code
        super().send_response(code, message)

    def end_headers(self) -> None:
        # Record the request *before* the client can see its response end, assuming the planned body
        # goes out in full (corrected afterwards if not): a test that asserts on `requests` right
        # after its download finished must find the record there.
        if self._serving:  # not for send_error()'s answers to unparsable requests
            self._publish(self._planned)
        super().end_headers()

    def _publish(self, bytes_sent: int) -> None:
        record = RequestRecord(
            method=self.command,
            path=self.path,
            name=self._name,
            range=self.headers.get("Range"),
            status=self._status_sent,
            bytes_sent=bytes_sent,
        )
        self._owner._record(record, replaces=self._record)
        self._record = record

    def _serve(self, *, head: bool) -> None:
        self._name = unquote(urlsplit(self.path).path).lstrip("/")
        self._status_sent = 0
        self._planned = 0
        self._body_sent = 0
        self._record = None
        self._serving = True
        try:
            self._respond(self._owner, self._name, self.headers.get("Range"), head=head)
        except OSError as exc:
            # The client went away mid-response: nothing more can be said on this connection.
            log.debug("%s %s aborted: %s", self.command, self.path, exc)
            self.close_connection = True
        finally:
            if self._record is None or self._body_sent != self._planned:
                self._publish(self._body_sent)
            self._serving = False

    def _respond(self, owner: ArtifactServer, name: str, range_header: str | None, *, head: bool) -> None:
        intercepted = owner._intercept(name)
        if intercepted is not None:
            self._simple(intercepted, head=head)
            return
        path = owner._resolve(name)
        if path is None:
            self._simple(HTTPStatus.NOT_FOUND, head=head)
            return
        with path.open("rb") as file:
            stat = os.fstat(file.fileno())
            body = owner._body(name, file, stat.st_size)
            size = body.size
            try:
                selected = parse_range(range_header, size) if body.honours_range else None
            except RangeNotSatisfiable:
                headers = {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"}
                self._simple(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, head=head, headers=headers)
                return
            start, stop = selected if selected is not None else (0, size)
            status = HTTPStatus.PARTIAL_CONTENT if selected is not None else HTTPStatus.OK
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            if selected is not None:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self._planned = body.plan(start, stop, head=head)
            self.end_headers()
            if head or start == stop:
                return
            body.send(self, start, stop)


class ArtifactServer:
    """Serve the files under ``root`` at ``http://HOST:PORT/NAME``.

    By default the server listens on a free port chosen by the kernel (no race: the socket is bound
    once and kept) and runs in a background daemon thread, each connection in its own daemon
    thread. With ``tls=(cert_path, key_path)`` it serves HTTPS instead. Every request is recorded
    in :attr:`requests`.
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path | str, Path | str] | None = None,
        keep_requests: int | None = None,
    ) -> None:
        """``keep_requests``: remember only the latest N requests (a long-running server); None: all."""
        self.root = Path(root).resolve()
        self.host = host
        self._port = port
        self._keep = keep_requests
        self.tls = tls
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the artifact server is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        server = _Server((self.host, self._port), self)
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            # The handshake happens in the connection's own thread, not in the accept loop, so one
            # slow or broken client cannot stall every other.
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"bundle-server:{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop accepting, close open connections and release the port. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the artifact server is not running: call start() first")
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        scheme = "https" if self.tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def url_for(self, name: str) -> str:
        """The URL of ``root / name``; ``name`` may contain ``/`` for subdirectories."""
        return f"{self.url}/{quote(name.lstrip('/'))}"

    def put(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``root / name`` (atomically, so a concurrent request sees old or new
        content, never a mix) and return its URL."""
        target = self.root / name
        if self._inside_root(target) is None:
            raise ValueError(f"name {name!r} escapes the server root")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        return self.url_for(name)

    # -- records ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every recorded request."""
        with self._lock:
            self._requests.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def counts(self, name: str, method: str | None = None) -> int:
        """How many requests (of ``method``, or any) were made for the file ``name``."""
        name = name.lstrip("/")
        with self._lock:
            return sum(1 for r in self._requests if r.name == name and (method is None or r.method == method))

    def _record(self, record: RequestRecord, *, replaces: RequestRecord | None) -> None:
        """Append ``record``, or put it in place of ``replaces`` (the same request's early record)."""
        with self._lock:
            if replaces is not None:
                for i in range(len(self._requests) - 1, -1, -1):
                    if self._requests[i] is replaces:
                        self._requests[i] = record
                        return
                return  # reset() forgot the early record: forget the update too
            self._requests.append(record)
            if self._keep is not None and len(self._requests) > self._keep:
                del self._requests[: len(self._requests) - self._keep]

    # -- hooks for subclasses --------------------------------------------------------------------

    def _intercept(self, name: str) -> int | None:
        """A status to answer instead of serving ``name`` (GET or HEAD), or None to serve it."""
        return None

    def _body(self, name: str, file: BinaryIO, file_size: int) -> Body:
        """How to answer for the file ``name``, open as ``file``: as it is."""
        return Body(file, file_size)

    # -- the root --------------------------------------------------------------------------------

    def _inside_root(self, path: Path) -> Path | None:
        resolved = path.resolve()
        return resolved if resolved.is_relative_to(self.root) and resolved != self.root else None

    def _resolve(self, name: str) -> Path | None:
        """The file a request names, or None if it does not exist or lies outside the root."""
        if not name or "\x00" in name:
            return None
        path = self._inside_root(self.root / name)
        return path if path is not None and path.is_file() else None
