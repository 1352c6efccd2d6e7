"""The load generator of the scoring benchmarks: HTTP/1.1 POSTs of one fixed body on a fixed number
of keep-alive connections for a fixed time, always in a process of its own.

Two clients, chosen per benchmark run and then used for every server of that run:

- ``wrk`` (C, epoll; ``apt-get install wrk``), driven by a Lua script that sets the body and prints
  its summary as JSON: the lightest client there is, so that on a 2-core machine the servers get as
  much of the CPU as possible. It gives throughput, latency percentiles (its HdrHistogram, 1 us
  resolution) and error counts.
- the Python client in this file (``python bench/loadgen.py ...``): uvloop, one coroutine per
  connection, raw sockets and a minimal HTTP/1.1 response parser. It keeps every request's start
  time, latency and status, which the swap benchmark needs to cut the run into windows; with one
  connection and no rate it is a plain blocking-socket loop (the least client time per request, for
  the latency benchmark). With ``--rate`` each connection sends on a fixed schedule instead of as
  fast as it can, and a request's latency counts from the time it was due whenever the previous
  response was late (no coordinated omission).

Both reconnect when a server closes the connection after a response (gunicorn's sync workers do
that after every request: they do not keep connections alive), and count it as a normal request.
Any status other than 2xx, a connection error or a timeout is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

#: Per-request timeout of the Python client; wrk gets the same.
TIMEOUT_S = 10.0

# --- results (used by the benchmarks) ------------------------------------------------------------


@dataclass
class LoadResult:
    client: str
    connections: int
    window_s: float
    requests: int  # answered 2xx within the measured window
    errors: dict[str, int]
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    client_cpu_s: float
    #: Per request, Python client only: monotonic start (ns), latency (ns), HTTP status (0: error).
    start_ns: np.ndarray | None = field(default=None, repr=False)
    lat_ns: np.ndarray | None = field(default=None, repr=False)
    status: np.ndarray | None = field(default=None, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "connections": self.connections,
            "window_s": round(self.window_s, 3),
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "p50_us": round(self.p50_us, 1),
            "p90_us": round(self.p90_us, 1),
            "p99_us": round(self.p99_us, 1),
            "max_us": round(self.max_us, 1),
            "errors": self.errors,
            "client_cpu_s": round(self.client_cpu_s, 3),
        }


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def choose_client(wanted: str) -> str:
    if wanted == "auto":
        return "wrk" if have_wrk() else "python"
    if wanted == "wrk" and not have_wrk():
        raise SystemExit("--client wrk: wrk is not installed (apt-get install wrk)")
    return wanted


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_load(
    client: str,
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    connections: int,
    duration: float,
    warmup: float = 0.0,
    rate: float = 0.0,
    keep_samples: bool = False,
    cpu: int | None = None,
    headers: Sequence[str] = (),
) -> LoadResult:
    """Load one server for ``warmup + duration`` seconds from a separate process (on CPU ``cpu``
    only, if given); only the last ``duration`` seconds count. Blocks until the client has exited.
    ``headers`` (``"Name: value"``) are added to every request (the Python client only)."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    if client == "wrk":
        if rate or headers:
            raise ValueError("--rate and extra headers need the Python client")
        return _run_wrk(host, port, path, body, connections, duration, warmup, pin)
    return _run_python(
        host, port, path, body, connections, duration, warmup, rate, keep_samples, pin, headers
    )


# --- wrk -----------------------------------------------------------------------------------------

