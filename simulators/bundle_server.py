"""A local HTTP(S) server for bundle files, with the failures real networks produce, on demand.

The agent's downloader must cope with transfers that stop halfway, servers that ignore ``Range``,
bodies that are corrupted or longer than declared, transient 5xx answers and slow links. Testing
that against a real socket, rather than a mocked HTTP client, exercises the code paths that matter:
partial reads, connection resets, resume with ``Range`` and the digest check at the end.

The serving itself is the control plane's artifact endpoint, :class:`deploy.artifact_server.ArtifactServer`:
files without a fault are served exactly as ``edge-deploy serve`` serves them, through ``sendfile(2)``
so that the benchmark can download hundreds of MiB through it without the server being the
bottleneck. This module adds only the faults: a :class:`Fault` is attached to one file name with
:meth:`BundleServer.set_fault`. Every request is recorded in :attr:`BundleServer.requests`, so a
test can assert, for example, that a resumed download sent a ``Range`` header.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from deploy.artifact_server import (
    ArtifactHandler,
    ArtifactServer,
    Body,
    RangeNotSatisfiable,
    RequestRecord,
    parse_range,
)

__all__ = ["BundleServer", "Fault", "RangeNotSatisfiable", "RequestRecord", "parse_range"]

#: Size of the writes on the faulted path: large enough to be cheap, small enough to cut precisely.
CHUNK = 256 * 1024
#: Corruption flips one byte per block of this size, starting with the first byte of the body.
CORRUPT_STRIDE = 4096


@dataclass(frozen=True)
class Fault:
    """Failures to inject when one file is requested.

    ``status``: answer this HTTP status to the first ``status_times`` requests (GET or HEAD) for the
    file, then serve it normally: a transient 500, or a 404 / 403 that should not be retried forever.

    ``cut_after``: send correct headers (the full Content-Length) but close the connection after this
    many body bytes, for the first ``cut_times`` GET requests; later ones are served in full, so a
    client can resume.

    ``corrupt``: flip one byte in every 4 KiB of the body; the length stays right, the digest does not.

    ``extra_bytes``: serve the file followed by this many zero bytes, with a Content-Length that counts
    them: a server sending more than the manifest declared.

    ``rate_bytes_per_s``: throttle the body to this rate.

    ``ignore_range``: answer 200 with the whole body even when a Range header asks for part of it,
    as some proxies and object stores do.
    """

    cut_after: int | None = None
    cut_times: int = 1
    corrupt: bool = False
    extra_bytes: int = 0
    status: int | None = None
    status_times: int = 1
    rate_bytes_per_s: int | None = None
    ignore_range: bool = False

    def __post_init__(self) -> None:
        if self.cut_after is not None and self.cut_after < 0:
            raise ValueError("cut_after must be >= 0")
        if self.cut_times < 0 or self.status_times < 0:
            raise ValueError("cut_times and status_times must be >= 0")
        if self.extra_bytes < 0:
            raise ValueError("extra_bytes must be >= 0")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")
        if self.rate_bytes_per_s is not None and self.rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be positive")

    @property
    def alters_body(self) -> bool:
        """Whether serving needs the byte-by-byte path rather than sendfile."""
        return self.corrupt or self.extra_bytes > 0 or self.rate_bytes_per_s is not None


@dataclass
class _FaultState:
    fault: Fault
    statuses_sent: int = 0
    cuts_done: int = 0


class _FaultyBody(Body):
    """One response for a file that has a fault: padded, Range ignored, cut, corrupted or throttled."""

    def __init__(self, file: BinaryIO, file_size: int, owner: BundleServer, name: str, fault: Fault) -> None:
        super().__init__(file, file_size)
        self.owner = owner
        self.name = name
        self.fault = fault
        self.honours_range = not fault.ignore_range
        self.cut_after: int | None = None

    @property
    def size(self) -> int:
        return self.file_size + self.fault.extra_bytes

    def plan(self, start: int, stop: int, *, head: bool) -> int:
        if head:
            return 0
        # Taken only by a GET whose headers are chosen: a 416 or a HEAD uses up no cut.
        self.cut_after = self.owner._take_cut(self.name)
        return stop - start if self.cut_after is None else min(stop - start, self.cut_after)

    def send(self, handler: ArtifactHandler, start: int, stop: int) -> None:
        fault, cut_after = self.fault, self.cut_after
        if cut_after is None and not fault.alters_body:
            super().send(handler, start, stop)
            return
        limit = stop if cut_after is None else min(stop, start + cut_after)
        rate = fault.rate_bytes_per_s
        chunk = CHUNK if rate is None else max(1, min(CHUNK, rate // 10))
        began = time.monotonic()
        sent = 0
        for data in _body_chunks(self.file, self.file_size, start, limit, chunk):
            body = _corrupt(data, sent) if fault.corrupt else data
            if rate is not None:
                # Hold each chunk until the average rate allows it, so the whole body takes size/rate.
                delay = began + (sent + len(body)) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            handler.write_body(body)
            sent += len(body)
        if limit < stop:
            # Headers promised more than this: the client must see the transfer stop short.
            handler.drop_connection()


def _corrupt(data: bytes, offset: int) -> bytes:
    """Invert the bytes of ``data`` that sit at multiples of CORRUPT_STRIDE in the response body.

    ``offset`` is where ``data`` starts in the body, so the pattern does not depend on chunk sizes.
    """
    body = bytearray(data)
    for i in range((-offset) % CORRUPT_STRIDE, len(body), CORRUPT_STRIDE):
        body[i] ^= 0xFF
    return bytes(body)


def _body_chunks(file: BinaryIO, file_size: int, start: int, stop: int, chunk: int) -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of the file followed by zero filler past its end (``extra_bytes``)."""
    position = start
    if position < file_size:
        file.seek(position)
    while position < stop:
        want = min(chunk, stop - position)
        if position < file_size:
            data: bytes = file.read(min(want, file_size - position))
            if not data:
                raise OSError(f"file shrank while being served (at byte {position})")
        else:
            data = bytes(want)
        yield data
        position += len(data)


