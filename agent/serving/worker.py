"""score.py workers: an image's Azure ML scoring script runs in child processes, never in the agent.

    pool = WorkerPool(image_dir, python=ensure_image_env(...), size=2, timeout_s=30.0)
    pool.start()                  # spawns the workers, waits for init(); raises ScoreInitFailed
    body = pool.run(raw_body)     # from any number of threads; raises ScoringError(http_status)
    res = pool.score(HttpRequest("GET", "/score", "a=1", headers))  # any request; status, headers, body
    pool.stop()

Each worker runs ``agent/serving/worker_child.py`` (see there for the protocol: length-prefixed frames on
the child's stdin/stdout; :mod:`agent.serving.worker_protocol` is the parent's side of it, and
:mod:`agent.serving.worker_process` one worker process's handle). This module is the pool. What the
user's code does cannot take the agent down:

- ``run()`` raises: the worker answers with the exception, the pool raises :class:`ScoreFailed`
  (HTTP 500) and the worker keeps serving. A request that cannot be run()'s arguments is
  :class:`ScoreRefused` (400, 405 or 415, Azure ML's message); a result that cannot be sent is
  :class:`ResultUnsendable` (500).
- ``run()`` hangs: after ``timeout_s`` the worker is SIGKILLed (with its process group, so its own
  subprocesses go too), :class:`ScoreTimeout` (504), a new worker starts in the background.
- the worker dies (segfault, ``os._exit``, the OOM killer): :class:`WorkerUnavailable` (503) for
  the request it was serving and for every request while no worker is alive; a new one starts.
  Repeated failures in a slot without a successful request in between back off exponentially
  (0, 0.5 s, 1 s, ... 30 s), so a script that crashes in ``init()`` cannot spin the CPU.
- the agent dies, even by SIGKILL: the workers get SIGKILL from the kernel (PR_SET_PDEATHSIG, set
  by the child) and also notice on their own (ppid watch, end of stdin).

Requests wait for an idle worker for at most ``timeout_s`` (then 503: all busy), then have
``timeout_s`` for ``run()`` itself. Every request and every spawn is logged with the image's short
digest; each line the user's code writes to stdout or stderr becomes a ``worker.output`` log line.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from agent.serving.worker_child import PARENT_PID_ENV
from agent.serving.worker_process import Forker, PoolClosed, WorkerProcess
from agent.serving.worker_protocol import (
    MAX_RESPONSE_BYTES,
    FrameTimeout,
    FrameTooLarge,
    HttpRequest,
    ProtocolError,
    ScoreResult,
    WorkerGone,
    answer,
)
from edge_core.errors import (
    ScoreFailed,
    ScoreInitFailed,
    ScoreRefused,
    ScoreTimeout,
    ScoringError,
    WorkerUnavailable,
)
from edge_core.log import get_logger

log = get_logger("worker")

CHILD_SCRIPT = Path(__file__).resolve().with_name("worker_child.py")
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolStats:
    size: int
    alive: int
    requests: int
    errors: int
    restarts: int
    timeouts: int
    crashes: int


# --- internals -------------------------------------------------------------------------------


def _backoff(failures: int) -> float:
    """Delay before respawning a slot after ``failures`` failures in a row: the first is immediate."""
    return 0.0 if failures <= 1 else min(BACKOFF_FIRST_S * 2 ** (failures - 2), BACKOFF_MAX_S)


# --- the pool --------------------------------------------------------------------------------


class _Box:
    """A waiting request's slot, into which a released worker is handed."""

    __slots__ = ("worker",)

    def __init__(self) -> None:
        self.worker: WorkerProcess | None = None


