"""Periodic telemetry: system metrics (psutil) and inference metrics into the buffer, and a small
heartbeat over the control channel.

Every ``telemetry.interval`` seconds one thread samples the host (CPU, memory, disk, temperatures
where the host has sensors) and the agent itself (RSS, open files, threads), takes the scoring API's
window of requests, errors and latency quantiles per model version, and writes one ``system`` and one
``inference`` record to the buffer. The heartbeat carries the same inference summary (rollout health
gates compare error rate and p99 between image versions from it), the buffer's counters (so an
operator sees what was dropped and why) and the upload state; the bulk goes to blob storage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil

from agent.telemetry.metrics import Metrics
from edge_core import faults
from edge_core.log import get_logger

log = get_logger("telemetry")

Sink = Callable[[str, bytes, float], bool]


def system_sample(state_dir: Path, proc: psutil.Process) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage(str(state_dir))
    doc: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_avg": list(psutil.getloadavg()),
        "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent},
        "disk": {"path": str(state_dir), "total": disk.total, "free": disk.free, "percent": disk.percent},
        "agent": {
            "rss_bytes": proc.memory_info().rss,
            "cpu_percent": proc.cpu_percent(interval=None),
            "open_files": proc.num_fds(),
            "threads": proc.num_threads(),
        },
    }
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        try:
            temps = sensors()
        except (OSError, RuntimeError):  # some hosts expose broken sensor files
            temps = {}
        doc["temperatures_c"] = {
            name: [round(t.current, 1) for t in entries] for name, entries in temps.items() if entries
        }
    return doc


class Telemetry:
    def __init__(
        self,
        device_id: str,
        state_dir: Path,
        metrics: Metrics,
        put: Sink,
        heartbeat: Callable[[dict[str, Any]], None],
        extra: Callable[[], dict[str, Any]],
        interval_s: float,
    ) -> None:
        self.device_id = device_id
        self.state_dir = state_dir
        self.metrics = metrics
        self.put = put
        self.heartbeat = heartbeat
        self.extra = extra
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self.last: dict[str, Any] | None = None

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # the first call only primes the counters
        self._proc.cpu_percent(interval=None)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            faults.point("telemetry.loop")  # outside the guard below: the tests' way to kill this thread
            try:
                self.tick()
            except Exception:  # telemetry must never take the agent down
                log.error("telemetry.tick_failed", exc_info=True)

    def tick(self) -> dict[str, Any]:
        ts = time.time()
        system = system_sample(self.state_dir, self._proc)
        inference = self.metrics.take_window()
        self.put("system", orjson.dumps({"device_id": self.device_id, "ts": ts, **system}), ts)
        if inference:
            self.put(
                "inference",
                orjson.dumps(
                    {
                        "device_id": self.device_id,
                        "ts": ts,
                        "interval_s": self.interval_s,
                        "models": inference,
                    }
                ),
                ts,
            )
        beat = {
            "device_id": self.device_id,
            "ts": ts,
            "interval_s": self.interval_s,
            "models": inference,
            "system": {
                "cpu_percent": system["cpu_percent"],
                "memory_percent": system["memory"]["percent"],
                "disk_free_bytes": system["disk"]["free"],
                "agent_rss_bytes": system["agent"]["rss_bytes"],
            },
            **self.extra(),
        }  # fmt: skip
        self.last = beat
        self.heartbeat(beat)
        return beat