class BundleServer(ArtifactServer):
    """Serve the files under ``root`` at ``http://127.0.0.1:PORT/NAME``, optionally with faults.

    Everything but the faults is :class:`~deploy.artifact_server.ArtifactServer`'s: the free port,
    the background threads, ``tls=(cert_path, key_path)``, ``keep_requests`` and the records.
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
        super().__init__(root, host=host, port=port, tls=tls, keep_requests=keep_requests)
        self._faults_lock = threading.Lock()
        self._faults: dict[str, _FaultState] = {}

    # -- faults ----------------------------------------------------------------------------------

    def set_fault(self, name: str, fault: Fault | None) -> None:
        """Attach ``fault`` to the file ``name`` (None removes it); its counters start from zero."""
        name = name.lstrip("/")
        with self._faults_lock:
            if fault is None:
                self._faults.pop(name, None)
            else:
                self._faults[name] = _FaultState(fault)

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget every fault and recorded request (between tests sharing one server)."""
        self.clear_faults()
        super().reset()

    # -- the hooks -------------------------------------------------------------------------------

    def _intercept(self, name: str) -> int | None:
        return self._take_status_fault(name)

    def _body(self, name: str, file: BinaryIO, file_size: int) -> Body:
        fault = self._fault(name)
        if fault is None:
            return super()._body(name, file, file_size)
        return _FaultyBody(file, file_size, self, name, fault)

    def _fault(self, name: str) -> Fault | None:
        with self._faults_lock:
            state = self._faults.get(name)
            return state.fault if state is not None else None

    def _take_status_fault(self, name: str) -> int | None:
        with self._faults_lock:
            state = self._faults.get(name)
            if state is None or state.fault.status is None or state.statuses_sent >= state.fault.status_times:
                return None
            state.statuses_sent += 1
            return state.fault.status

    def _take_cut(self, name: str) -> int | None:
        with self._faults_lock:
            state = self._faults.get(name)
            if state is None or state.fault.cut_after is None or state.cuts_done >= state.fault.cut_times:
                return None
            state.cuts_done += 1
            return state.fault.cut_after
