"""Azure IoT Hub transport, end to end: real edge-agent processes driving the real azure-iot-device
SDK against simulators/iothub.py (a TLS mosquitto per device on port 8883 of its own loopback
address, and a responder that plays the hub's twin service), bridged to the control plane's broker.

Each test has its own device (and so its own hub broker), sharing one rig: broker, bundle server,
signing key.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import MqttClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.channel.iothub import status_from_twin
from deploy import cli as deploy_cli
from edge_core import manifest as mf
from edge_core.fsutil import hash_file
from simulators import models
from simulators.broker import ClientCert, Mosquitto
from simulators.bundle_server import BundleServer
from simulators.iothub import HubDevice, IotHubSim
from simulators.rig import AgentProcess, Rig, wait_until

TIMEOUT = 30.0


class Hub:
    def __init__(self, rig: Rig, hub: IotHubSim) -> None:
        self.rig = rig
        self.hub = hub
        self.generations: dict[str, int] = {}

    def device(self, device_id: str, *, x509: bool = False, start_hub: bool = True, **cert: Any) -> HubDevice:
        dev = self.hub.add_device(device_id, x509=x509, start=start_hub)
        if cert:
            dev.cert = self.hub.issue_device_cert(device_id, **cert)
        return dev

    def agent(self, dev: HubDevice) -> AgentProcess:
        hub_cfg: dict[str, Any] = {
            **dev.agent_section(self.hub.ca_path),
            "reconnect_min": 0.2,
            "reconnect_max": 1.0,
        }
        if hub_cfg.pop("connection_string", None):  # SAS: from a file, as the installer lays it out
            cs = self.rig.workdir / "devices" / dev.device_id / "connection-string"
            cs.parent.mkdir(parents=True, exist_ok=True)
            cs.write_text(dev.connection_string + "\n")
            cs.chmod(0o600)
            hub_cfg["connection_string_file"] = str(cs)
        overrides: dict[str, Any] = {"transport": "iothub", "iothub": hub_cfg, "telemetry": {"interval": 0.5}}
        return self.rig.add_device(dev.device_id, overrides).start()

    def running(self, device_id: str) -> tuple[HubDevice, AgentProcess, Path, int]:
        """A device whose agent runs v1 of its own image: (device, agent, bundle, generation)."""
        dev = self.device(device_id)
        agent = self.agent(dev)
        signed, bundle, gen = self.signed(device_id, "1")
        self.hub.set_manifest(device_id, signed)
        self.wait_state(device_id, gen)
        return dev, agent, bundle, gen

    def signed(self, device_id: str, version: str, **over: Any) -> tuple[bytes, Path, int]:
        gen = self.generations.get(device_id, 0) + 1
        self.generations[device_id] = gen
        b = self.rig.build_bundle(f"model-{device_id}", version)
        return self.rig.sign(self.rig.manifest(device_id, b, gen, **over)), b, gen

    def wait_state(self, device_id: str, generation: int, state: str = "active") -> dict[str, Any]:
        def done(r: dict[str, Any]) -> bool:
            s = r.get("status") or {}
            return bool(s.get("generation") == generation and s.get("state") == state)

        try:
            return status_from_twin(self.hub.wait_reported(device_id, done, TIMEOUT)["status"])
        except TimeoutError as exc:
            agent = self.rig.agents.get(device_id)
            raise TimeoutError(
                f"{exc}\n--- agent log ---\n{agent.log_text()[-3000:] if agent else ''}"
            ) from None

    def wait_rejected(self, device_id: str, code: str) -> dict[str, Any]:
        doc = self.hub.wait_reported(
            device_id, lambda r: ((r.get("status") or {}).get("rejected") or {}).get("code") == code, TIMEOUT
        )
        return status_from_twin(doc["status"])


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with (
        Rig(tmp_path_factory.mktemp("iothub")) as rig,
        IotHubSim(rig.workdir / "hub", bridge=rig.broker) as sim,
    ):
        yield Hub(rig, sim)


def test_x509_initial_twin_then_desired_patch(hub: Hub) -> None:
    """The manifest is in the twin before the device first connects; then a patch brings v2."""
    dev = hub.device("hub-x509", x509=True)
    signed, b1, gen1 = hub.signed(dev.device_id, "1")
    hub.hub.set_manifest(dev.device_id, signed)
    agent = hub.agent(dev)

    status = hub.wait_state(dev.device_id, gen1)
    assert status["active"]["sha256"] == hash_file(b1) == agent.current_image()
    assert mf.schema_error(status, "status") is None
    reported = hub.hub.reported(dev.device_id)
    assert reported["online"]["online"] is True
    assert "CPUExecutionProvider" in reported["inventory"]["onnxruntime"]["execution_providers"]
    # Only the hub's reported copy has a version: the agent never sends one itself.
    assert hub.hub.twin(dev.device_id)["reported"]["$version"] > 1

    signed2, b2, gen2 = hub.signed(dev.device_id, "2")
    hub.hub.set_manifest(dev.device_id, signed2)
    status = hub.wait_state(dev.device_id, gen2)
    assert status["active"]["sha256"] == hash_file(b2) == agent.current_image()
    assert status["error"] is None
    # Heartbeats are device-to-cloud messages, not twin updates.
    assert wait_until(lambda: any(m["properties"].get("type") == "heartbeat" for m in dev.messages), TIMEOUT)
    beat = next(m for m in dev.messages if m["properties"].get("type") == "heartbeat")
    assert beat["properties"]["$.ct"] == "application/json" and beat["body"]["device_id"] == dev.device_id

    assert agent.stop() == 0
    assert hub.hub.reported(dev.device_id)["online"] == {
        **hub.hub.reported(dev.device_id)["online"], "online": False, "reason": "shutdown"
    }  # fmt: skip


def test_connection_string_device_is_deployed_by_the_control_plane(hub: Hub) -> None:
    """The operator publishes on the control plane's broker; the bridge puts it in the twin, and
    the device's reported status comes back as its retained status there."""
    dev = hub.device("hub-sas")
    agent = hub.agent(dev)
    signed, bundle, gen = hub.signed(dev.device_id, "1")
    hub.rig.publish(dev.device_id, signed)
    status = hub.rig.wait_active(dev.device_id, gen, timeout=TIMEOUT)
    assert status["active"]["sha256"] == hash_file(bundle) == agent.current_image()
    assert hub.hub.twin(dev.device_id)["desired"]["edge"]["manifest"] == signed.decode()
    inventory = hub.rig.op.report(dev.device_id, "inventory")
    assert inventory is not None and inventory["device_id"] == dev.device_id
    online = hub.rig.op.report(dev.device_id, "online")
    assert online is not None and online["online"] is True


