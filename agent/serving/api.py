"""The local scoring API: Azure ML's ``POST /score``, the Open Inference Protocol v2 (KServe /
Triton) and Prometheus ``/metrics``, on loopback or a Unix socket.

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
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from agent import __version__
from agent.serving.commits import CommitWaiter
from agent.serving.runtime import LoadedImage, Runtime
from agent.serving.scoring import Scorer
from agent.telemetry.metrics import Metrics
from edge_core import faults
from edge_core.log import get_logger

log = get_logger("api")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]


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
                await _reply(
                    send, 500, {"error": f"internal error: {type(exc).__name__}", "code": "internal_error"}
                )

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        faults.point("api.request")  # on the event loop: a hang here blocks the whole API
        path: str = scope["path"]
        method: str = scope["method"]
        if (
            self.token is not None
            and path not in ("/v2/health/live", "/v2/health/ready")
            and not self._authorized(scope)
        ):
            await _reply(
                send,
                401,
                {"error": "missing or wrong bearer token", "code": "unauthorized"},
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if method == "POST":
            body = await _read_body(receive, self.max_body)
            if body is None:
                self.metrics.rejected("too_large")
                await _reply(
                    send,
                    413,
                    {"error": f"request body is larger than {self.max_body} bytes", "code": "body_too_large"},
                    close=True,
                )
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
        elif method in ("GET", "HEAD"):
            await self._get(send, path)
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

    async def _run(self, fn: Callable[[], tuple[int, bytes]], inline: bool) -> tuple[int, bytes]:
        if inline:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _score(self, scope: Scope, send: Send, body: bytes) -> None:
        img = self.runtime.current
        if img is None:
            await _reply(send, 503, {"error": "no image is active on this device", "code": "no_image"})
            return
        fn = lambda: self.scorer.score(img, body)  # noqa: E731
        await self._serve(scope, send, img, "score", "score", fn, self.scorer.inline(img, None), body)

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
        fn = lambda: self.scorer.infer(img, model, body)  # noqa: E731
        await self._serve(scope, send, img, model, "v2", fn, self.scorer.inline(img, model), body)

    async def _serve(
        self,
        scope: Scope,
        send: Send,
        img: LoadedImage,
        model: str,
        api: str,
        fn: Callable[[], tuple[int, bytes]],
        inline: bool,
        body: bytes,
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
        if cap is None or not cap.sampled():
            await _raw(send, status, out)
            return
        rid = _header(scope, b"x-request-id") or cap.request_id()
        ticket = cap.record(
            api=api,
            model=model,
            version=img.version,
            request_id=rid,
            ts=time.time(),
            latency_s=elapsed,
            status=status,
            body=body,
            out=out,
            raw=img.worker is not None,
        )
        if ticket and self.commits is not None:
            # The client learns of its answer only once the record of it would survive a crash of
            # the agent; bounded, so a wedged disk slows answers down but never stops them.
            await self.commits.wait(ticket)
        await _raw(send, status, out, [(b"x-request-id", rid.encode())])

    async def _get(self, send: Send, path: str) -> None:
        img = self.runtime.current
        if path == "/v2/health/live":
            await _reply(send, 200, {"live": True})
        elif path == "/v2/health/ready":
            ready = img is not None and self.scorer.ready(img)
            await _reply(send, 200 if ready else 503, {"ready": ready})
        elif path == "/v2":
            await _reply(send, 200, {"name": "edge-agent", "version": __version__, "extensions": []})
        elif path == "/metrics":
            text, ctype = self.metrics.render(self.runtime)
            headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(text)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": text})
        elif path.startswith("/v2/models/"):
            parts = path.split("/")
            name = parts[3] if len(parts) > 3 else ""
            if img is None or name not in img.models:
                await _reply(send, 404, {"error": f"unknown model {name!r}", "code": "unknown_model"})
            elif len(parts) == 4 or (len(parts) == 6 and parts[4] == "versions" and parts[5] == img.version):
                m = img.models[name]
                await _reply(send, 200, {
                    "name": name, "versions": [img.version], "platform": "onnxruntime_onnx",
                    "inputs": [s.as_dict() for s in m.inputs], "outputs": [s.as_dict() for s in m.outputs],
                })  # fmt: skip
            elif parts[-1] == "ready":
                ready = self.scorer.ready(img)
                await _reply(send, 200 if ready else 503, {"name": name, "ready": ready})
            else:
                await _reply(send, 404, {"error": f"no route for GET {path}", "code": "not_found"})
        elif path == "/":
            await _reply(send, 200, {"status": "ok", "image": img.describe() if img else None})
        else:
            await _reply(send, 404, {"error": f"no route for GET {path}", "code": "not_found"})


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


async def _raw(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    # An explicit Content-Length spares uvicorn the chunked encoding of a body we already have whole.
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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


class ApiServer:
    """uvicorn on its own thread and event loop, on a socket we bind (so port 0 works and the
    address is known before the first request)."""

    def __init__(self, app: ScoringApp, listen: str) -> None:
        self.app = app
        self.listen = listen
        self.sock = bind(listen)
        self.address = self.sock.getsockname()
        self._server = uvicorn.Server(uvicorn.Config(
            app, loop="uvloop", http="httptools", lifespan="off", access_log=False, log_config=None,
            timeout_keep_alive=30, timeout_graceful_shutdown=10, server_header=False, date_header=False,
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
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

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
