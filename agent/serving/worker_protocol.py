"""The parent's side of the frame protocol with a score.py worker (``worker_child.py`` has the child's).

Every message is a frame: a 4-byte big-endian length, then that many bytes: a JSON header line,
``\\n``, then a body of raw bytes, both ways. The parent sends the HTTP request (:class:`HttpRequest`:
method, path, query string and headers in the header, the request body after it); the child
answers with status and headers, then the response body. The child runs under an image's
interpreter that may not see the ``agent`` package, so the two sides cannot share this module:
``worker_child.py`` describes the protocol in full and must agree with this one.

Failures are exceptions the pool maps to HTTP errors: :class:`FrameTimeout` (the deadline passed),
:class:`WorkerGone` (the pipes closed: the worker died), :class:`FrameTooLarge` and
:class:`ProtocolError` (the worker sent something it should not have, so it cannot be trusted to
keep serving).
"""

from __future__ import annotations

import math
import os
import select
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edge_core.errors import ResultUnsendable, ScoreFailed, ScoreRefused, ScoringError

#: A response larger than this is refused (and the worker recycled): a bug in run() must not make
#: the agent allocate gigabytes.
MAX_RESPONSE_BYTES = 256 << 20

LEN_SIZE = 4
#: Up to this size a request goes out in one write with its length prefix; bigger ones are not
#: copied just to prepend 4 bytes.
_ONE_WRITE_MAX = 65536


class FrameTimeout(Exception):
    pass


class WorkerGone(Exception):
    """The worker's pipes closed: it died (or is dying)."""


class ProtocolError(Exception):
    pass


class FrameTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass(frozen=True)
class HttpRequest:
    """What the child needs of an HTTP request to call run() as Azure ML's server would. ``query``
    is the raw query string (percent-encoded); header names are lower case (as uvicorn gives them),
    values latin-1 text; ``client`` and ``server`` are addresses as text (for ``AMLRequest``)."""

    method: str = "POST"
    path: str = "/score"
    query: str = ""
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    body: bytes = b""
    scheme: str = "http"
    client: str | None = None
    server: tuple[str, int | None] | None = None

    def head(self) -> bytes:
        """The frame's JSON header line, ``\\n`` included; the body follows it."""
        doc = {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "scheme": self.scheme,
            "client": self.client,
            "server": self.server,
        }
        return orjson.dumps(doc) + b"\n"  # orjson escapes control characters: one line


class FramePipe:
    """Frames over a worker's stdin (``in_fd``) and stdout (``out_fd``), each call bounded by a
    deadline. Not thread-safe: one owner at a time (see
    :class:`~agent.serving.worker_process.WorkerProcess`)."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self._in = in_fd
        self._out = out_fd
        # Non-blocking writes, so a request larger than the pipe buffer cannot block past its deadline.
        os.set_blocking(self._in, False)
        self._pollin = select.poll()
        self._pollin.register(self._out, select.POLLIN)
        self._pollout = select.poll()
        self._pollout.register(self._in, select.POLLOUT)

    def _wait(self, poller: select.poll, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
            raise FrameTimeout

    def send(self, data: bytes, deadline: float, head: bytes = b"") -> None:
        """One frame: ``head`` then ``data`` (a large ``data`` is written without being copied)."""
        prefix = (len(head) + len(data)).to_bytes(LEN_SIZE, "big") + head
        for chunk in (prefix + data,) if len(data) <= _ONE_WRITE_MAX else (prefix, data):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(self._in, view) :]
                except BlockingIOError:
                    self._wait(self._pollout, deadline)
                except OSError:  # EPIPE: the worker is gone
                    raise WorkerGone from None

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._wait(self._pollin, deadline)
            try:
                k = os.readv(self._out, [view[got:]])
            except OSError:
                raise WorkerGone from None
            if k == 0:
                raise WorkerGone
            got += k
        return buf

    def recv(self, deadline: float) -> tuple[dict[str, Any], bytes]:
        """The next frame's JSON header and body."""
        size = int.from_bytes(self._read_exact(LEN_SIZE, deadline), "big")
        if size > MAX_RESPONSE_BYTES:
            raise FrameTooLarge(size)
        frame = self._read_exact(size, deadline)
        nl = frame.find(b"\n")
        if nl < 0:
            raise ProtocolError("frame without a header line")
        try:
            header = orjson.loads(memoryview(frame)[:nl])
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError("header is not a JSON object")
        return header, bytes(memoryview(frame)[nl + 1 :])


def collected_records(header: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The data-collection records a response header carries; anything malformed is dropped (they
    are telemetry, and must never turn a good answer into an error)."""
    records = header.get("collected")
    if not isinstance(records, list):
        return ()
    return tuple(r for r in records if isinstance(r, dict))


@dataclass(frozen=True)
class ScoreResult:
    """run()'s answer as Azure ML's server sends it. ``status`` and the content type differ from 200
    and JSON only when run() returned an HTTP response object (``AMLResponse``). ``headers`` are
    the response's own (``Content-Type``, ``x-ms-run-function-failed``, ``x-ms-run-fn-exec-ms`` and
    what an ``AMLResponse`` added), in order, repeated names included."""

    body: bytes
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    #: what the script's Azure ML data collectors collected during the request (worker_child.py)
    collected: tuple[dict[str, Any], ...] = ()

    @property
    def content_type(self) -> str:
        return next((v for k, v in self.headers if k.lower() == "content-type"), "application/json")


def answer(header: Mapping[str, Any], body: bytes) -> ScoreResult | ScoringError:
    """The child's answer frame as the pool hands it on: a result, or the error to raise (a request
    run() could not take, a result that cannot be sent, run() raising), with what the script's data
    collectors collected either way: a failing run()'s collected inputs are data too."""
    collected = collected_records(header)
    if header.get("ok"):
        headers = header.get("headers")
        pairs = tuple((str(k), str(v)) for k, v in headers) if isinstance(headers, list) else ()
        return ScoreResult(body, int(header.get("status") or 200), pairs, collected)
    error = str(header.get("error") or "run() failed")
    kind = header.get("kind")
    failed: ScoringError
    if kind == "input":
        failed = ScoreRefused(int(header.get("status") or 400), error)
    elif kind == "internal":
        failed = ResultUnsendable(
            error, "return JSON-serialisable values or an AMLResponse; the traceback is in the agent's log"
        )
    else:
        tb = header.get("traceback")
        failed = ScoreFailed(
            error, "fix the scoring script; its traceback is in the agent's log", traceback=tb if tb else None
        )
    failed.collected = collected
    return failed
