"""The local scoring API: Azure ML's ``/score`` (with its ``/`` liveness and ``/swagger.json``, as
Azure ML's inference server answers them: :mod:`agent.serving.azureml`), the Open Inference Protocol
v2 (KServe / Triton) and Prometheus ``/metrics``, on loopback or a Unix socket.

Served by uvicorn (httptools parser, uvloop) with a bare ASGI callable: no framework between the
parser and the model. Inference of a model without score.py runs on the event loop itself when the
model is fast (its smoke test took under ``inline_max_ms``): for small edge models a thread hop
costs more than the inference. Slower models and score.py requests (a blocking call to a worker
process) run in a thread pool, so the loop keeps answering health checks. See docs/api.md.

A captured request is answered once its record is committed to the telemetry buffer when the
deployment's capture is durable (``telemetry.capture_commit = "before_answer"``): the request awaits
a future that the buffer's writer resolves (:mod:`agent.serving.commits`), so the loop serves other
requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from agent import __version__
from agent.serving import azureml
from agent.serving.commits import CommitWaiter
from agent.serving.runtime import LoadedImage, Runtime
from agent.serving.scoring import BinaryReply, Scorer, model_config
from agent.telemetry.capture import Capturer
from agent.telemetry.collections import Collections
from agent.telemetry.metrics import Metrics
from edge_core import faults
from edge_core.log import get_logger

log = get_logger("api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: What a scoring call answers: JSON, or the v2 binary tensor data extension's framed answer.
Body = bytes | BinaryReply

_JSON = [(b"content-type", b"application/json")]
#: A response up to this size goes out in one write (one copy of the tensors is cheaper than several
#: sends); above it, each binary output is written from its array's own buffer.
_COALESCE_MAX = 64 * 1024
#: Probes need no token: the v2 health checks and Azure ML's liveness route (it answers ``Healthy``).
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/"})


class ScoringApp:
    """The ASGI application. Routing is a few string comparisons: this is the hot path."""

    def __init__(
        self,
        runtime: Runtime,
        scorer: Scorer,
        metrics: Metrics,
        *,
        max_body: int,
        token: str | None,
        executor: ThreadPoolExecutor,
        commits: CommitWaiter | None = None,
    ) -> None:
        self.runtime = runtime
        self.commits = commits
        self.scorer = scorer
        self.metrics = metrics
        self.max_body = max_body
        self.token = token.encode() if token else None
        self.executor = executor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._dispatch(scope, receive, tracking_send)
        except Exception as exc:  # a bug must still answer JSON, and must not kill the connection loop
            log.error("api.internal_error", exc_info=True, path=scope.get("path"))
            if not started:
                await _error(
                    send, scope["path"], 500, f"internal error: {type(exc).__name__}", "internal_error"
                )

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        faults.point("api.request")  # on the event loop: a hang here blocks the whole API
        path: str = scope["path"]
        method: str = scope["method"]
        if self.token is not None and path not in _OPEN_PATHS and not self._authorized(scope):
            await _error(
                send,
                path,
                401,
                "missing or wrong bearer token",
                "unauthorized",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if method == "POST" or path == "/score":
            body = await _read_body(receive, self.max_body)
            if body is None:
                self.metrics.rejected("too_large")
                msg = f"request body is larger than {self.max_body} bytes"
                await _error(send, path, 413, msg, "body_too_large", close=True)
                return
            if path == "/score":
                await self._score(scope, send, body)
                return
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                # ['', 'v2', 'models', name, 'infer'] or ['', 'v2', 'models', name, 'versions', v, 'infer']
                parts = path.split("/")
                if len(parts) in (5, 7):
                    await self._infer(scope, send, parts[3], body, parts[5] if len(parts) == 7 else None)
                    return
        if path in azureml.ROUTE_METHODS:
            await self._azureml_route(scope, send, path, method)
            return
        if method in ("GET", "HEAD"):
            await self._get(send, path)
            return
        if not path.startswith("/v2"):  # Flask's routing, as Azure ML's server answers: 404 for any method
            await _error(send, path, 404, azureml.NOT_FOUND, "not_found")
            return
        await _reply(
            send,
            404 if method in ("GET", "POST", "HEAD") else 405,
            {"error": f"no route for {method} {path}", "code": "not_found"},
        )

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for k, v in scope["headers"]:
            if k == b"authorization":
                return v[:7].lower() == b"bearer " and hmac.compare_digest(v[7:].strip(), self.token)
        return False

    async def _run(self, fn: Callable[[], tuple[int, Body]], inline: bool) -> tuple[int, Body]:
        if inline:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _score(self, scope: Scope, send: Send, body: bytes) -> None:
        if scope["method"] not in azureml.SCORE_METHODS:
            await _error(send, "/score", 405, azureml.METHOD_NOT_ALLOWED, "not_found")
            return
        try:
            ids = azureml.request_ids(scope["headers"])
        except azureml.IdTooLong as exc:
            await _error(send, "/score", 431, exc.message, "bad_request", exc.ids.headers())
            return
        img = self.runtime.current
        if img is None:
            await _error(send, "/score", 503, "no image is active on this device", "no_image", ids.headers())
            return
        req = azureml.http_request(scope, body)
        collected: list[dict[str, Any]] = []  # filled by the worker thread before fn returns
        # run()'s own headers (content type, x-ms-*, an AMLResponse's) come back with its answer
        headers: list[tuple[bytes, bytes]] = []

        def fn() -> tuple[int, bytes]:
            answer = self.scorer.score_request(img, req, collected)
            headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers)
            headers.extend(ids.headers())
            return answer.status, answer.body

        await self._serve(
            scope,
            send,
            img,
            "score",
            "score",
            fn,
            self.scorer.inline(img, None),
            body,
            ids.request_id,
            headers,
            collected,
        )

    async def _azureml_route(self, scope: Scope, send: Send, path: str, method: str) -> None:
        """``/`` (liveness) and ``/swagger.json``, as Azure ML's server answers them."""
        if method not in azureml.ROUTE_METHODS[path]:
            await _error(send, path, 405, azureml.METHOD_NOT_ALLOWED, "not_found")
            return
        try:
            ids = azureml.request_ids(scope["headers"])
        except azureml.IdTooLong as exc:
            await _error(send, path, 431, exc.message, "bad_request", exc.ids.headers())
            return
        html = (b"content-type", azureml.TEXT_HTML.encode())
        if method == "OPTIONS":  # Flask's automatic answer
            await _raw(send, 200, b"", [html, (b"allow", b"GET, HEAD, OPTIONS"), *ids.headers()])
        elif path == "/":
            await _raw(send, 200, azureml.HEALTHY, [html, *ids.headers()])
        else:
            img = self.runtime.current
            if img is None:
                await _error(send, path, 503, "no image is active on this device", "no_image", ids.headers())
                return
            query = urllib.parse.parse_qs(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            )
            info = img.worker.swagger if img.worker is not None else None
            status, doc = azureml.swagger(
                query.get("version", [None])[0], info, img.dir, img.name, img.version
            )
            failed = (azureml.FAILED.encode(), b"False")
            await _raw(send, status, doc, [*_JSON, failed, *ids.headers()])

    async def _infer(self, scope: Scope, send: Send, model: str, body: bytes, version: str | None) -> None:
        img = self.runtime.current
        if img is None or model not in img.models:
            models = sorted(img.models) if img else []
            await _reply(
                send, 404, {"error": f"unknown model {model!r}", "code": "unknown_model", "models": models}
            )
            return
        if version is not None and version != img.version:
            msg = f"model {model!r} has version {img.version!r}, not {version!r}"
            await _reply(send, 404, {"error": msg, "code": "unknown_version"})
            return
        hlen = _header(scope, b"inference-header-content-length")  # the binary tensor data extension
        fn = lambda: self.scorer.infer(img, model, body, hlen)  # noqa: E731
        await self._serve(scope, send, img, model, "v2", fn, self.scorer.inline(img, model), body)

    async def _serve(
        self,
        scope: Scope,
        send: Send,
        img: LoadedImage,
        model: str,
        api: str,
        fn: Callable[[], tuple[int, Body]],
        inline: bool,
        body: bytes,
        rid: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        collected: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        img.acquire()  # the request finishes on the image it started on, even across a swap
        t0 = time.perf_counter()
        try:
            status, out = await self._run(fn, inline)
        finally:
            img.release()
        elapsed = time.perf_counter() - t0
        self.metrics.observe(img, model, status, elapsed)
        cap = img.capturer
        captured = cap is not None and cap.sampled()
        col = img.collection
        if not captured and col is None:
            await _raw(send, status, out, headers)
            return
        rid = rid or _header(scope, b"x-request-id") or Capturer.request_id()
        ts = time.time()
        # records are JSON: a binary tensor exchange is recorded as its JSON equivalent
        rec_in, rec_out = out.as_json() if isinstance(out, BinaryReply) else (body, out)
        ticket = 0
        if captured:
            assert cap is not None
            ticket = cap.record(
                api=api,
                model=model,
                version=img.version,
                request_id=rid,
                ts=ts,
                latency_s=elapsed,
                status=status,
                body=rec_in,
                out=rec_out,
                raw=img.worker is not None or api == "score",  # /score bodies are not checked JSON
            )
        if col is not None:
            _collect(col, scope, rid, ts, rec_in, status, rec_out, collected)
        if ticket and self.commits is not None:
            # The client learns of its answer only once the record of it would survive a crash of
            # the agent; bounded, so a wedged disk slows answers down but never stops them.
            await self.commits.wait(ticket)
        await _raw(send, status, out, headers if rid and headers else [(b"x-request-id", rid.encode())])

    async def _get(self, send: Send, path: str) -> None:
        img = self.runtime.current
        if path == "/v2/health/live":
            await _reply(send, 200, {"live": True})
        elif path == "/v2/health/ready":
            ready = img is not None and self.scorer.ready(img)
            await _reply(send, 200 if ready else 503, {"ready": ready})
        elif path == "/v2":
            extensions = ["binary_tensor_data", "model_configuration"]
            await _reply(send, 200, {"name": "edge-agent", "version": __version__, "extensions": extensions})
        elif path == "/metrics":
            text, ctype = self.metrics.render(self.runtime)
            headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(text)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": text})
        elif path.startswith("/v2/models/"):
            # ['', 'v2', 'models', name, *rest], rest: [], ['ready'], ['config'], each optionally
            # after ['versions', v]
            parts = path.split("/")
            name, rest = parts[3], parts[4:]
            if img is None or name not in img.models:
                await _reply(send, 404, {"error": f"unknown model {name!r}", "code": "unknown_model"})
                return
            if rest[:1] == ["versions"] and len(rest) > 1:
                if rest[1] != img.version:
                    msg = f"model {name!r} has version {img.version!r}, not {rest[1]!r}"
                    await _reply(send, 404, {"error": msg, "code": "unknown_version"})
                    return
                rest = rest[2:]
            if not rest:
                m = img.models[name]
                await _reply(send, 200, {
                    "name": name, "versions": [img.version], "platform": "onnxruntime_onnx",
                    "inputs": [s.as_dict() for s in m.inputs], "outputs": [s.as_dict() for s in m.outputs],
                })  # fmt: skip
            elif rest == ["ready"]:
                ready = self.scorer.ready(img)
                await _reply(send, 200 if ready else 503, {"name": name, "ready": ready})
            elif rest == ["config"]:
                await _reply(send, 200, model_config(img, name))
            else:
                await _reply(send, 404, {"error": f"no route for GET {path}", "code": "not_found"})
        elif path.startswith("/v2"):
            await _reply(send, 404, {"error": f"no route for GET {path}", "code": "not_found"})
        else:
            await _error(send, path, 404, azureml.NOT_FOUND, "not_found")


def _collect(
    col: Collections,
    scope: Scope,
    rid: str,
    ts: float,
    body: bytes,
    status: int,
    out: bytes,
    collected: Sequence[Mapping[str, Any]],
) -> None:
    """Azure ML's collections of one request: its payloads, and what score.py collected."""
    wanted = col.settings.capture_headers
    headers = {}
    if wanted:
        headers = {k.decode("latin-1"): v[:1024].decode("latin-1") for k, v in scope["headers"]}
    col.record(
        request_id=rid,
        ts=ts,
        path=scope["path"],
        method=scope["method"],
        content_type=_header(scope, b"content-type"),
        headers=headers,
        body=body,
        status=status,
        out=out,
        collected=collected,
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v[:128].decode("latin-1"))  # bounded: it goes into every captured record
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds ``limit`` (the rest is never read)."""
    msg = await receive()
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while True:
        if size > limit:
            return None
        msg = await receive()
        chunk = msg.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks) if size <= limit else None


async def _raw(send: Send, status: int, body: Body, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a whole answer: JSON unless ``extra`` has its own content type."""
    extra = extra or []
    if isinstance(body, BinaryReply):
        await _binary(send, status, body, extra)
        return
    typed = any(k.lower() == b"content-type" for k, _ in extra)
    # An explicit Content-Length spares uvicorn the chunked encoding of a body we already have whole.
    headers = [*([] if typed else _JSON), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _binary(send: Send, status: int, reply: BinaryReply, extra: list[tuple[bytes, bytes]]) -> None:
    """Triton's framing of binary outputs: the JSON, then each output's bytes; the JSON's length in
    ``Inference-Header-Content-Length`` and ``application/octet-stream`` only when bytes follow it
    (otherwise the body is plain JSON, as Triton answers it)."""
    size = len(reply)
    headers = _JSON
    if reply.tensors:
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(len(reply.header)).encode()),
        ]
    headers = [*headers, (b"content-length", str(size).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if size <= _COALESCE_MAX:
        await send({"type": "http.response.body", "body": b"".join((reply.header, *reply.tensors))})
        return
    await send({"type": "http.response.body", "body": reply.header, "more_body": True})
    for i, t in enumerate(reply.tensors):
        await send({"type": "http.response.body", "body": t, "more_body": i < len(reply.tensors) - 1})


async def _reply(
    send: Send,
    status: int,
    doc: dict[str, Any],
    extra: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    await _raw(
        send, status, orjson.dumps(doc), (extra or []) + ([(b"connection", b"close")] if close else [])
    )


async def _error(
    send: Send,
    path: str,
    status: int,
    message: str,
    code: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    """An error in the shape the route's clients expect: the Open Inference Protocol's
    ``{"error", "code"}`` under /v2, Azure ML's ``{"message", "code"}`` everywhere else."""
    if path.startswith("/v2"):
        await _reply(send, status, {"error": message, "code": code}, extra, close)
        return
    answer = azureml.error(status, message, code)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    await _raw(
        send, status, answer.body, headers + (extra or []) + ([(b"connection", b"close")] if close else [])
    )


def bind(listen: str) -> socket.socket:
    """``HOST:PORT`` (port 0 picks a free one) or ``unix:/path``. Loopback unless configured."""
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)
    else:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class TlsSettings:
    """The API's server certificate and key, and the CA its clients' certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class ApiServer:
    """uvicorn on its own thread and event loop, on a socket we bind (so port 0 works and the
    address is known before the first request)."""

    def __init__(self, app: ScoringApp, listen: str, tls: TlsSettings | None = None) -> None:
        self.app = app
        self.listen = listen
        self.tls = tls
        self.sock = bind(listen)
        self.address = self.sock.getsockname()
        ssl_opts: dict[str, Any] = {}
        if tls is not None:
            ssl_opts = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
            if tls.client_ca is not None:
                ssl_opts |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self._server = uvicorn.Server(uvicorn.Config(
            app, loop="uvloop", http="httptools", lifespan="off", access_log=False, log_config=None,
            timeout_keep_alive=30, timeout_graceful_shutdown=10, server_header=False, date_header=False,
            **ssl_opts,
        ))  # fmt: skip
        self.thread = threading.Thread(target=self._serve, name="api", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pong_at = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds since the event loop last ran the callback that this call (like the one before it)
        schedules: about one tick when it is healthy, growing while the loop is blocked or gone."""
        if self._loop is not None and self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self._loop.call_soon_threadsafe(self._pong)
        return time.monotonic() - self._pong_at

    def _pong(self) -> None:
        self._pong_at = time.monotonic()

    @property
    def url(self) -> str:
        if self.sock.family == socket.AF_UNIX:
            return self.listen
        host, port = self.address[0], self.address[1]
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    def _serve(self) -> None:
        import uvloop

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            if self.app.commits is not None:
                self.app.commits.bind(self._loop)
            await self._server.serve(sockets=[self.sock])

        uvloop.run(serve())

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.01)
        log.info("api.listening", url=self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (graceful), then return."""
        self._server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        if self.listen.startswith("unix:"):
            Path(self.listen[5:]).unlink(missing_ok=True)
