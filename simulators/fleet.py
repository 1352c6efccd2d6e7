"""Many simulated devices in one process, each made of the agent's own parts.

A :class:`SimDevice` is what ``edge-agent run`` wires (agent/ops/daemon.py) less the local scoring API:
its own identity and client certificate, state directory, StateDB, BundleStore, Fetcher and
Deployer (the real state machine, downloads, verification, atomic installs and status documents),
on a :class:`~simulators.mqtt_loop.SimChannel` that shares one selector loop with the whole fleet.

Inference is **light**: a thousand onnxruntime sessions do not fit on a small machine, so
:class:`LightActivator` stands in for agent/serving/activation.py. It checks that the installed image is whole
(bundle.json parses, every model file it lists is there with its size) as the real loader would,
and reports ``"mode": "light"`` in the status. Everything before activation, and the switch itself,
is the agent's code.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.config import DownloadConfig, MqttConfig
from agent.telemetry import inventory
from agent.telemetry.buffer import Buffer, RecordClass
from agent.telemetry.metrics import InferenceWindow
from agent.update.deployer import Deployer
from agent.update.fetch import Fetcher
from agent.update.state import StateDB
from agent.update.store import BundleStore
from edge_core import manifest as mf
from edge_core.errors import ErrorCode, InstallError
from simulators.broker import Mosquitto
from simulators.mqtt_loop import SelectorLoop, SimChannel


class LightActivator:
    """The activation seam without onnxruntime (see the module's docstring)."""

    def __init__(self) -> None:
        self.current: dict[str, Any] | None = None

    def prepare(self, image_dir: Path, manifest: mf.Manifest | None) -> dict[str, Any]:
        try:
            meta = json.loads((image_dir / "bundle.json").read_text())
        except (OSError, ValueError) as exc:
            raise InstallError(ErrorCode.MODEL_LOAD_FAILED, f"bundle.json unreadable: {exc}") from None
        for rel, info in (meta.get("files") or {}).items():
            path = image_dir / rel
            if not path.is_file() or (isinstance(info, dict) and path.stat().st_size != info.get("size")):
                raise InstallError(ErrorCode.MODEL_LOAD_FAILED, f"{rel} is missing or has the wrong size")
        tags = meta.get("tags") or {}
        lineage = (
            {"deployment_id": manifest.deployment_id, "generation": manifest.generation} if manifest else {}
        )
        return {"name": meta.get("name"), "version": str(meta.get("version")), "sha256": image_dir.name,
                **lineage,
                # how this image serves in light mode (a scenario's slow or failing image)
                "latency_ms": float(tags.get("sim.latency_ms", 2.0)),
                "error_rate": float(tags.get("sim.error_rate", 0.0))}  # fmt: skip

    def commit(self, prepared: dict[str, Any]) -> None:
        self.current = prepared

    def discard(self, prepared: Any) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"api": None, "mode": "light", "image": self.current}


@dataclass(frozen=True)
class Traffic:
    """Scoring traffic per device: a Poisson process at ``rate`` requests/s, ``burst_factor`` times
    that for ``burst_s`` every ``burst_every`` seconds, inputs whose mean drifts by a random walk of
    ``drift`` per second; heartbeats every ``interval`` seconds."""

    rate: float = 5.0
    burst_every: float = 30.0
    burst_s: float = 3.0
    burst_factor: float = 5.0
    drift: float = 0.01
    interval: float = 1.0
    #: the share of requests whose input and output are captured into the device's telemetry buffer
    #: (agent/telemetry/buffer/), with their lineage; 0 runs without a buffer
    capture: float = 0.0
    #: the buffer's disk budget: past it the oldest captures are evicted, and counted
    budget_bytes: int = 16 << 20


