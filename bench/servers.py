"""The servers the scoring benchmarks start, each in a process of its own (``benchlib.start_bench_server``).

    python bench/servers.py agent --image-dir DIR --state-dir DIR [--workers N]
    python bench/servers.py uvicorn --response-file FILE      # the agent's HTTP server, no-op app
    python bench/servers.py raw --response-file FILE          # a bare uvloop protocol server
    python bench/servers.py raw --response-file FILE --onnx M # ... that runs session.run per request

Each prints ``LISTENING http://127.0.0.1:PORT`` once it accepts connections, and runs until SIGTERM.

- ``agent``: the agent's real serving stack, :class:`agent.serving.activation.Serving` (Runtime, Scorer,
  Metrics, the thread pool and :class:`agent.serving.api.ApiServer`: uvicorn, httptools, uvloop), with an
  installed image loaded, smoke-tested and swapped in exactly as ``Serving.prepare`` and ``commit``
  do; an image with ``score.py`` gets its :class:`agent.serving.worker.WorkerPool` of ``runtime.workers``
  processes. Only MQTT and the deployer are left out.
- ``uvicorn``: :class:`agent.serving.api.ApiServer` itself (same uvicorn settings, same thread and loop)
  serving an ASGI app that reads the body and answers a fixed response: the HTTP floor of the
  agent's stack, without routing, JSON, tensors, metrics or inference.
- ``raw``: a uvloop ``asyncio.Protocol`` that answers a fixed response once a request's head and
  ``Content-Length`` bytes have arrived: about the least a Python server can do per request, so
  what is left is mostly the loopback round trip and the client. With ``--onnx`` it also runs the
  model (``session.run`` on a fixed 1x64 input, one thread) before each answer: what one inference
  costs inside a server that waits for the network between requests (caches and CPU not hot).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, cast

import benchlib  # noqa: F401  (puts the repository root on sys.path)


def _wait_for_sigterm() -> None:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass


def serve_agent(args: argparse.Namespace) -> None:
    from agent.config import AgentConfig, ApiConfig, RuntimeConfig
    from agent.serving.activation import Serving
    from edge_core import log as log_mod

    log_mod.setup(args.log_level)
    cfg = AgentConfig(
        device_id="bench",
        state_dir=args.state_dir,
        runtime=RuntimeConfig(workers=args.workers),
        api=ApiConfig(listen=args.listen),
    )
    serving = Serving(cfg)
    img = serving.runtime.load(args.image_dir)  # what Serving.prepare does, without a Manifest object
    serving.scorer.smoke_test(img)
    serving.commit(img)
    serving.start(None, None)
    assert serving.api is not None
    print(f"LISTENING {serving.api.url}", flush=True)
    try:
        _wait_for_sigterm()
    finally:
        serving.stop()


def serve_uvicorn(args: argparse.Namespace) -> None:
    from agent.serving.api import ApiServer, ScoringApp
    from edge_core import log as log_mod

    log_mod.setup("warning")
    body: bytes = args.response_file.read_bytes()
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    done = {"type": "http.response.body", "body": body}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send(start)
        await send(done)

    server = ApiServer(cast(ScoringApp, app), args.listen)
    server.start()
    print(f"LISTENING {server.url}", flush=True)
    try:
        _wait_for_sigterm()
    finally:
        server.stop()


class _Raw(asyncio.Protocol):
    response = b""
    #: With ``--onnx``: called before each answer (onnxruntime on a fixed input).
    work: list[Any] = []

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(self.buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            for work in self.work:
                work()
            assert self.transport is not None
            self.transport.write(self.response)


def serve_raw(args: argparse.Namespace) -> None:
    import uvloop

    body: bytes = args.response_file.read_bytes()
    _Raw.response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    if args.onnx is not None:
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(args.onnx), opts, providers=["CPUExecutionProvider"])
        feeds = {"x": np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)}
        _Raw.work.append(lambda: sess.run(["y"], feeds))
    host, _, port = args.listen.rpartition(":")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Raw, host, int(port), reuse_address=True)
        addr = server.sockets[0].getsockname()
        print(f"LISTENING http://{addr[0]}:{addr[1]}", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("agent", help="the agent's serving stack with one installed image")
    a.add_argument("--image-dir", type=Path, required=True)
    a.add_argument("--state-dir", type=Path, required=True)
    a.add_argument("--workers", type=int, default=1, help="runtime.workers: score.py processes")
    a.add_argument("--log-level", default="warning")
    for name in ("uvicorn", "raw"):
        p = sub.add_parser(name)
        p.add_argument("--response-file", type=Path, required=True)
        if name == "raw":
            p.add_argument("--onnx", type=Path, help="run this model (input x: 1x64 float32) per request")
    for p in sub.choices.values():
        p.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args(argv)
    {"agent": serve_agent, "uvicorn": serve_uvicorn, "raw": serve_raw}[args.kind](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
