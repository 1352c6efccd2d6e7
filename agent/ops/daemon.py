"""The agent's process: builds the wings (implementations from :mod:`agent.ops.wiring`) and runs them
until SIGTERM/SIGINT."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.ops import certs, runinfo
from agent.ops.sdnotify import Notifier
from agent.ops.wiring import load_trusted_keys, open_channel, open_sync_backend
from agent.serving.activation import Serving
from agent.telemetry import inventory
from agent.telemetry.buffer import Buffer, RecordClass
from agent.telemetry.heartbeat import Telemetry
from agent.telemetry.uploader import Uploader
from agent.update.deployer import Deployer
from agent.update.fetch import Fetcher
from agent.update.state import StateDB
from agent.update.store import BundleStore
from edge_core import faults
from edge_core import manifest as mf
from edge_core.clock import now_iso
from edge_core.log import get_logger
from edge_core.supervise import Supervisor, log_thread_crashes

log = get_logger("agent")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = StateDB(cfg.state_dir / "agent.db")
        self.store = BundleStore(cfg.state_dir / "store", keep_images=cfg.store.keep_images)
        self.fetcher = Fetcher(cfg.download)
        self.channel = open_channel(cfg)
        tc = cfg.telemetry
        self.buffer = Buffer(
            cfg.state_dir / "telemetry.db",
            budget_bytes=tc.buffer_budget_bytes,
            flush_interval_s=tc.flush_interval,
            max_record_bytes=tc.max_record_bytes,
            synchronous=tc.buffer_synchronous,
        )
        self.serving = Serving(cfg, sink=self.buffer)
        self.deployer = Deployer(
            cfg.device_id,
            self.db,
            self.store,
            self.fetcher,
            load_trusted_keys(cfg),
            self.channel.report_status,
            cfg.download.disk_margin,
            activator=self.serving,
        )
        self._stop = threading.Event()
        sc = cfg.sync
        self.backend = open_sync_backend(cfg, self._sync_should_stop)
        self.uploader = Uploader(
            self.buffer, self.backend, cfg.device_id, self.db, batch_max_records=sc.batch_max_records,
            batch_max_bytes=sc.batch_max_bytes, max_batch_age_s=sc.max_batch_age, interval_s=sc.interval,
            compress_level=sc.compress_level, drain_timeout_s=sc.drain_timeout,
        )  # fmt: skip
        self.serving.metrics.telemetry_source = self._telemetry_state
        self.telemetry = Telemetry(
            cfg.device_id, cfg.state_dir, self.serving.metrics,
            put=lambda cls, payload, ts: self.buffer.put(RecordClass(cls), payload, ts=ts),
            heartbeat=self.channel.report_heartbeat,
            extra=self._telemetry_state,
            interval_s=cfg.telemetry.interval,
        )  # fmt: skip

    def _sync_should_stop(self) -> bool:
        # Once stopping, the storage client's backoffs are cut short (the uploader must be free for
        # its final drain soon), except during that drain, which has its own deadline.
        return self._stop.is_set() and not self.uploader.draining

    def _telemetry_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.stats(), "sync": self.uploader.state.as_dict()}

    def _on_connect(self) -> None:
        inv = inventory.collect(self.cfg.device_id, self.cfg.state_dir)
        inv["runtime"] = {
            **self.serving.describe(),
            "execution_providers_preference": self.cfg.runtime.execution_providers,
            "intra_op_num_threads": self.cfg.runtime.intra_op_num_threads,
            "inter_op_num_threads": self.cfg.runtime.inter_op_num_threads,
        }
        self.channel.report_inventory(inv)
        self.deployer.publish()

    def _check_certificate(self) -> None:
        """Say at start, in plain words, what will make every connection fail: an expired or not yet
        valid device certificate, or a key that is not its own. The agent runs on regardless: it
        serves its last image offline, and a renewed certificate needs only a restart."""
        section = self.cfg.iothub if self.cfg.transport == "iothub" else self.cfg.mqtt
        if section.cert is None:
            return
        try:
            cert_pem = section.cert.read_bytes()
            key_pem = section.key.read_bytes() if section.key is not None else None
        except OSError as exc:
            log.error("agent.certificate_unreadable", path=str(section.cert), error=str(exc))
            return
        # The CA is the broker's or the hub's server CA, which need not issue device certificates.
        for problem in certs.check_device_cert(
            cert_pem, key_pem, None, self.cfg.device_id, datetime.now(UTC)
        ):
            emit = log.error if problem.severity == "fail" else log.warning
            emit("agent.certificate_problem", code=problem.code, message=problem.message, hint=problem.hint)

    def run(self) -> int:
        # Read once and removed from the environment: score.py workers inherit it and are not the
        # service (NotifyAccess=main would reject them anyway).
        notifier = Notifier.from_env(unset=True)
        svc = _Service(self, notifier)
        # systemd's watchdog kills with SIGABRT: every thread's stack then reaches the journal, which
        # tells where a hung agent was stuck.
        faulthandler.enable()
        log_thread_crashes()
        stop_signal: list[str] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                # A second Ctrl-C or `systemctl kill`: the shutdown under way finishes (requests in
                # flight, the buffer's flush, online=false). TimeoutStopSec is the backstop.
                log.warning("agent.already_stopping", signal=name)
                return
            stop_signal.append(name)
            log.info("agent.stopping", signal=name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        channel = self.channel.describe()
        log.info(
            "agent.starting",
            device_id=self.cfg.device_id,
            transport=channel["transport"],
            endpoint=channel["endpoint"],
            state_dir=str(self.cfg.state_dir),
            trusted_keys=len(self.deployer.trusted_keys),
            notify=notifier.enabled,
            watchdog_interval_s=notifier.watchdog_interval,
        )
        self._check_certificate()
        active = self.store.active()
        row = self.db.last_active_with_digest(active) if active else None
        if active:
            # Loading the image runs score.py's init(), bounded by runtime.init_timeout: ask systemd
            # for that much more start time instead of a TimeoutStartSec that long for every hang.
            notifier.extend_timeout(self.cfg.runtime.init_timeout + _START_MARGIN_S)
        svc.set_status("starting: loading the active image" if active else "starting")
        self.buffer.start()
        self.serving.start(
            self.store.image_dir(active) if active else None,
            mf.Manifest.from_payload(row.payload) if row else None,
        )
        self.telemetry.start()
        self.uploader.start()
        worker = threading.Thread(target=self.deployer.run, name="deployer", daemon=True)
        # Resume an interrupted deployment before taking new manifests: the worker recovers first,
        # and manifests that arrive meanwhile wait in the deployer's intake.
        worker.start()
        supervisor = Supervisor()
        supervisor.watch("deployer", worker)
        supervisor.watch("telemetry", self.telemetry.thread)
        if self.buffer.thread is not None:
            supervisor.watch("buffer writer", self.buffer.thread)
        supervisor.watch("sync", self.uploader.thread)
        if self.serving.api is not None:
            supervisor.watch("api", self.serving.api.thread)
        # READY=1 comes at the latest ready_timeout from now; the start timeout must not fire first,
        # whatever the unit's TimeoutStartSec says.
        notifier.extend_timeout(self.cfg.service.ready_timeout + _START_MARGIN_S)
        self.channel.start(self.deployer.submit, self._on_connect)
        supervisor.watch("control channel", self.channel.thread)
        svc.channel_started()
        # Pinging at half of WatchdogSec (the notifier's interval) needs a tick at least that often.
        tick_s = min(1.0, notifier.watchdog_interval or 1.0)
        exit_code = 0
        stop_reason = ""
        while not self._stop.is_set():
            faults.point("main.tick")
            if dead := supervisor.casualties():
                # The rest is shut down in order as on SIGTERM (requests in flight finish, the
                # buffer is flushed); the exit status makes systemd restart the agent whole.
                log.error("agent.thread_died", threads=dead)
                stop_reason = f"the {dead[0]} thread died, exiting for a restart"
                exit_code = 1
                break
            try:
                svc.tick()
            except Exception:
                # No ping this tick: a fault that repeats starves the watchdog, and systemd restarts
                # the agent; a passing one costs a log line.
                log.error("agent.tick_failed", exc_info=True)
            self._stop.wait(tick_s)
        svc.stopping(stop_reason or (stop_signal[0] if stop_signal else "request"))
        self.deployer.stop()
        worker.join(timeout=10.0)
        self.serving.stop()  # requests in flight finish first: their captures reach the buffer
        self.telemetry.stop()
        # Committed before the drain, so that the drain ships them too (sync.drain_timeout).
        if not self.buffer.flush(_FLUSH_AT_STOP_S):
            log.warning("agent.buffer_flush_incomplete", timeout_s=_FLUSH_AT_STOP_S)
        self.uploader.stop()  # the final drain
        self.buffer.close()  # commits what is still queued
        self.backend.close()
        self.channel.stop()
        self.fetcher.close()
        self.db.close()
        runinfo.remove(self.cfg.state_dir)
        notifier.close()
        log.info("agent.stopped", exit_code=exit_code)
        return exit_code


#: run.json is rewritten at least this often while nothing in it changes; status.STALE_AFTER_S is 60.
_RUNINFO_REFRESH_S = 15.0
#: How long the stop waits for the buffer to commit what the API and the telemetry thread put last.
_FLUSH_AT_STOP_S = 10.0
#: Slack on top of a known bound (init_timeout, ready_timeout) when extending the start timeout.
_START_MARGIN_S = 30.0
#: The deployer's intake lock held this long means the intake is wedged (it is held for the
#: microseconds a verification takes): the control channel's thread, waiting on it, is deaf too.
_INTAKE_STALL_S = 60.0


class _Service:
    """The agent's side of the service manager: READY=1, STATUS=, the watchdog and run.json.

    Everything here runs on the main loop's thread, once per tick. That is what makes the watchdog
    honest: a ping leaves only when this thread got round to it and found the agent healthy, so a
    wedged main loop, a dead or wedged deployer all end in systemd restarting the agent.
    """

    def __init__(self, agent: Agent, notifier: Notifier) -> None:
        self.agent = agent
        self.notifier = notifier
        self.started_at = now_iso()
        self.ready = False
        self.status = ""
        self._channel_started = time.monotonic()
        self._intake_free_at = time.monotonic()
        self._generation: tuple[tuple[str, int], int | None] | None = None
        self._runinfo_failing = False
        self._runinfo_last: dict[str, Any] | None = None
        self._runinfo_at = 0.0

    def channel_started(self) -> None:
        self._channel_started = time.monotonic()
        self._intake_free_at = time.monotonic()

    def set_status(self, text: str, **extra: str | int) -> None:
        """Send ``extra`` (READY, WATCHDOG, STOPPING) with STATUS in one datagram, the STATUS only
        when it changed or explains a READY or STOPPING (systemctl status shows it beside them)."""
        fields = dict(extra)
        if text != self.status or "READY" in extra or "STOPPING" in extra:
            fields["STATUS"] = text
        if text != self.status:
            log.info("agent.status", status=text)
            self.status = text
        if fields:
            self.notifier.notify(**fields)

    def tick(self) -> None:
        channel = self.agent.channel.describe()
        serving = self.agent.serving.describe()
        problem = self._problem()
        extra: dict[str, str | int] = {}
        if not self.ready and (
            channel["connected"]
            or time.monotonic() - self._channel_started >= self.agent.cfg.service.ready_timeout
        ):
            # Offline is no reason to hold the start back: the device serves its last image without
            # a network, and systemd would otherwise fail (and restart) it on TimeoutStartSec.
            self.ready = True
            extra["READY"] = 1
            log.info("agent.ready", connected=bool(channel["connected"]))
        if problem is None and self.notifier.watchdog_interval is not None:
            extra["WATCHDOG"] = 1
        self.set_status(self._status_line(channel, serving, problem), **extra)
        self.write_runinfo(channel, serving)

    def stopping(self, why: str) -> None:
        self.set_status(f"stopping ({why}): finishing requests in flight", STOPPING=1)
        self.write_runinfo(self.agent.channel.describe(), self.agent.serving.describe())

    def write_runinfo(self, channel: dict[str, Any], serving: dict[str, Any]) -> None:
        doc = {
            "pid": os.getpid(), "version": __version__, "started_at": self.started_at,
            "ready": self.ready, "status": self.status, "channel": channel, "api": serving.get("api"),
        }  # fmt: skip
        # The state directory is often an SD card: write when something changed, and otherwise only
        # often enough that a reader can tell a live agent from a wedged one (status.STALE_AFTER_S).
        now = time.monotonic()
        if doc == self._runinfo_last and now - self._runinfo_at < _RUNINFO_REFRESH_S:
            return
        try:
            runinfo.write(self.agent.cfg.state_dir, {**doc, "updated_at": now_iso()})
            self._runinfo_last, self._runinfo_at = doc, now
        except OSError as exc:
            # Informational only: a full disk must not stop the watchdog pings or the serving.
            if not self._runinfo_failing:
                log.warning("agent.runinfo_failed", error=str(exc))
            self._runinfo_failing = True
        else:
            self._runinfo_failing = False

    def _problem(self) -> str | None:
        """Why the agent is unhealthy (and the watchdog must starve), or None."""
        api_stall = self.agent.serving.api_stalled_for()
        if api_stall >= self.agent.cfg.service.api_stall_timeout:
            return f"the scoring API's event loop has not run for {api_stall:.0f} s"
        if self.agent.deployer.intake_free():
            self._intake_free_at = time.monotonic()
            return None
        stalled = time.monotonic() - self._intake_free_at
        if stalled < _INTAKE_STALL_S:
            return None
        return f"the deployer's intake has been blocked for {stalled:.0f} s"

    def _serving_generation(self, sha256: str) -> int | None:
        # last_generation() is a MAX over the primary key; the lookup by digest (a JSON extract over
        # the deployments) runs only when it or the serving image changed.
        key = (sha256, self.agent.db.last_generation())
        if self._generation is None or self._generation[0] != key:
            row = self.agent.db.last_active_with_digest(sha256)
            self._generation = (key, row.generation if row else None)
        return self._generation[1]

    def _status_line(self, channel: dict[str, Any], serving: dict[str, Any], problem: str | None) -> str:
        image = serving.get("image")
        if image:
            generation = self._serving_generation(str(image["sha256"]))
            what = f"serving {image['name']}:{image['version']}"
            if generation is not None:
                what += f" (generation {generation})"
        else:
            what = "no image to serve yet"
        where = f"control channel {channel['endpoint']}"
        error = channel.get("last_error")
        if channel["connected"]:
            where += " connected"
        elif not self.ready:
            where += " connecting" + (f" (last error: {error})" if error else "")
        else:
            where += f" offline: {error or 'not connected yet'}, retrying"
        line = f"{what}; {where}"
        return f"unhealthy: {problem}; {line}" if problem else line