class WorkerPool:
    """``size`` worker processes running one image's entry script; see the module docstring.

    ``python`` is the interpreter to run them with (the image's environment from
    :func:`agent.serving.pyenv.ensure_image_env`, or the agent's own); ``env`` adds variables to the
    agent's environment for them.
    """

    def __init__(
        self,
        image_dir: Path,
        *,
        python: str = sys.executable,
        size: int = 1,
        timeout_s: float = 30.0,
        init_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
        entry_script: str = "score.py",
        stop_grace_s: float = 5.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        if timeout_s <= 0 or init_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        entry = PurePosixPath(entry_script)
        if entry.is_absolute() or ".." in entry.parts or entry.suffix != ".py" or "\\" in entry_script:
            raise ScoreInitFailed(f"entry script {entry_script!r} must be a .py file inside the image")
        self.image_dir = Path(os.path.abspath(image_dir))
        self.python = python
        self.size = size
        self.timeout_s = timeout_s
        self.init_timeout_s = init_timeout_s
        self.entry_script = entry_script
        self.stop_grace_s = stop_grace_s
        self._extra_env = dict(env or {})
        self._label = self.image_dir.name[:12]

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slots: list[WorkerProcess | None] = [None] * size
        self._idle: list[WorkerProcess] = []
        #: requests waiting for a worker, oldest first (first come, first served)
        self._waiters: collections.deque[_Box] = collections.deque()
        self._fails = [0] * size
        self._started = False
        self._closed = False
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._forker: Forker | None = None
        self._respawners: set[threading.Thread] = set()
        self._requests = self._errors = self._restarts = self._timeouts = self._crashes = 0
        #: How the workers call run() (``plain``, ``schema``, ``rawhttp``) and what /swagger.json is
        #: made of: from the first worker's ready message (every worker runs the same script).
        self.mode = "plain"
        self.swagger: dict[str, Any] | None = None

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- public ----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers and wait until each one's init() has returned (at most
        ``init_timeout_s``, all in parallel). Raises :class:`ScoreInitFailed`, stopping the pool,
        if any import or init() raises, crashes or times out."""
        with self._lock:
            if self._started:
                raise RuntimeError("WorkerPool.start() called twice")
            self._started = True
        self._forker = Forker(f"worker-fork-{self._label}")
        t0 = time.monotonic()
        deadline = t0 + self.init_timeout_s
        workers: list[WorkerProcess] = []
        try:
            for slot in range(self.size):
                workers.append(self._spawn(slot))
            for w in workers:
                self._await_ready(w, deadline)
        except PoolClosed:
            self.stop()
            raise ScoreInitFailed("the worker pool was stopped while starting") from None
        except BaseException as exc:
            if isinstance(exc, ScoreInitFailed):
                log.error("worker.init_failed", image=self._label, error=exc.message, traceback=exc.traceback)
            self.stop()
            raise
        with self._lock:
            for w in workers:
                self._make_idle_locked(w)
        log.info(
            "pool.started",
            image=self._label,
            size=self.size,
            python=self.python,
            pids=[w.pid for w in workers],
            seconds=round(time.monotonic() - t0, 3),
        )

    def run(self, raw: bytes) -> bytes:
        """POST ``raw`` (as JSON) to run() in an idle worker; the response body, as Azure ML would send it."""
        return self.score(raw).body

    def score(self, request: bytes | HttpRequest) -> ScoreResult:
        """Like :meth:`run` for any HTTP request (a bare body is a POST of JSON), with the status and
        headers of the answer."""
        if isinstance(request, bytes):
            request = HttpRequest(body=request)
        try:
            return self._score(request)
        except ScoringError:
            with self._lock:
                self._errors += 1
            raise

    def alive(self) -> int:
        """Workers that have finished init() and are serving (idle or busy)."""
        with self._lock:
            return sum(1 for w in self._slots if w is not None and w.state in ("idle", "busy"))

    def pids(self) -> list[int]:
        """Process ids of the current workers (starting ones included)."""
        with self._lock:
            return [w.pid for w in self._slots if w is not None and w.state != "dead"]

    def stats(self) -> PoolStats:
        with self._lock:
            alive = sum(1 for w in self._slots if w is not None and w.state in ("idle", "busy"))
            return PoolStats(
                self.size, alive, self._requests, self._errors, self._restarts, self._timeouts, self._crashes
            )

    def stop(self) -> None:
        """Stop every worker: idle ones get end-of-input and exit cleanly, busy or starting ones
        SIGTERM; whatever is left after ``stop_grace_s`` is SIGKILLed. All are reaped. Requests in
        flight get :class:`WorkerUnavailable`. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            with self._lock:
                self._closed = True
                workers = [w for w in self._slots if w is not None and w.state != "dead"]
                idle = self._idle[:]
                self._idle.clear()
                for w in idle:
                    w.state = "dead"
                respawners = list(self._respawners)
                self._cond.notify_all()
            self._stopping.set()
            for w in workers:
                if w in idle:
                    w.close_stdin()  # its read loop ends and it exits normally (atexit handlers run)
                else:
                    w.signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            while not all(w.has_exited() for w in workers) and time.monotonic() < deadline:
                time.sleep(0.02)
            for w in workers:
                if not w.has_exited():
                    log.warning("worker.stop_timeout", image=self._label, slot=w.slot, pid=w.pid)
                w.kill()  # also takes down what the user's code left running in its process group
            for w in idle:
                w.close()
            for t in respawners:
                t.join(timeout=self.stop_grace_s)
            if self._forker is not None:
                self._forker.stop()
            for w in workers:
                w.pump.join(timeout=1.0)
            self._stopped = True
            log.info("pool.stopped", image=self._label, stopped=[w.pid for w in workers])

    # --- requests --------------------------------------------------------------------------

    def _acquire(self, deadline: float) -> WorkerProcess:
        """An idle worker, or a place in the queue for the next one. First come, first served: a
        released worker is handed to the longest-waiting request (see _offer_locked), so a thread
        that just finished cannot take its worker back ahead of requests already waiting."""
        dead: list[tuple[WorkerProcess, float | None]] = []
        box = _Box()
        queued = False
        try:
            with self._cond:
                self._requests += 1
                while True:
                    if box.worker is not None:
                        w, box.worker = box.worker, None
                        if not w.has_exited():
                            return w
                        self._crashes += 1  # died between the hand-off and now: wait for the next one
                        dead.append((w, self._mark_dead_locked(w)))
                    if self._closed:
                        raise WorkerUnavailable("the image's scoring workers are stopped", "retry")
                    while self._idle and not self._waiters:
                        w = self._idle.pop()  # LIFO: the most recently used worker has warm caches
                        if w.has_exited():  # died while idle; its output pump may not know yet
                            self._crashes += 1
                            dead.append((w, self._mark_dead_locked(w)))
                            continue
                        w.state = "busy"
                        return w
                    if not any(w is not None and w.state in ("busy", "idle") for w in self._slots):
                        raise WorkerUnavailable(
                            "no scoring worker is running: "
                            + ("they are starting" if not self._started else "a new one is starting"),
                            "retry in a moment",
                        )
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WorkerUnavailable(
                            f"all {self.size} scoring workers stayed busy for {self.timeout_s:g} s",
                            "retry later, or raise runtime.workers",
                        )
                    if not queued:
                        self._waiters.append(box)
                        queued = True
                    self._cond.wait(remaining)
        finally:
            if queued:
                with self._cond:
                    if box in self._waiters:
                        self._waiters.remove(box)
            for w, delay in dead:
                self._finish_retire(w, "exited while idle", delay)

    def _offer_locked(self, w: WorkerProcess) -> None:
        """A worker became free: to the longest-waiting request if there is one, else to the idle list."""
        if self._waiters:
            box = self._waiters.popleft()
            box.worker = w
            w.state = "busy"
            self._cond.notify_all()  # each waiter looks at its own box
            return
        w.state = "idle"
        self._idle.append(w)
        self._cond.notify()

    def _score(self, request: HttpRequest) -> ScoreResult:
        head = request.head()
        w = self._acquire(time.monotonic() + self.timeout_s)
        try:
            w.pipe.send(request.body, time.monotonic() + self.timeout_s, head)
            header, body = w.pipe.recv(time.monotonic() + self.timeout_s)
        except FrameTimeout:
            self._retire(w, "timeout")
            raise ScoreTimeout(
                f"run() did not answer within {self.timeout_s:g} s; the worker was killed and is restarting",
                "make run() faster or raise runtime.request_timeout",
            ) from None
        except FrameTooLarge as exc:
            self._retire(w, "response too large")
            raise ScoreFailed(
                f"run() returned {exc.size} bytes, more than the {MAX_RESPONSE_BYTES} byte limit"
            ) from None
        except (WorkerGone, ProtocolError):
            self._retire(w, "crashed")
            if self._closed:
                raise WorkerUnavailable("the image's scoring workers are stopped", "retry") from None
            raise WorkerUnavailable(
                f"the scoring worker died during the request ({w.exit_text()}); a new one is starting",
                "retry; the agent's log has the worker's last output",
            ) from None
        except BaseException:
            self._retire(w, "internal error")
            raise
        self._release(w)
        result = answer(header, body)
        if isinstance(result, ScoreResult):
            return result
        if not isinstance(result, ScoreRefused):
            log.warning(
                "worker.run_failed", image=self._label, slot=w.slot, pid=w.pid,
                kind=header.get("kind"), error=result.message, traceback=result.traceback,
            )  # fmt: skip
        raise result

    def _release(self, w: WorkerProcess) -> None:
        with self._lock:
            self._fails[w.slot] = 0  # it answered: the slot is healthy again, backoff starts over
            if w.state != "busy":
                return
            if self._closed:
                w.state = "dead"
                w.close()  # stop() is waiting for it: end of input makes it exit
                return
            self._offer_locked(w)

    # --- lifecycle ------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._extra_env)
        env[PARENT_PID_ENV] = str(os.getpid())
        return env

    def _spawn(self, slot: int) -> WorkerProcess:
        assert self._forker is not None
        cmd = [self.python, str(CHILD_SCRIPT), str(self.image_dir), self.entry_script]
        env = self._child_env()

        def popen() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.image_dir,
                # Its own session: a Ctrl-C meant for the agent does not reach it, and killpg takes
                # the user's subprocesses along with it.
                start_new_session=True,
            )

        try:
            proc = self._forker.call(popen)
        except OSError as exc:
            raise ScoreInitFailed(f"cannot start a worker with {self.python}: {exc}") from None
        w = WorkerProcess(slot, proc, self._label, self._on_exit)
        with self._lock:
            closed = self._closed
            if not closed:
                self._slots[slot] = w
        if closed:
            w.kill()
            w.close()
            raise PoolClosed
        log.info("worker.spawned", image=self._label, slot=slot, pid=w.pid, python=self.python)
        return w

    def _await_ready(self, w: WorkerProcess, deadline: float) -> None:
        """Read the worker's first frame; on failure the worker is killed, reaped and closed."""
        try:
            header, _ = w.pipe.recv(deadline)
        except FrameTimeout:
            w.kill()
            w.close()
            raise ScoreInitFailed(
                f"{self.entry_script}: import and init() did not finish within {self.init_timeout_s:g} s",
                w.tail(),
            ) from None
        except (WorkerGone, ProtocolError, FrameTooLarge):
            w.kill()
            w.close()
            w.pump.join(timeout=1.0)  # the crash's last words (faulthandler's dump) are in its output
            raise ScoreInitFailed(
                f"{self.entry_script}: the worker died during import or init() ({w.exit_text()})", w.tail()
            ) from None
        if not header.get("ok"):
            w.kill()
            w.close()
            raise ScoreInitFailed(
                f"{self.entry_script}: {header.get('error') or 'init() failed'}",
                str(header.get("traceback") or "") or None,
            )
        with self._lock:
            self.mode = str(header.get("mode") or "plain")
            swagger = header.get("swagger")
            self.swagger = swagger if isinstance(swagger, dict) else None
        log.info(
            "worker.ready",
            image=self._label,
            slot=w.slot,
            pid=w.pid,
            init_ms=header.get("init_ms"),
            mode=self.mode,
        )

    def _make_idle_locked(self, w: WorkerProcess) -> None:
        if w.state == "starting":
            self._offer_locked(w)

    def _mark_dead_locked(self, w: WorkerProcess) -> float | None:
        """Take ``w`` out of the pool; returns the respawn delay, or None if there is no respawn."""
        w.state = "dead"
        if self._slots[w.slot] is w:
            self._slots[w.slot] = None
        self._fails[w.slot] += 1
        # Waiters re-check: with no worker left alive they answer 503 now instead of at their deadline.
        self._cond.notify_all()
        if self._closed:
            return None
        self._restarts += 1
        return _backoff(self._fails[w.slot])

    def _retire(self, w: WorkerProcess, reason: str) -> None:
        """A busy worker failed; its request thread kills it and schedules its replacement."""
        with self._lock:
            if w.state == "dead":
                w.close()
                return
            if reason == "timeout":
                self._timeouts += 1
            else:
                self._crashes += 1
            delay = self._mark_dead_locked(w)
        self._finish_retire(w, reason, delay)

    def _finish_retire(self, w: WorkerProcess, reason: str, delay: float | None) -> None:
        w.kill()
        w.close()
        if threading.current_thread() is not w.pump:
            w.pump.join(timeout=0.5)
        if delay is None:
            return  # the pool is stopping: no respawn, no alarm
        log.warning(
            "worker.timeout" if reason == "timeout" else "worker.crashed",
            image=self._label,
            slot=w.slot,
            pid=w.pid,
            reason=reason,
            exit=w.exit_text(),
            output_tail=w.tail(20),
        )
        self._schedule_respawn(w.slot, delay)

    def _on_exit(self, w: WorkerProcess) -> None:
        """Called by the worker's output pump once the process has exited."""
        with self._lock:
            if w.state != "idle":
                return  # the request or start-up thread that owns it deals with it
            self._idle.remove(w)
            self._crashes += 1
            delay = self._mark_dead_locked(w)
        self._finish_retire(w, "exited while idle", delay)

    def _schedule_respawn(self, slot: int, delay: float) -> None:
        t = threading.Thread(
            target=self._respawn, args=(slot, delay), name=f"worker-respawn-{self._label}-{slot}", daemon=True
        )
        with self._lock:
            if self._closed:
                return
            self._respawners.add(t)
            failures = self._fails[slot]
        log.info("worker.respawn", image=self._label, slot=slot, delay_s=delay, failures=failures)
        t.start()

    def _respawn(self, slot: int, delay: float) -> None:
        try:
            if self._stopping.wait(delay):
                return
            try:
                w = self._spawn(slot)
            except PoolClosed:
                return
            except ScoreInitFailed as exc:
                log.error("worker.spawn_failed", image=self._label, slot=slot, error=exc.message)
                with self._lock:
                    self._fails[slot] += 1
                    next_delay = None if self._closed else _backoff(self._fails[slot])
                if next_delay is not None:
                    self._schedule_respawn(slot, next_delay)
                return
            try:
                self._await_ready(w, time.monotonic() + self.init_timeout_s)
            except ScoreInitFailed as exc:
                with self._lock:
                    next_delay = self._mark_dead_locked(w)
                if next_delay is not None:  # not stopping: worth an error line
                    log.error(
                        "worker.init_failed",
                        image=self._label,
                        slot=slot,
                        pid=w.pid,
                        error=exc.message,
                        traceback=exc.traceback,
                    )
                    self._schedule_respawn(slot, next_delay)
                return
            with self._lock:
                closed = self._closed
                if not closed:
                    self._make_idle_locked(w)
            if closed:
                w.kill()
                w.close()
            else:
                log.info("worker.restarted", image=self._label, slot=slot, pid=w.pid)
        finally:
            with self._lock:
                self._respawners.discard(threading.current_thread())