_WRK_LUA = """\
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _run_wrk(
    host: str,
    port: int,
    path: str,
    body: bytes,
    connections: int,
    duration: float,
    warmup: float,
    pin: list[str],
) -> LoadResult:
    url = f"http://{host}:{port}{path}"
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_LUA)
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
        threads = "1"  # one epoll thread drives tens of thousands of requests/s: leave the CPU to servers
        timeout = f"{int(TIMEOUT_S)}s"
        if warmup > 0:
            subprocess.run(
                [*pin, "wrk", "-t", threads, "-c", str(connections), "-d", f"{max(1, round(warmup))}s",
                 "--timeout", timeout, "-s", str(script), url],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
        cpu0 = _children_cpu()
        out = subprocess.run(
            [*pin, "wrk", "-t", threads, "-c", str(connections), "-d", f"{max(1, math.ceil(duration))}s",
             "--timeout", timeout, "-s", str(script), url],
            env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        cpu = _children_cpu() - cpu0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    doc = json.loads(line[len("WRKJSON ") :])
    errors = {k: int(doc[k]) for k in ("connect", "read", "write", "status", "timeout") if doc[k]}
    # wrk counts non-2xx/3xx answers in "status" and also among its requests: take them out.
    ok = int(doc["requests"]) - int(doc["status"])
    return LoadResult(
        "wrk", connections, doc["duration_us"] / 1e6, ok, errors,
        float(doc["p50_us"]), float(doc["p90_us"]), float(doc["p99_us"]), float(doc["max_us"]), cpu,
    )  # fmt: skip


# --- the Python client: the parent's side --------------------------------------------------------


def _run_python(
    host: str,
    port: int,
    path: str,
    body: bytes,
    connections: int,
    duration: float,
    warmup: float,
    rate: float,
    keep_samples: bool,
    pin: list[str],
    headers: Sequence[str] = (),
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        out = Path(tmp) / "out.npz"
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--host", host, "--port", str(port),
            "--path", path, "--body-file", str(body_file), "--connections", str(connections),
            "--duration", str(warmup + duration), "--rate", str(rate), "--out", str(out),
            *(a for h in headers for a in ("--header", h)),
        ]  # fmt: skip
        cpu0 = _children_cpu()
        proc = subprocess.run([*pin, *cmd], check=True, capture_output=True, text=True)
        cpu = _children_cpu() - cpu0
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out) as data:
            start, lat, status = data["start_ns"], data["lat_ns"], data["status"]
    t0 = int(meta["t0_ns"]) + int(warmup * 1e9)
    t1 = int(meta["t_end_ns"])
    return summarise(
        "python", connections, start, lat, status, t0, t1, cpu,
        keep_samples=keep_samples,
    )  # fmt: skip


def summarise(
    client: str,
    connections: int,
    start: np.ndarray,
    lat: np.ndarray,
    status: np.ndarray,
    t0_ns: int,
    t1_ns: int,
    cpu: float,
    *,
    keep_samples: bool = False,
    errors_extra: dict[str, int] | None = None,
) -> LoadResult:
    """Requests that started in ``[t0_ns, t1_ns)``: latency percentiles of the good ones, errors by
    kind; throughput counts the good ones that also finished in the window."""
    sel = (start >= t0_ns) & (start < t1_ns)
    good = sel & (status >= 200) & (status < 300)
    done_in_window = good & (start + lat <= t1_ns)
    lat_us = lat[good] / 1000.0
    errors: dict[str, int] = {}
    for code in np.unique(status[sel & ~((status >= 200) & (status < 300))]):
        key = "connection" if code == 0 else f"http_{int(code)}"
        errors[key] = int(np.count_nonzero(sel & (status == code)))
    for k, v in (errors_extra or {}).items():
        if v:
            errors[k] = errors.get(k, 0) + int(v)
    return LoadResult(
        client,
        connections,
        (t1_ns - t0_ns) / 1e9,
        int(np.count_nonzero(done_in_window)),
        errors,
        float(np.percentile(lat_us, 50)) if lat_us.size else float("nan"),
        float(np.percentile(lat_us, 90)) if lat_us.size else float("nan"),
        float(np.percentile(lat_us, 99)) if lat_us.size else float("nan"),
        float(lat_us.max()) if lat_us.size else float("nan"),
        cpu,
        start if keep_samples else None,
        lat if keep_samples else None,
        status if keep_samples else None,
    )


class Background:
    """The Python client running while the caller does something else (the swap benchmark): start,
    then ``stop()`` returns every request's samples. It stops by itself after ``max_duration``."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        body: bytes,
        *,
        connections: int,
        rate: float,
        max_duration: float,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-load-")
        tmp = Path(self._tmp.name)
        (tmp / "body.json").write_bytes(body)
        self._out = tmp / "out.npz"
        self.connections = connections
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--host", host, "--port", str(port),
            "--path", path, "--body-file", str(tmp / "body.json"), "--connections", str(connections),
            "--duration", str(max_duration), "--rate", str(rate), "--out", str(self._out),
            "--until-stdin-eof",
        ]  # fmt: skip
        self._cpu0 = _children_cpu()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any], float]:
        """Stop sending, wait for the client; (start_ns, lat_ns, status, meta, client CPU s)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(60)
        cpu = _children_cpu() - self._cpu0
        meta = json.loads(out.strip().splitlines()[-1])
        with np.load(self._out) as data:
            arrays = data["start_ns"], data["lat_ns"], data["status"]
        self._tmp.cleanup()
        return (*arrays, meta, cpu)


# --- the Python client: the load process ---------------------------------------------------------


class _Samples:
    def __init__(self) -> None:
        self.start: list[int] = []
        self.lat: list[int] = []
        self.status: list[int] = []
        self.errors: dict[str, int] = {}

    def add(self, start: int, lat: int, status: int) -> None:
        self.start.append(start)
        self.lat.append(lat)
        self.status.append(status)


def _request(host: str, port: int, path: str, body: bytes, headers: Sequence[str] = ()) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _parse_head(buf: bytes | bytearray, end: int) -> tuple[int, int, bool]:
    """(status, content length, server closes) from a response head ``buf[:end]``."""
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = 0
    close = head[0].startswith("HTTP/1.0")
    for h in head[1:]:
        name, _, value = h.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
        elif name == "transfer-encoding":
            raise RuntimeError("chunked responses are not supported by this client")
    return status, length, close


def _blocking_loop(host: str, port: int, req: bytes, deadline: int, samples: _Samples) -> None:
    """One connection, one request at a time, blocking sockets: the least client time per request."""
    sock: socket.socket | None = None
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while (t0 := time.monotonic_ns()) < deadline:
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(req)
            got = 0
            while True:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("closed by the server")
                got += n
                end = buf.find(b"\r\n\r\n", 0, got)
                if end >= 0:
                    status, length, close = _parse_head(buf, end)
                    while got < end + 4 + length:
                        n = sock.recv_into(view[got:])
                        if n == 0:
                            raise ConnectionError("closed by the server")
                        got += n
                    break
            samples.add(t0, time.monotonic_ns() - t0, status)
            if close:
                sock.close()
                sock = None
        except OSError as exc:
            samples.add(t0, time.monotonic_ns() - t0, 0)
            samples.errors[type(exc).__name__] = samples.errors.get(type(exc).__name__, 0) + 1
            if sock is not None:
                sock.close()
            sock = None


class _Conn(asyncio.Protocol):
    """One keep-alive connection: ``request()`` writes a request and returns a future that
    resolves to the status once the whole response has arrived."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the current response, once its head is parsed
        self.status = 0
        self.close = False
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, req: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(req)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status, length, self.close = _parse_head(self.buf, end)
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            del self.buf[: self.need]
            self.need = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"closed by the server: {exc}"))