class SensorHub:
    """One thread that plays every device's traffic against its light runtime and sends each
    device's heartbeat (the inference window per model version, as agent/telemetry/heartbeat.py does): the
    health gates' evidence in a simulation."""

    TICK_S = 0.1

    def __init__(self, devices: list[SimDevice], traffic: Traffic, seed: int = 0) -> None:
        self.devices = devices
        self.traffic = traffic
        self.rng = random.Random(seed)
        self.requests = 0
        self._windows: dict[str, dict[str, InferenceWindow]] = {d.device_id: {} for d in devices}
        self._drift = {d.device_id: 0.0 for d in devices}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sensors", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        t0 = last_beat = time.monotonic()
        while not self._stop.wait(self.TICK_S):
            now = time.monotonic()
            t = self.traffic
            bursting = t.burst_every > 0 and (now - t0) % t.burst_every < t.burst_s
            lam = t.rate * (t.burst_factor if bursting else 1.0) * self.TICK_S
            for d in self.devices:
                img = d.activator.current
                if img is None or not d.channel.connected:
                    continue
                self._drift[d.device_id] += self.rng.gauss(0.0, t.drift * self.TICK_S**0.5)
                n = _poisson(self.rng, lam)
                if not n:
                    continue
                w = self._windows[d.device_id].setdefault(f"m@{img['version']}", InferenceWindow())
                for _ in range(n):
                    # latency grows with how far the inputs drifted from what the model saw
                    base = img["latency_ms"] * (1.0 + abs(self._drift[d.device_id]))
                    failed = self.rng.random() < img["error_rate"]
                    w.add(500 if failed else 200, self.rng.lognormvariate(0.0, 0.25) * base / 1000.0)
                    if d.buffer is not None and self.rng.random() < t.capture:
                        self._capture(d, img, failed)
                self.requests += n
            if now - last_beat >= t.interval:
                last_beat = now
                for d in self.devices:
                    self._beat(d, now)

    def _capture(self, d: SimDevice, img: dict[str, Any], failed: bool) -> None:
        assert d.buffer is not None
        x = [round(self.rng.gauss(self._drift[d.device_id], 1.0), 4) for _ in range(8)]
        record = {"device_id": d.device_id, "deployment_id": img.get("deployment_id"),
                  "generation": img.get("generation"),
                  "image": {k: img[k] for k in ("name", "version", "sha256")},
                  "model": "m", "request_id": f"{d.device_id}-{d.capture_puts}", "ts": time.time(),
                  "input": {"data": [x]}, "output": None if failed else {"y": [sum(x)]}}  # fmt: skip
        d.capture_puts += 1
        d.buffer.put(RecordClass.CAPTURE, record)

    def _beat(self, d: SimDevice, ts: float) -> None:
        windows, self._windows[d.device_id] = self._windows[d.device_id], {}
        models = {
            key: {"model": "m", "version": key.split("@", 1)[1], **w.summary()} for key, w in windows.items()
        }
        beat = {"device_id": d.device_id, "ts": time.time(), "interval_s": self.traffic.interval,
                "models": models, "drift": round(self._drift[d.device_id], 4)}  # fmt: skip
        d.channel.report_heartbeat(beat)


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: lam is small (requests per tick)
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


@dataclass
class DeviceSpec:
    device_id: str
    tags: dict[str, str]
    #: where this device reaches the broker, if not directly (a proxy that injects network faults)
    address: tuple[str, int] | None = None


class SimDevice:
    def __init__(
        self,
        spec: DeviceSpec,
        workdir: Path,
        broker: Mosquitto,
        loop: SelectorLoop,
        trusted: dict[str, Any],
        download: DownloadConfig,
    ) -> None:
        self.spec = spec
        self.device_id = spec.device_id
        self.dir = workdir / spec.device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        cert = broker.client_cert(spec.device_id)
        host, port = spec.address or (broker.host, broker.port)
        mqtt_cfg = MqttConfig(
            host=host, port=port, ca=cert.ca_path, cert=cert.cert_path, key=cert.key_path,
            prefix=broker.prefix, reconnect_min=0.2, reconnect_max=3.0,
        )  # fmt: skip
        self.db = StateDB(self.dir / "agent.db")
        self.store = BundleStore(self.dir / "store", keep_images=2)
        self.fetcher = Fetcher(download)
        self.activator = LightActivator()
        #: how far this device's clock is off (a scenario's clock_skew fault)
        self.skew = timedelta(0)
        self.channel = SimChannel(spec.device_id, mqtt_cfg, loop)
        self.deployer = Deployer(
            spec.device_id, self.db, self.store, self.fetcher, trusted, self.channel.report_status,
            download.disk_margin, activator=self.activator, clock=lambda: datetime.now(UTC) + self.skew,
        )  # fmt: skip
        self._thread: threading.Thread | None = None
        #: the telemetry buffer, when the fleet captures traffic; every put is counted, so the report
        #: can check that each one is either stored or counted as dropped
        self.buffer: Buffer | None = None
        self.capture_puts = 0

    def on_connect(self) -> None:
        inv = inventory.collect(self.device_id, self.dir)
        inv["simulated"] = {"mode": "light", "tags": self.spec.tags}
        self.channel.report_inventory(inv)
        self.deployer.publish()

    def start(self) -> None:
        active = self.store.active()
        if active:
            self.activator.current = self.activator.prepare(self.store.image_dir(active), None)
        self._thread = threading.Thread(
            target=self.deployer.run, name=f"deployer-{self.device_id}", daemon=True
        )
        self._thread.start()
        if self.buffer is not None:
            self.buffer.start()
        self.channel.start(self.deployer.submit, self.on_connect)

    def stop(self) -> None:
        self.deployer.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.channel.stop()
        if self.buffer is not None:
            self.buffer.close()
        self.fetcher.close()
        self.db.close()

    def capture_counts(self) -> tuple[int, int, int, int]:
        """(stored, dropped and counted, buffer bytes, budget), once what is queued is committed."""
        assert self.buffer is not None
        self.buffer.flush(timeout=10)
        stats = self.buffer.stats()
        stored = stats["classes"]["capture"]["records"] + stats["classes"]["capture"]["acked"]["records"]
        dropped = sum(v["records"] for v in stats["dropped"].get("capture", {}).values())
        return int(stored), int(dropped), int(stats["size_bytes"]), int(stats["budget_bytes"])

    def on_disk(self) -> str | None:
        """What the device really runs: its ``current`` symlink."""
        return self.store.active()


