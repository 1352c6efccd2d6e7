"""Download an image bundle: streaming, resumable, size-capped, hashed on the way in.

The bytes go to ``<dest>.partial``. An interrupted transfer (connection cut, timeout, 5xx, agent
killed) resumes from the partial file's length with an HTTP Range request; a server that ignores the
Range header (answers 200) restarts the file from zero. Reading stops the moment more bytes arrive
than the manifest declared. The SHA-256 is computed while the bytes arrive, on a second thread
(hashlib releases the GIL), so verification costs no extra pass over the file.

httpx errors are translated here, at the boundary, into :class:`DownloadError` with a stable code.
"""

from __future__ import annotations

import hashlib
import os
import queue
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpcore
import httpx

from agent.config import DownloadConfig
from edge_core.errors import DownloadError, ErrorCode
from edge_core.fsutil import file_chunks, hash_file
from edge_core.log import get_logger
from edge_core.retry import backoff_delays

log = get_logger("fetch")

ProgressFn = Callable[[int, int], None]

#: Socket read size for HTTP/1.1 bodies. httpcore reads 64 KiB at a time by default, and every read
#: costs tens of microseconds of Python (h11 parsing, a settimeout syscall) on top of the copy: about a
#: fifth of the download time of a large bundle on a small CPU. A read returns whatever has arrived,
#: so timeouts, cuts and resume behave as before; the price is up to 1 MiB per read in memory. This is
#: a class attribute, so it applies to every HTTP/1.1 connection of the process (the agent's only httpx
#: user is this module). Measured in docs/benchmarks.md.
READ_SIZE = 1 << 20
if (
    getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE
):  # absent in a future httpcore: skip
    httpcore.HTTP11Connection.READ_NUM_BYTES = READ_SIZE

#: Largest single write(2) to the partial file. Writes of 1 MiB and more let the kernel (Linux 6.x,
#: filesystems with large folios) fill the page cache with 1 MiB+ folios, which come from the free
#: memory blocks that a VM's balloon driver (free page reporting) hands back to the hypervisor: on such
#: a VM, writing 256 MiB that way took 290 ms instead of 55 ms whenever the memory had been idle for a
#: second or two. 512 KiB writes cost the same as 1 MiB ones otherwise (docs/benchmarks.md).
WRITE_SIZE = 512 << 10


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (short writes continue), at most WRITE_SIZE bytes per write(2)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + WRITE_SIZE])


