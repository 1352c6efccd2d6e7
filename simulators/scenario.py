"""Scripted rehearsals: a fleet, the control plane, and faults on a timeline, then a report.

A scenario is a JSON file::

    {"devices": 20,                       # simulated devices (simulators/fleet.py)
     "agents": 1,                         # real edge-agent processes beside them (for kill -9)
     "tags": {"fleet": "sim"},
     "images": ["v1", "v2", {"name": "v3", "latency_ms": 60}],   # from small generated models;
                                          # latency_ms / error_rate: how it serves in light mode
     "traffic": {"rate": 20, "interval": 0.5},   # scoring traffic and heartbeats (simulators/fleet.py)
     "timeline": [
       {"action": "deploy", "image": "v1", "canary": 2, "growth": 3},
       {"action": "deploy", "image": "v2", "background": true},
       {"at": 0.5, "action": "broker_restart"},
       {"action": "wait"},
       {"action": "corrupt_bundle", "image": "v3"},
       {"action": "deploy", "image": "v3", "expect": "rolled_back"}]}

Steps run in order; ``at`` (seconds since the start) delays a step until then. ``deploy`` blocks
until the rollout settles unless ``background``; ``wait`` joins the background ones, then sleeps
``seconds``. The faults are listed in docs/simulators.md.

The report says what each device runs, each rollout's waves and timings, the faults injected with
their times, the broker traffic, and whether the invariants held: every device's status names the
image on its disk, no device is left half-installed, every rollout settled (as expected, where the
step says ``expect``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from deploy import config
from deploy.plane import ControlPlane
from deploy.registry import Image
from deploy.rollout import TERMINAL, Gate, Policy
from edge_core import manifest as mf
from simulators.bundle_server import Fault
from simulators.fleet import DeviceSpec, Fleet, Traffic
from simulators.models import mlp
from simulators.netproxy import TcpProxy
from simulators.rig import Rig, to_toml

ACTIONS = (
    "deploy", "wait", "broker_restart", "device_offline", "corrupt_bundle", "truncate_bundle",
    "slow_bundle", "kill_agent", "clock_skew", "network_delay", "network_loss", "disk_full",
)  # fmt: skip


class ScenarioError(ValueError):
    pass


def load(path: Path) -> dict[str, Any]:
    try:
        spec: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot read the scenario {path}: {exc}") from None
    for i, step in enumerate(spec.get("timeline", [])):
        if step.get("action") not in ACTIONS:
            raise ScenarioError(f"timeline[{i}]: unknown action {step.get('action')!r} (one of {ACTIONS})")
        if step["action"] in ("network_delay", "network_loss") and not spec.get("proxied"):
            raise ScenarioError(f"timeline[{i}]: {step['action']} needs devices listed in 'proxied'")
    return spec


class Scenario:
    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.rig = Rig(workdir / "rig")
        self.faults: list[dict[str, Any]] = []
        self.deployments: list[dict[str, Any]] = []
        self.images: dict[str, Image] = {}
        self._background: list[threading.Thread] = []
        self._t0 = self._wall0 = 0.0
        self.proxy: TcpProxy | None = None

    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def run(self) -> dict[str, Any]:
        spec = self.spec
        with self.rig as rig:
            cp = self._control_plane(rig)
            trusted = {mf.key_id(rig.key.public_key()): rig.key.public_key()}
            tags = dict(spec.get("tags") or {"fleet": "sim"})
            proxied = set(spec.get("proxied") or [])
            self.proxy = TcpProxy((rig.broker.host, rig.broker.port)).start() if proxied else None
            via = (self.proxy.host, self.proxy.port) if self.proxy else None
            specs = [DeviceSpec(f"sim-{i:03d}", tags, via if f"sim-{i:03d}" in proxied else None)
                     for i in range(int(spec.get("devices", 20)))]  # fmt: skip
            traffic = Traffic(**spec["traffic"]) if spec.get("traffic") else None
            fleet = Fleet(self.workdir / "sim", rig.broker, trusted, specs, traffic=traffic).start()
            agents = [rig.add_device(f"agent-{i:02d}").start() for i in range(int(spec.get("agents", 0)))]
            try:
                ids = [s.device_id for s in specs] + [a.device_id for a in agents]
                self._wait_reported(cp, ids)
                for d in ids:
                    cp.registry.tag_device(d, tags)
                for entry in spec.get("images", ["v1"]):
                    image = entry if isinstance(entry, dict) else {"name": entry}
                    self.images[image["name"]] = self._image(cp, image)
                self._t0, self._wall0 = time.monotonic(), time.time()
                for step in spec.get("timeline", []):
                    if "at" in step:
                        time.sleep(max(0.0, float(step["at"]) - (time.monotonic() - self._t0)))
                    self._step(cp, fleet, step, tags)
                self._join()
                report = self._report(cp, fleet, agents)
            finally:
                self._join()
                cp.close()
                fleet.stop()
                if self.proxy is not None:
                    self.proxy.stop()
        return report

    # -- setup ----------------------------------------------------------------------------------------

    def _control_plane(self, rig: Rig) -> ControlPlane:
        home = self.workdir / "control-plane"
        (home / "keys").mkdir(parents=True, exist_ok=True)
        for suffix in ("key", "pub"):
            shutil.copyfile(rig.pubkey_path.with_suffix("." + suffix), home / "keys" / f"signing.{suffix}")
        cert = rig.broker.client_cert("operator")
        (home / "config.toml").write_text(
            to_toml({
                "broker": {"host": rig.broker.host, "port": rig.broker.operator_port, "ca": str(cert.ca_path),
                           "cert": str(cert.cert_path), "key": str(cert.key_path),
                           "prefix": rig.broker.prefix},
                # the rig's bundle server serves the artifact store, faults included
                "artifacts": {"url": str(rig.bundles_dir), "public_url": rig.server.url + "/"},
            })
        )  # fmt: skip
        return ControlPlane(config.load(home))

    def _wait_reported(self, cp: ControlPlane, ids: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            known = {d["id"] for d in cp.devices() if d["status"]}
            if set(ids) <= known:
                return
            time.sleep(0.3)
        missing = sorted(set(ids) - known)
        raise ScenarioError(f"{len(missing)} device(s) never reported: {', '.join(missing[:10])}")

    def _image(self, cp: ControlPlane, image: dict[str, Any]) -> Image:
        """An image from a small generated model; ``latency_ms`` and ``error_rate`` say how it serves
        in light mode (a slow or failing model that installs fine)."""
        name = image["name"]
        src = self.workdir / "models" / f"{name}.onnx"
        mlp(src, sizes=(8, 16, 4), seed=sum(map(ord, name)))
        model = cp.register_model("sim-model", src, {"scenario": name}, {})
        tags = {
            "scenario": name,
            **{f"sim.{k}": str(image[k]) for k in ("latency_ms", "error_rate") if k in image},
        }
        return cp.build_image("sim-image", [("m", "sim-model", model.version)], tags=tags)

    # -- steps --------------------------------------------------------------------------------------

    def _step(self, cp: ControlPlane, fleet: Fleet, step: dict[str, Any], tags: dict[str, str]) -> None:
        action = step["action"]
        if action == "deploy":
            self._deploy(cp, step, tags)
            return
        if action == "wait":
            self._join()
            time.sleep(float(step.get("seconds", 0)))
            return
        record = {"at_s": self._now(), **step}
        self.faults.append(record)
        if action == "broker_restart":
            self.rig.broker.restart()
        elif action == "device_offline":
            devices = [fleet.devices[d] for d in step["devices"]]
            for d in devices:
                d.channel.kill()

            def back() -> None:
                time.sleep(float(step.get("seconds", 5)))
                for d in devices:
                    d.channel.start(d.deployer.submit, d.on_connect)

            self._spawn(back)
        elif action in ("corrupt_bundle", "truncate_bundle", "slow_bundle"):
            image = self.images[step["image"]]
            rate = int(step.get("rate", 20_000))
            fault = {"corrupt_bundle": Fault(corrupt=True),
                     "truncate_bundle": Fault(cut_after=image.size // 2, cut_times=1_000_000),
                     "slow_bundle": Fault(rate_bytes_per_s=rate)}[action]  # fmt: skip
            self.rig.server.set_fault(image.artifact, fault)
        elif action == "kill_agent":
            agent = self.rig.agents[step["device"]]
            agent.kill()

            def restart() -> None:
                time.sleep(float(step.get("seconds", 1)))
                agent.start()

            self._spawn(restart)
        elif action == "network_delay":
            assert self.proxy is not None  # load() refuses network faults without 'proxied'
            self.proxy.delay_s = float(step.get("ms", 200)) / 1000

        elif action == "network_loss":
            assert self.proxy is not None
            proxy = self.proxy
            proxy.blackhole = True

            def restore() -> None:
                time.sleep(float(step.get("seconds", 5)))
                # what was lost cannot be replayed into a TCP stream: the connections end, as they
                # would by their keepalive timeouts, and the devices reconnect
                proxy.cut()
                proxy.blackhole = False

            self._spawn(restore)
        elif action == "disk_full":
            for d in step["devices"]:
                fleet.devices[d].deployer.disk_margin = 1 << 50  # no bundle fits any more
        elif action == "clock_skew":
            for d in step["devices"]:
                fleet.devices[d].skew = timedelta(seconds=float(step["seconds"]))

    def _deploy(self, cp: ControlPlane, step: dict[str, Any], tags: dict[str, str]) -> None:
        gate = Gate(
            soak_s=float(step.get("soak", 0)),
            max_error_rate=step.get("max_error_rate", 0.5),
            max_p99_ratio=step.get("max_p99_ratio"),
            min_requests=int(step.get("min_requests", 20)),
        )
        policy = Policy(canary=int(step.get("canary", 2)), growth=float(step.get("growth", 3)),
                        wave_timeout_s=float(step.get("wave_timeout", 30)), gate=gate)  # fmt: skip
        record: dict[str, Any] = {"image": step["image"], "expect": step.get("expect", "succeeded"),
                                  "started_s": self._now()}  # fmt: skip
        self.deployments.append(record)

        def drive() -> None:
            dep_id = cp.create_deployment(self.images[step["image"]], [], tags, policy)
            record["id"] = dep_id
            dep = cp.driver().run(dep_id, poll_s=0.1, timeout_s=float(step.get("timeout", 300)))
            record.update(state=dep["state"], reason=dep["reason"], finished_s=self._now())

        if step.get("background"):
            self._spawn(drive)
        else:
            drive()

    def _spawn(self, fn: Any) -> None:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        self._background.append(t)

    def _join(self) -> None:
        while self._background:
            self._background.pop().join(timeout=600)

    # -- the report ---------------------------------------------------------------------------------

    def _report(self, cp: ControlPlane, fleet: Fleet, agents: list[Any]) -> dict[str, Any]:
        on_disk: dict[str, str | None] = {d: dev.on_disk() for d, dev in fleet.devices.items()}
        on_disk.update({a.device_id: a.current_image() for a in agents})
        stores = {d: dev.dir / "store" for d, dev in fleet.devices.items()}
        stores.update({a.device_id: a.state_dir / "store" for a in agents})
        by_sha = {img.sha256: name for name, img in self.images.items()}
        problems: list[str] = []
        time.sleep(0.5)  # the last statuses in flight
        for d, sha in on_disk.items():
            status = cp.fleet.report(d) or {}
            reported = (status.get("active") or {}).get("sha256")
            if reported != sha:
                problems.append(f"{d}: status says {reported}, disk runs {sha}")
            if status.get("state") not in ("active", "failed", "rolled_back", "idle"):
                problems.append(f"{d}: left in state {status.get('state')}")
            staging = stores[d] / "staging"
            if staging.exists() and any(staging.iterdir()):
                problems.append(f"{d}: a half-unpacked image is left in {staging}")
        for rec in self.deployments:
            if rec.get("state") not in TERMINAL:
                problems.append(f"rollout of {rec['image']} did not settle ({rec.get('state')})")
            elif rec["state"] != rec["expect"]:
                problems.append(f"rollout of {rec['image']} ended {rec['state']}, expected {rec['expect']}")
            if rec.get("id"):
                events = cp.registry.events(rec["id"])
                rec["waves"] = [
                    {"wave": e["detail"]["wave"], "devices": len(e["detail"]["devices"]),
                     "started_s": round(e["ts"] - self._wall0, 3)}
                    for e in events if e["kind"] == "wave_started"
                ]  # fmt: skip
        captures = fleet.captures()
        if captures["unaccounted"]:
            problems.append(
                f"{captures['unaccounted']} captured record(s) neither stored nor counted as dropped"
            )
        if captures["put"] and captures["largest_buffer_bytes"] > captures["budget_bytes"]:
            problems.append(f"a buffer holds {captures['largest_buffer_bytes']} bytes, over its budget")
        running: dict[str, int] = {}
        for sha in on_disk.values():
            name = by_sha.get(sha or "", "none")
            running[name] = running.get(name, 0) + 1
        return {
            "devices": len(on_disk),
            "running": running,
            "per_device": {d: by_sha.get(sha or "", "none") for d, sha in sorted(on_disk.items())},
            "deployments": self.deployments,
            "faults": self.faults,
            "mqtt": {"connections_lost": fleet.loop.connections_lost,
                     "connect_failures": fleet.loop.connect_failures, **fleet.traffic()},
            "scoring_requests": fleet.sensors.requests if fleet.sensors else 0,
            "captures": captures,
            "invariants": {"held": not problems, "problems": problems},
        }  # fmt: skip


def render(report: dict[str, Any]) -> str:
    lines = [
        f"devices  {report['devices']}; running "
        + ", ".join(f"{k}: {v}" for k, v in report["running"].items())
    ]
    for d in report["deployments"]:
        waves = "+".join(str(w["devices"]) for w in d.get("waves", []))
        took = (d.get("finished_s") or 0) - d["started_s"]
        state = f"{d.get('state')!s:<12} (expected {d['expect']})"
        lines.append(f"rollout  {d['image']:<6} {state} waves {waves or '-'} in {took:.1f}s")
        if d.get("reason"):
            lines.append(f"         {d['reason']}")
    for f in report["faults"]:
        lines.append(
            f"fault    t={f['at_s']:>6.2f}s {f['action']} "
            + json.dumps({k: v for k, v in f.items() if k not in ("at_s", "action")})
        )
    m, c = report["mqtt"], report["captures"]
    lines.append(
        f"mqtt     {m['connections_lost']} connections lost and re-established; devices sent "
        f"{m['messages_sent']} messages ({m['bytes_sent']} B), received {m['messages_received']}"
    )
    if c["put"]:
        lines.append(f"captures {c['put']} put, {c['stored']} stored, {c['evicted']} evicted by the disk "
                     f"budget (counted), {c['unaccounted']} unaccounted")  # fmt: skip
    inv = report["invariants"]
    lines.append(
        "invariants held" if inv["held"] else "INVARIANTS BROKEN:\n  " + "\n  ".join(inv["problems"])
    )
    return "\n".join(lines)