class Fleet:
    """N simulated devices on one selector loop, against one broker."""

    def __init__(self, workdir: Path, broker: Mosquitto, trusted: dict[str, Any], specs: list[DeviceSpec],
                 download: DownloadConfig | None = None, traffic: Traffic | None = None) -> None:  # fmt: skip
        self.loop = SelectorLoop()
        self.devices = {
            s.device_id: SimDevice(s, workdir, broker, self.loop, trusted, download or DownloadConfig())
            for s in specs
        }
        self.sensors = SensorHub(list(self.devices.values()), traffic) if traffic else None
        if traffic and traffic.capture > 0:
            for d in self.devices.values():
                # small records and batches, so that a small budget still leaves room for records
                d.buffer = Buffer(d.dir / "telemetry.db", budget_bytes=traffic.budget_bytes,
                                  max_record_bytes=16 << 10, batch_max=100)  # fmt: skip

    def start(self) -> Fleet:
        self.loop.start()
        for d in self.devices.values():
            d.start()
        if self.sensors is not None:
            self.sensors.start()
        return self

    def stop(self) -> None:
        if self.sensors is not None:
            self.sensors.stop()
        for d in self.devices.values():
            d.stop()
        self.loop.stop()

    def report(self) -> dict[str, Any]:
        """What each device runs (by its disk), and whether its status says the same."""
        running: dict[str, int] = {}
        for d in self.devices.values():
            running[d.on_disk() or "none"] = running.get(d.on_disk() or "none", 0) + 1
        return {
            "devices": len(self.devices),
            "running": running,
            "connections_lost": self.loop.connections_lost,
            "connect_failures": self.loop.connect_failures,
            "scoring_requests": self.sensors.requests if self.sensors else 0,
            "captures": self.captures(),
            "mqtt": self.traffic(),
        }

    def captures(self) -> dict[str, int]:
        """The capture counts, final: the traffic stops first (a put in flight would not be counted yet)."""
        if self.sensors is not None:
            self.sensors.stop()
        devs = [d for d in self.devices.values() if d.buffer is not None]
        if not devs:
            return {"put": 0, "stored": 0, "evicted": 0, "unaccounted": 0}
        counts = [d.capture_counts() for d in devs]
        put = sum(d.capture_puts for d in devs)
        stored, dropped = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return {
            "put": put,
            "stored": stored,
            "evicted": dropped,
            # put, but neither stored nor counted as dropped: lost, against the buffer's contract
            "unaccounted": put - stored - dropped,
            "largest_buffer_bytes": max(c[2] for c in counts),
            "budget_bytes": counts[0][3],
        }

    def traffic(self) -> dict[str, int]:
        chans = [d.channel for d in self.devices.values()]
        return {"messages_sent": sum(c.sent[0] for c in chans), "bytes_sent": sum(c.sent[1] for c in chans),
                "messages_received": sum(c.received[0] for c in chans),
                "bytes_received": sum(c.received[1] for c in chans)}  # fmt: skip

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
