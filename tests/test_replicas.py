"""Replicated rollout drivers.

Three `edge-deploy serve` replicas (real processes) on one PostgreSQL registry and one real
mosquitto, driving a rollout to simulated devices (simulators/fleet.py: the agent's own deployer,
store and MQTT channel). The replica that drives the rollout is SIGKILLed in the middle of it.

What must hold: another replica takes the rollout over once the dead one's lease runs out, the
rollout succeeds, and every device received exactly one manifest per generation, the one its
member row records. A wiretap (an operator subscribed to every device's desired topic before
anything was published) counts what the broker delivered.

Then the two mechanisms underneath, on both databases, with the broker faked at the driver's seam:
the outbox (a driver killed between recording a step and publishing it) and the lease fence (a
driver that stalled past its lease publishes nothing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MqttClient
from conftest_pg import fresh_database

from deploy import config, signer
from deploy.plane import ControlPlane
from deploy.registry import Registry
from deploy.rollout import Gate, Policy
from edge_core import manifest as mf
from simulators.broker import Mosquitto, free_port
from simulators.bundle_server import BundleServer
from simulators.fleet import DeviceSpec, Fleet
from simulators.models import mlp
from simulators.rig import to_toml

N = 12
REPLICAS = 3
#: short, so the test waits seconds for a dead replica's lease, not the default 30
LEASE_S = 3.0


class Replica:
    """One `edge-deploy serve` process with a home of its own (its lease identity) and the shared
    registry, signing key, artifact store and broker."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.owner = ""

    def start(self) -> Replica:
        log = open(self.home / "serve.log", "ab")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "--home", str(self.home), "serve",
             "--listen", f"127.0.0.1:{free_port('127.0.0.1')}"],
            stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"serve exited: {(self.home / 'serve.log').read_text()[-2000:]}"
        self.owner = json.loads(line)["owner"]
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _generation(envelope: bytes) -> int:
    doc = json.loads(envelope)
    return int(json.loads(base64.b64decode(doc["payload"]))["generation"])


class Env:
    def __init__(self, cp: ControlPlane, fleet: Fleet, replicas: list[Replica], tap: MqttClient, url: str):
        self.cp, self.fleet, self.replicas, self.tap, self.url = cp, fleet, replicas, tap, url


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with fresh_database() as url:
        broker = Mosquitto(tmp_path / "broker").start()
        artifacts = tmp_path / "artifacts"
        server = BundleServer(artifacts).start()
        keys = tmp_path / "keys"
        _, pub, _ = signer.create_keypair(keys)
        cert = broker.client_cert("operator")

        def home(name: str) -> Path:
            h = tmp_path / name
            shutil.copytree(keys, h / "keys")
            (h / "config.toml").write_text(
                to_toml({
                    "broker": {"host": broker.host, "port": broker.operator_port, "ca": str(cert.ca_path),
                               "cert": str(cert.cert_path), "key": str(cert.key_path),
                               "prefix": broker.prefix},
                    "artifacts": {"url": str(artifacts), "public_url": server.url + "/"},
                    "registry": {"url": url},
                    "serve": {"lease": LEASE_S, "poll": 0.2},
                })
            )  # fmt: skip
            return h

        # the wiretap subscribes before anything is published: every manifest reaches it live
        tap = MqttClient(broker, "operator").connect()
        assert tap.subscribe(f"{broker.prefix}/devices/+/desired") == [1]
        # the ACL grants the operator the shared subscription the replicas take for heartbeats
        assert tap.subscribe(f"$share/edge-deploy/{broker.prefix}/devices/+/heartbeat", qos=0) == [0]
        key = mf.load_public_key(pub.read_bytes())
        specs = [DeviceSpec(f"sim-{i:03d}", {}) for i in range(N)]
        fleet = Fleet(tmp_path / "devices", broker, {mf.key_id(key): key}, specs).start()
        cp = ControlPlane(config.load(home("admin")))
        replicas: list[Replica] = []
        try:
            deadline = time.monotonic() + 60
            while len([d for d in cp.devices() if d["status"]]) < N and time.monotonic() < deadline:
                time.sleep(0.3)
            for d in cp.registry.devices():
                cp.registry.tag_device(d["id"], {"fleet": "sim"})
            replicas = [Replica(home(f"replica-{i}")).start() for i in range(REPLICAS)]
            yield Env(cp, fleet, replicas, tap, url)
        finally:
            for r in replicas:
                r.stop()
            cp.close()
            tap.close()
            fleet.stop()
            server.stop()
            broker.stop()