class _Hasher:
    """SHA-256 fed from a queue on its own thread, so hashing overlaps network and disk I/O.

    The queue is short on purpose. With chunks of up to 1 MiB (READ_SIZE, and ``chunk_size`` for
    ``file://``), a deep queue lets the receiver run up to 64 MiB ahead of the hasher: that much memory
    held, and when the body ends it is still to be hashed, alone on one core. Four chunks keep the
    hasher a few MiB behind, as the 64 x 64 KiB queue did before (docs/benchmarks.md).
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._t = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()


class _Retry(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""


class _NextUrl(Exception):
    """Internal: this URL will not work (e.g. 404, 403); try the next one."""


class Fetcher:
    def __init__(self, cfg: DownloadConfig, client: httpx.Client | None = None) -> None:
        self.cfg = cfg
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(cfg.timeout),
            verify=ssl.create_default_context(cafile=str(cfg.ca)) if cfg.ca else True,
            follow_redirects=True,
            max_redirects=cfg.max_redirects,
            headers={"Accept-Encoding": "identity", "User-Agent": "edge-agent"},
        )
        self._delay = backoff_delays(cfg.backoff_min, cfg.backoff_max)

    def close(self) -> None:
        self._client.close()

    def fetch(
        self,
        urls: tuple[str, ...] | list[str],
        partial: Path,
        size: int,
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> str:
        """Fetch into ``partial`` until it holds exactly ``size`` bytes; return their SHA-256 (hex).

        Tries each URL in turn, each up to ``retries`` times with jittered exponential backoff.
        Raises DownloadError(size_exceeded) at once if a server sends more than ``size`` bytes
        (that is hostile or a wrong manifest; retrying would not help), and
        DownloadError(download_failed) when every URL has been tried.
        """
        last = "no URL"
        limit_s = self.cfg.deadline_base + size / self.cfg.min_rate if self.cfg.min_rate > 0 else None
        deadline = time.monotonic() + limit_s if limit_s is not None else float("inf")

        def stop_or_late() -> bool:
            if time.monotonic() > deadline:
                raise DownloadError(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"the download did not finish within {limit_s:.0f} s ({size} bytes at "
                    f"download.min_rate = {self.cfg.min_rate} B/s, plus download.deadline_base)",
                    "check the link to the bundle server, or lower download.min_rate for slow links",
                    retryable=True,
                )
            return should_stop()

        for url in urls:
            for attempt in range(self.cfg.retries):
                if stop_or_late():
                    raise _stopped()
                try:
                    return self._attempt(url, partial, size, progress, stop_or_late)
                except _Retry as exc:
                    last = f"{_redact(url)}: {exc}"
                    if attempt + 1 < self.cfg.retries:
                        d = self._delay(attempt)
                        log.warning(
                            "download.retry",
                            url=_redact(url),
                            attempt=attempt + 1,
                            error=str(exc),
                            delay_s=round(d, 2),
                        )
                        _sleep(d, stop_or_late)
                except _NextUrl as exc:
                    last = f"{_redact(url)}: {exc}"
                    log.warning("download.url_failed", url=_redact(url), error=str(exc))
                    break
        raise DownloadError(
            ErrorCode.DOWNLOAD_FAILED,
            f"could not download the bundle after trying {len(urls)} URL(s): {last}",
            "check that the URLs are reachable from the device and not expired",
            retryable=True,
        )

    def _attempt(
        self, url: str, partial: Path, size: int, progress: ProgressFn | None, should_stop: Callable[[], bool]
    ) -> str:
        if url.startswith("file://"):
            return self._copy_local(url[len("file://") :], partial, size, progress, should_stop)
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # a partial file from an older attempt at a different bundle: start over
            partial.unlink()
            have = 0
        if have == size:
            return hash_file(partial)
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 206 and have:
                    start = _content_range_start(resp.headers.get("content-range", ""))
                    if start != have:
                        raise _Retry(f"server resumed at byte {start}, asked for {have}")
                elif resp.status_code == 200:
                    have = 0  # server ignored the Range header (or there was none): start over
                elif resp.status_code == 416:
                    partial.unlink(missing_ok=True)
                    raise _Retry("server refused the resume range; restarting from zero")
                elif resp.status_code in (408, 425, 429) or resp.status_code >= 500:
                    raise _Retry(f"HTTP {resp.status_code}")
                else:
                    raise _NextUrl(f"HTTP {resp.status_code}")
                expected = resp.headers.get("content-length")
                if expected is not None and expected.isdigit() and have + int(expected) > size:
                    raise _oversize(size, have + int(expected), "announced")
                hasher = _Hasher()
                with open(partial, "r+b" if have else "wb", buffering=0) as f:
                    if have:
                        for chunk in file_chunks(partial, have):
                            hasher.update(chunk)
                        f.seek(have)
                        f.truncate()
                    got = have
                    last_report = 0.0
                    for chunk in resp.iter_raw():
                        got += len(chunk)
                        if got > size:
                            raise _oversize(size, got, "sent")
                        _write_all(f.fileno(), chunk)
                        hasher.update(chunk)
                        # Checked at least every half second, and on every chunk of a trickle.
                        if (now := time.monotonic()) - last_report >= 0.5 or len(chunk) < 4096:
                            last_report = now
                            if should_stop():
                                raise _stopped()
                            if progress is not None:
                                progress(got, size)
                    digest = hasher.hexdigest()
                if got < size:
                    raise _Retry(f"transfer ended at byte {got} of {size}")
                if progress is not None:
                    progress(got, size)
                return digest
        except httpx.TimeoutException as exc:
            raise _Retry(f"timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except httpx.InvalidURL as exc:
            raise _NextUrl(f"invalid URL: {exc}") from None
        except httpx.TooManyRedirects:
            raise _NextUrl(f"more than {self.cfg.max_redirects} redirects") from None

    def _copy_local(
        self,
        path: str,
        partial: Path,
        size: int,
        progress: ProgressFn | None,
        should_stop: Callable[[], bool],
    ) -> str:
        """``file://`` URLs: for bundles on removable media or a shared mount (air-gapped sites).

        Only a regular file is read (a FIFO would block the deployer, ``/dev/zero`` never ends), and
        never more than the declared size plus one byte."""
        try:
            # O_NONBLOCK: opening a FIFO with no writer would otherwise block here, before the check.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _NextUrl(f"cannot read {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _NextUrl(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        with open(fd, "rb", buffering=0) as src:
            if st.st_size > size:
                raise _oversize(size, st.st_size, "holds")
            hasher = _Hasher()
            got = 0
            with open(partial, "wb", buffering=0) as dst:
                while chunk := src.read(min(self.cfg.chunk_size, size + 1 - got)):
                    got += len(chunk)
                    if got > size:  # the file grew while it was read
                        raise _oversize(size, got, "holds")
                    _write_all(dst.fileno(), chunk)
                    hasher.update(chunk)
                    if should_stop():
                        raise _stopped()
        if progress is not None:
            progress(got, size)
        digest = hasher.hexdigest()
        if got < size:
            raise _NextUrl(f"{path} holds {got} bytes, the manifest declares {size}")
        return digest


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Back off, but give up the wait at once when told to stop (a newer manifest, SIGTERM)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if should_stop():
            raise _stopped()
        time.sleep(min(0.1, left))


def _stopped() -> DownloadError:
    return DownloadError(
        ErrorCode.SUPERSEDED,
        "download stopped: a newer manifest arrived or the agent is stopping",
        retryable=True,
    )


def _oversize(size: int, got: int, verb: str) -> DownloadError:
    return DownloadError(
        ErrorCode.SIZE_EXCEEDED,
        f"server {verb} {got} bytes, more than the {size} the manifest declares; download stopped",
        "check the image's size in the manifest, and the server for tampering",
    )


def _content_range_start(value: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _redact(url: str) -> str:
    """Never log a SAS token or a presigned signature."""
    return url.split("?", 1)[0]