async def _conn_loop(
    idx: int,
    host: str,
    port: int,
    req: bytes,
    t0: int,
    deadline: int,
    interval_ns: int,
    connections: int,
    stop: asyncio.Event,
    samples: _Samples,
) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    k = 0
    prev_end = t0
    phase = interval_ns * idx // max(connections, 1)  # spread the connections over the interval
    while not stop.is_set():
        now = time.monotonic_ns()
        if interval_ns:
            due = t0 + phase + k * interval_ns
            k += 1
            if due >= deadline:
                break
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
                now = time.monotonic_ns()
            # Late because the previous answer was late: count from when it was due.
            start = due if prev_end > due else now
        else:
            if now >= deadline:
                break
            start = now
        try:
            async with asyncio.timeout(TIMEOUT_S):
                if conn is None or conn.transport is None:
                    _, conn = await loop.create_connection(_Conn, host, port)
                status = await conn.request(req)
            prev_end = time.monotonic_ns()
            samples.add(start, prev_end - start, status)
            if conn.close and conn.transport is not None:
                conn.transport.close()
                conn = None
        except (OSError, TimeoutError, RuntimeError, ValueError) as exc:
            prev_end = time.monotonic_ns()
            samples.add(start, prev_end - start, 0)
            samples.errors[type(exc).__name__] = samples.errors.get(type(exc).__name__, 0) + 1
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            conn = None
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def _async_main(args: argparse.Namespace, req: bytes, samples: _Samples) -> tuple[int, int]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if args.until_stdin_eof:
        # The parent closes our stdin to say "stop now".
        def on_stdin() -> None:
            if not os.read(0, 4096):
                loop.remove_reader(0)
                stop.set()

        loop.add_reader(0, on_stdin)
    t0 = time.monotonic_ns()
    deadline = t0 + int(args.duration * 1e9)
    interval = int(1e9 * args.connections / args.rate) if args.rate > 0 else 0
    tasks = [
        asyncio.create_task(
            _conn_loop(i, args.host, args.port, req, t0, deadline, interval, args.connections, stop, samples)
        )
        for i in range(args.connections)
    ]
    for task in tasks:
        await task  # a bug in the client must not pass for a quiet run
    return t0, min(time.monotonic_ns(), deadline)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HTTP/1.1 keep-alive POST load (the benchmarks' Python client)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--body-file", type=Path, required=True)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument(
        "--duration", type=float, required=True, help="seconds (the longest, with --until-stdin-eof)"
    )
    ap.add_argument(
        "--rate", type=float, default=0.0, help="requests/s over all connections; 0: as fast as possible"
    )
    ap.add_argument("--until-stdin-eof", action="store_true", help="stop early when stdin closes")
    ap.add_argument("--out", type=Path, required=True, help="where to write the samples (.npz)")
    ap.add_argument("--header", action="append", default=[], help="'Name: value', added to every request")
    args = ap.parse_args(argv)
    req = _request(args.host, args.port, args.path, args.body_file.read_bytes(), args.header)
    samples = _Samples()
    if args.connections == 1 and args.rate <= 0 and not args.until_stdin_eof:
        t0 = time.monotonic_ns()
        _blocking_loop(args.host, args.port, req, t0 + int(args.duration * 1e9), samples)
        t_end = time.monotonic_ns()
    else:
        import uvloop

        t0, t_end = uvloop.run(_async_main(args, req, samples))
    np.savez(
        args.out,
        start_ns=np.asarray(samples.start, dtype=np.int64),
        lat_ns=np.asarray(samples.lat, dtype=np.int64),
        status=np.asarray(samples.status, dtype=np.int16),
    )
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # Failed requests are in the samples with status 0; error_kinds says what they were.
    meta = {"t0_ns": t0, "t_end_ns": t_end, "error_kinds": samples.errors, "cpu_s": ru.ru_utime + ru.ru_stime}
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