def test_edge_deploy_rolls_out_in_waves_to_devices_behind_the_hub(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole control plane (registry, image build, a rollout in waves) through the hub."""
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    for suffix in ("key", "pub"):
        (home / "keys" / f"signing.{suffix}").write_bytes(
            (hub.rig.pubkey_path.parent / f"signing.{suffix}").read_bytes()
        )
    artifacts = BundleServer(home / "artifacts").start()
    broker, cert = hub.rig.broker, hub.rig.broker.client_cert("operator")
    (home / "config.toml").write_text(
        f'[broker]\nhost = "{broker.host}"\nport = {broker.operator_port}\nca = "{cert.ca_path}"\n'
        f'cert = "{cert.cert_path}"\nkey = "{cert.key_path}"\nprefix = "{broker.prefix}"\n'
        f'[artifacts]\npublic_url = "{artifacts.url}/"\n'
    )

    def plane(*argv: str) -> Any:
        capsys.readouterr()
        rc = deploy_cli.main(["--home", str(home), *argv])
        out, err = capsys.readouterr()
        assert rc == 0, f"edge-deploy {' '.join(argv)} -> {rc}\n{err}\n{out}"
        return json.loads(out)

    ids = ["hub-cp-1", "hub-cp-2", "hub-cp-3"]
    agents = {d: hub.agent(hub.device(d)) for d in ids}
    try:
        model = models.mlp(tmp_path / "m.onnx", sizes=(4, 8, 2))
        plane("model", "register", "hubmlp", str(model), "--json")
        plane("image", "build", "--name", "hubclf", "--model", "m=hubmlp:1", "--json")
        assert wait_until(lambda: set(ids) <= {d["id"] for d in plane("device", "list", "--json")}, TIMEOUT)
        argv = ["deploy", "create", "hubclf:1", "--canary", "1", "--json"]
        dep = plane(*argv[:3], *[x for d in ids for x in ("--device", d)], *argv[3:])
        assert dep["state"] == "succeeded" and dep["waves"] >= 2, dep
        sha = plane("image", "show", "hubclf:1", "--json")["sha256"]
        for d, agent in agents.items():
            assert agent.current_image() == sha
            assert hub.hub.reported(d)["status"]["active"]["sha256"] == sha
    finally:
        for agent in agents.values():
            agent.stop()
        artifacts.stop()


def test_bad_manifests_in_the_twin_are_refused_and_change_nothing(hub: Hub) -> None:
    dev, agent, bundle, gen = hub.running("hub-bad")

    hub.hub.set_manifest(dev.device_id, b'{"payloadType": "application/vnd.edge-ml.manifest+json", "pay')
    status = hub.wait_rejected(dev.device_id, "manifest_malformed")
    assert status["rejected"]["message"] and status["rejected"]["hint"]

    unsigned_gen = hub.generations[dev.device_id] + 1
    b = hub.rig.build_bundle("unsigned", "1")
    hub.hub.set_manifest(dev.device_id, mf.canonical_json(hub.rig.manifest(dev.device_id, b, unsigned_gen)))
    hub.wait_rejected(dev.device_id, "manifest_unsigned")

    foreign = mf.sign(hub.rig.manifest(dev.device_id, b, unsigned_gen), Ed25519PrivateKey.generate())
    hub.hub.set_manifest(dev.device_id, foreign)
    hub.wait_rejected(dev.device_id, "manifest_unknown_key")

    # Not a string: a bare object in the twin is refused like any unsigned message...
    hub.hub.set_desired(dev.device_id, {"edge": {"manifest": {"generation": 99}}})
    status = hub.wait_rejected(dev.device_id, "manifest_unsigned")

    assert status["generation"] == gen and status["state"] == "active"
    assert agent.current_image() == hash_file(bundle) and agent.running
    # ... but a signed envelope written into the twin as an object verifies (the signature covers
    # the base64 payload, not the envelope's spacing), and the next good manifest is taken.
    signed2, bundle2, gen2 = hub.signed(dev.device_id, "2")
    hub.hub.set_desired(dev.device_id, {"edge": {"manifest": json.loads(signed2)}})
    status = hub.wait_state(dev.device_id, gen2)
    assert status["rejected"] is None and agent.current_image() == hash_file(bundle2)


def test_a_skipped_twin_version_is_noticed_and_the_twin_read_again(hub: Hub) -> None:
    dev, agent, _bundle, _gen = hub.running("hub-gap")
    gets = dev.gets

    signed2, bundle2, gen2 = hub.signed(dev.device_id, "2")
    hub.hub.set_manifest(dev.device_id, signed2, deliver=False)  # this notification is lost
    hub.hub.set_desired(dev.device_id, {"unrelated": {"setting": 1}})  # the next one reveals the gap
    status = hub.wait_state(dev.device_id, gen2)
    assert status["active"]["sha256"] == hash_file(bundle2) == agent.current_image()
    assert dev.gets > gets
    assert "iothub.patch_gap" in agent.log_text()


def test_hub_unreachable_at_start_then_back(hub: Hub) -> None:
    dev = hub.device("hub-late", start_hub=False)
    signed, bundle, gen = hub.signed(dev.device_id, "1")
    hub.hub.set_manifest(dev.device_id, signed)
    agent = hub.agent(dev)
    assert wait_until(lambda: agent.log_text().count("iothub.connect_failed") >= 2, TIMEOUT), agent.log_text()
    failure = next(
        json.loads(line) for line in agent.log_text().splitlines() if "iothub.connect_failed" in line
    )
    assert failure["endpoint"] == f"{dev.address}:8883" and "refused" in failure["error"].lower()
    assert agent.running

    hub.hub.start_device(dev.device_id)
    status = hub.wait_state(dev.device_id, gen)
    assert status["active"]["sha256"] == hash_file(bundle) == agent.current_image()


def test_hub_restart_loses_the_session_and_the_agent_subscribes_again(hub: Hub) -> None:
    dev, agent, _bundle, _gen = hub.running("hub-restart")

    hub.hub.stop_device(dev.device_id)  # the simulated hub keeps no sessions: subscriptions are gone
    assert wait_until(
        lambda: "iothub.disconnected" in agent.log_text() or "iothub.session_lost" in agent.log_text(),
        TIMEOUT,
    )
    gets = dev.gets
    hub.hub.start_device(dev.device_id)
    assert wait_until(lambda: dev.gets > gets, TIMEOUT), agent.log_text()[-3000:]  # the twin is read again
    signed2, bundle2, gen2 = hub.signed(dev.device_id, "2")
    hub.hub.set_manifest(dev.device_id, signed2)
    status = hub.wait_state(dev.device_id, gen2)
    assert status["active"]["sha256"] == hash_file(bundle2) == agent.current_image()


def test_expired_device_certificate_is_a_clear_error_and_the_agent_keeps_running(hub: Hub) -> None:
    now = datetime.now(UTC)
    dev = hub.device(
        "hub-expired", x509=True, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    agent = hub.agent(dev)
    assert wait_until(lambda: "iothub.connect_failed" in agent.log_text(), TIMEOUT), agent.log_text()
    line = next(json.loads(x) for x in agent.log_text().splitlines() if "iothub.connect_failed" in x)
    assert "expired" in line["error"].lower(), line
    # ... said in plain words at start, before the first attempt, with what to do.
    problem = next(json.loads(x) for x in agent.log_text().splitlines() if "agent.certificate_problem" in x)
    assert problem["code"] == "cert_expired" and problem["level"] == "error" and "renew" in problem["hint"]
    assert agent.running
    assert hub.hub.reported(dev.device_id) == {}


def test_edge_sim_hub_prints_each_devices_credentials_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "hub",
            "--device",
            "cli-1",
            "--x509",
            "--workdir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["device_id"] == "cli-1" and line["address"].endswith(":8883")
        assert Path(line["iothub"]["cert"]).is_file() and line["iothub"]["hostname"] == line["address"][:-5]
        with socket.create_connection((line["iothub"]["hostname"], 8883), timeout=5):
            pass  # the device's hub broker listens
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_another_hub_certificate_cannot_take_an_x509_devices_session(hub: Hub) -> None:
    """The hub broker forces an X.509 client's id to its CN, as IoT Hub insists on client id =
    device id; the responder, on its own listener, keeps answering the device."""
    dev = hub.device("hub-id-a", x509=True)
    other = hub.device("hub-id-b", x509=True, start_hub=False)
    assert dev.cert is not None and other.cert is not None
    victim = MqttClient(dev.broker, dev.device_id, port=dev.broker.port, cert=dev.cert).connect()
    attacker = MqttClient(dev.broker, other.device_id, client_id=dev.device_id, port=dev.broker.port,
                          cert=other.cert)  # fmt: skip
    try:
        victim.subscribe("$iothub/twin/PATCH/properties/desired/#")
        attacker.connect()
        version = hub.hub.set_desired(dev.device_id, {"probe": 1})
        patch = victim.expect(f"$iothub/twin/PATCH/properties/desired/?$version={version}")
        assert json.loads(patch.payload)["probe"] == 1
        assert not victim.disconnected.is_set()
    finally:
        attacker.close()
        victim.close()


def test_edge_sim_hub_bridges_through_the_operator_listener(tmp_path: Path) -> None:
    """``--bridge`` names the control plane broker's operator listener: a manifest published there
    reaches the device's twin."""
    with Mosquitto(tmp_path / "broker") as broker:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.cli", "hub", "--device", "cli-b", "--x509",
             "--workdir", str(tmp_path / "hub"), "--bridge", f"{broker.host}:{broker.operator_port}",
             "--bridge-dir", str(broker.workdir)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        operator = MqttClient(broker, "operator").connect()
        try:
            assert proc.stdout is not None
            line = json.loads(proc.stdout.readline())["iothub"]
            operator.publish("edge/devices/cli-b/desired", b"signed manifest", retain=True)
            device = mqtt.Client(client_id="cli-b", protocol=mqtt.MQTTv311)
            device.tls_set_context(
                ClientCert(Path(line["ca"]), Path(line["cert"]), Path(line["key"])).ssl_context()
            )
            twins: list[dict[str, Any]] = []
            device.on_message = lambda _c, _u, msg: twins.append(json.loads(msg.payload))
            device.connect(line["hostname"], 8883)
            device.subscribe("$iothub/twin/res/#", qos=1)
            device.loop_start()
            try:

                def manifest() -> Any:
                    device.publish("$iothub/twin/GET/?$rid=1", b"", qos=1)
                    time.sleep(0.2)
                    return twins and twins[-1]["desired"].get("edge", {}).get("manifest")

                assert wait_until(lambda: manifest() == "signed manifest", TIMEOUT, interval=0.3), twins[-1:]
            finally:
                device.disconnect()
                device.loop_stop()
        finally:
            operator.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
