"""One score.py worker process as the pool sees it, and the thread that spawns them.

:class:`WorkerProcess` owns a child's pipes (frames through
:class:`~agent.serving.worker_protocol.FramePipe`), its stderr (logged line by line, the last lines
kept for crash reports), its signals and its reaping. :class:`Forker` spawns a pool's children from
one long-lived thread. The pool itself, which decides when a worker is started, used, retired and
replaced, is :mod:`agent.serving.worker`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any

from agent.serving.worker_protocol import FramePipe
from edge_core.log import get_logger

log = get_logger("worker")

STDERR_TAIL_LINES = 60
STDERR_LINE_MAX = 8192


class PoolClosed(Exception):
    """The pool is stopping: nothing new may be spawned into it."""


class Forker:
    """Runs every process spawn of a pool on one thread that lives as long as the pool.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a worker
    forked from a short-lived respawn thread or a request thread would be SIGKILLed by the kernel as
    soon as that thread ended.
    """

    def __init__(self, name: str) -> None:
        self._queue: SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]], Future[Any]] | None] = (
            SimpleQueue()
        )
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        fut: Future[subprocess.Popen[bytes]] = Future()
        with self._lock:
            if self._stopped:
                raise PoolClosed
            self._queue.put((fn, fut))
        return fut.result()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        self._thread.join()


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class WorkerProcess:
    """One child process. Its pipes are used by one owner at a time: the pool while it is idle, the
    request thread while busy, the initialising thread while starting."""

    def __init__(
        self, slot: int, proc: subprocess.Popen[bytes], label: str, on_exit: Callable[[WorkerProcess], None]
    ) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.slot = slot
        self.proc = proc
        self.pid = proc.pid
        self.label = label
        self.state = "starting"  # -> idle <-> busy; any -> dead
        self._on_exit = on_exit
        self.pipe = FramePipe(proc.stdin.fileno(), proc.stdout.fileno())
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self.pump = threading.Thread(target=self._pump, name=f"worker-{self.pid}-output", daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        """Log what the user's code prints, keep the last lines for crash reports, and tell the
        pool when the process has exited."""
        stream = self.proc.stderr
        assert stream is not None
        try:
            for raw in iter(lambda: stream.readline(STDERR_LINE_MAX), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._tail_lock:
                    self._tail.append(line)
                log.info("worker.output", image=self.label, slot=self.slot, pid=self.pid, line=line)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                stream.close()
        # Wait for the exit without reaping: see kill().
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        self._on_exit(self)

    def has_exited(self) -> bool:
        if self.proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def tail(self, n: int = STDERR_TAIL_LINES) -> str:
        with self._tail_lock:
            return "\n".join(list(self._tail)[-n:])

    def exit_text(self) -> str:
        return describe_exit(self.proc.returncode)

    def signal(self, sig: int) -> None:
        """Signal the worker's process group: it leads its own session, so the user's
        subprocesses get it too."""
        with self._reap_lock:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker's process group, then reap the worker.

        Only this method reaps (the pump and the pool wait with WNOWAIT). Until the worker is
        reaped its pid stays allocated, even as a zombie, so killpg cannot hit an unrelated process
        that reused the number; and a worker that already exited still has its group killed, which
        takes the subprocesses it left behind."""
        with self._reap_lock:
            if self.proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # stuck in the kernel (D state): it dies when it can
                log.error("worker.unkillable", image=self.label, slot=self.slot, pid=self.pid)

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def close(self) -> None:
        self.close_stdin()
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdout.close()