def _wait(what: str, predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_killed_replica_s_rollout_is_finished_by_another_with_each_manifest_published_once(
    env: Env,
) -> None:
    src = env.cp.cfg.home / "m.onnx"
    mlp(src, sizes=(8, 16, 4), seed=1)
    model = env.cp.register_model("m", src, {}, {})
    image = env.cp.build_image("img", [("m", "m", model.version)])
    # waves 2, 4, 6, each soaking 2 s: the rollout lasts long enough to be killed in the middle
    policy = Policy(canary=2, growth=2, gate=Gate(soak_s=2.0, max_error_rate=1.0))
    dep_id = env.cp.create_deployment(image, [], {"fleet": "sim"}, policy)

    reg = Registry(env.url)
    try:
        # the driving replica, caught soaking wave 2: a wave published, more to come, and no
        # publication in flight (so "exactly once" below is the outbox's doing, not luck)
        def soaking() -> dict[str, Any] | None:
            dep = reg.deployment(dep_id)
            return dep if dep["wave"] == 2 and dep["phase"] == "soaking" else None

        dep = _wait("wave 2 to soak", soaking, 60)
        (victim,) = [r for r in env.replicas if r.owner == dep["lease_owner"]]
        victim.kill()

        _wait("the rollout to finish", lambda: reg.deployment(dep_id)["state"] != "running", 90)
        dep = reg.deployment(dep_id)
        assert dep["state"] == "succeeded", dep
        # another (live) replica finished it
        assert dep["lease_owner"] in {r.owner for r in env.replicas if r is not victim}, dep
        members = reg.members(dep_id)
    finally:
        reg.close()

    assert {m["state"] for m in members} == {"active"}
    assert all(m["outbox"] is None for m in members)
    # what the broker delivered: per device, one manifest, of the generation its member records
    time.sleep(0.5)  # the wiretap's last messages
    seen: Counter[tuple[str, int]] = Counter()
    for msg in env.tap.drain():
        if not msg.topic.endswith("/desired"):
            continue
        seen[(msg.topic.split("/")[2], _generation(bytes(msg.payload)))] += 1
    want = Counter({(m["device_id"], int(m["generation"])): 1 for m in members})
    assert seen == want
    # and every simulated device runs the image
    for dev in env.fleet.devices.values():
        assert dev.on_disk() == image.sha256, dev.device_id


# -- the outbox and the fence, on both databases, with the broker faked at the driver's seam -----------


class FakeFleet:
    """The driver's view of the broker (driver.Fleet): no reports; publications counted, or the
    process "killed" in the middle of one."""

    def __init__(self, die: bool = False) -> None:
        self.die = die
        self.sent: list[tuple[str, bytes]] = []

    def report(self, device_id: str, kind: str = "status") -> dict[str, Any] | None:
        return None

    def publish_manifests(self, items: list[tuple[str, bytes]], timeout: float = 30.0) -> None:
        if self.die:
            # a BaseException: it passes every handler on the way out, as a SIGKILL stops them all
            raise KeyboardInterrupt("killed before the broker took the manifests")
        self.sent += items


def _one_wave(reg: Registry, tmp_path: Path) -> str:
    for d in ("d1", "d2"):
        reg.observe_device(d, "online", {"online": True})
    model = reg.add_model("m", sha256="a" * 64, size=1, artifact_for=lambda v: f"models/m/{v}",
                          inputs=[], outputs=[])  # fmt: skip
    image = reg.add_image(
        "img", build=lambda v: ("b" * 64, 10, f"images/img/{v}.tar", {}), models={"m": model}
    )
    reg.create_deployment("dep-1", image, {}, ["d1", "d2"], Policy(canary=2).as_dict(), {}, [2])
    return "dep-1"


def _driver(reg: Registry, fleet: FakeFleet, owner: str, tmp_path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from deploy.artifacts import ArtifactStore
    from deploy.rollout import Driver

    store = ArtifactStore(str(tmp_path / "artifacts"), public_url="http://files.example/")
    return Driver(reg, fleet, Ed25519PrivateKey.from_private_bytes(b"k" * 32), store, owner=owner)


def test_a_driver_killed_between_recording_and_publishing_loses_nothing_and_issues_nothing_twice(
    registry_location: Path | str, tmp_path: Path
) -> None:
    reg = Registry(registry_location)
    try:
        dep_id = _one_wave(reg, tmp_path)
        with pytest.raises(KeyboardInterrupt):
            _driver(reg, FakeFleet(die=True), "a", tmp_path).step(dep_id)
        recorded = {m["device_id"]: m for m in reg.members(dep_id)}
        # the step is recorded (generations issued, state updating), its manifests in the outbox
        assert {m["state"] for m in recorded.values()} == {"updating"}
        assert [d for d, _ in reg.outbox(dep_id)] == ["d1", "d2"]

        fleet = FakeFleet()
        b = _driver(reg, fleet, "b", tmp_path)
        b.step(dep_id)
        # b published what a recorded, byte for byte: same generation, same sha256, nothing new
        assert sorted(d for d, _ in fleet.sent) == ["d1", "d2"]
        for device_id, envelope in fleet.sent:
            m = recorded[device_id]
            assert hashlib.sha256(envelope).hexdigest() == m["manifest_sha256"]
            assert _generation(envelope) == m["generation"]
        assert reg.outbox(dep_id) == []
        b.step(dep_id)
        assert len(fleet.sent) == 2
    finally:
        reg.close()


def test_a_driver_whose_lease_was_taken_publishes_nothing(
    registry_location: Path | str, tmp_path: Path
) -> None:
    reg = Registry(registry_location)
    try:
        dep_id = _one_wave(reg, tmp_path)
        assert reg.take_lease(dep_id, "b", 30.0)
        fleet = FakeFleet()
        # "a" stalled past its lease, which "b" now holds: its step is fenced off before publishing
        _driver(reg, fleet, "a", tmp_path).step_or_wait(dep_id)
        assert fleet.sent == []
        assert {m["state"] for m in reg.members(dep_id)} == {"pending"}
        assert reg.outbox(dep_id) == []
        # the holder goes on
        _driver(reg, fleet, "b", tmp_path).step_or_wait(dep_id)
        assert sorted(d for d, _ in fleet.sent) == ["d1", "d2"]
    finally:
        reg.close()
