"""Fleet provisioning on a real mosquitto run with the config `edge-deploy broker config` writes: a real
`edge-agent` holding only a claim certificate provisions itself, reconnects as itself and is listed with
the policy's tags; a refused id gets no identity; the claim is confined to its provisioning topics; a
revoked provisioned device is refused by the broker and by the provisioning handler.

Every command runs as a subprocess through its real command line; only the ports are chosen here."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig
from agent.ops.provision import request_once
from simulators.broker import find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
POLICY = """
[claims.factory]
device_ids = ["sensor-*"]
tags = { site = "lyon", line = "3" }
"""


def edge(*argv: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    p = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv], cwd=cwd, env=full_env, capture_output=True, text=True
    )
    if ok:
        assert p.returncode == 0, f"edge-deploy {' '.join(argv)} -> {p.returncode}\n{p.stderr}"
    return p


def wait_for(what: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.2)


@dataclass
class Plane:
    tmp: Path
    home: Path
    env: dict[str, str]
    device_port: int
    operator_port: int
    procs: list[subprocess.Popen[bytes]]

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env, **(env or {})}
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=full_env, cwd=self.tmp)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_broker(self) -> subprocess.Popen[bytes]:
        seen = len(self.log("mosquitto"))
        proc = self.spawn("mosquitto", [find_mosquitto(), "-c", str(self.home / "broker" / "mosquitto.conf")])
        marker = f"Opening ipv4 listen socket on port {self.operator_port}"
        wait_for(
            lambda: marker in self.log("mosquitto")[seen:] or proc.poll() is not None,
            10,
            lambda: self.log("mosquitto"),
        )
        assert proc.poll() is None, self.log("mosquitto")
        return proc

    def configure_and_start_broker(self) -> None:
        """Free ports are only free when chosen: another test may take one first, so try again."""
        for attempt in range(3):
            self.device_port, self.operator_port = free_port("127.0.0.1"), free_port("127.0.0.1")
            self.env["EDGE_DEPLOY_BROKER__PORT"] = str(self.operator_port)
            edge(
                "broker", "config", "--device-port", str(self.device_port), "--device-bind", "127.0.0.1",
                *(["--run-as", "root"] if os.geteuid() == 0 else []), cwd=self.tmp, env=self.env,
            )  # fmt: skip
            try:
                self.start_broker()
                return
            except AssertionError:
                if attempt == 2 or "Address already in use" not in self.log("mosquitto"):
                    raise
                self.procs.pop()

    def start_provisioner(self) -> subprocess.Popen[bytes]:
        seen = self.log("provision").count('{"provisioning"')
        proc = self.spawn("provision", [sys.executable, "-m", "deploy.cli", "provision", "serve"])
        ready = lambda: self.log("provision").count('{"provisioning"') > seen  # noqa: E731
        wait_for(ready, 20, lambda: self.log("provision"))
        return proc

    def agent_toml(self, name: str, device_id: str, **extra: str) -> Path:
        claim = self.tmp / "claim-factory"
        lines = [
            f'state_dir = "{self.tmp / name}"',
            "[mqtt]",
            'host = "localhost"',
            f"port = {self.device_port}",
            f'ca = "{claim / "ca.pem"}"',
            "reconnect_max = 2.0",
            "[api]",
            'listen = "127.0.0.1:0"',
            "[trust]",
            f'keys = ["{self.home / "keys" / "signing.pub"}"]',
            "[provisioning]",
            f'claim_cert = "{claim / "claim.pem"}"',
            f'claim_key = "{claim / "claim.key"}"',
            f'device_id = "{device_id}"',
            "timeout = 5.0",
            "backoff_min = 0.2",
            "backoff_max = 1.0",
            *(f"{k} = {v}" for k, v in extra.items()),
        ]
        path = self.tmp / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_agent(self, name: str, config: Path) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "agent.ops.cli", "run", "--config", str(config)]
        return self.spawn(name, argv)

    def devices(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(
            edge("device", "list", "--json", cwd=self.tmp, env=self.env).stdout
        )
        return listed


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    home = tmp_path / "cp"
    env = {"EDGE_DEPLOY_HOME": str(home)}
    p = Plane(tmp_path, home, env, 0, 0, [])
    edge("pki", "init", "--broker-host", "localhost", cwd=tmp_path, env=env)
    edge("pki", "claim", "factory", "--out", str(tmp_path / "claim-factory"), cwd=tmp_path, env=env)
    (home / "provisioning.toml").write_text(POLICY)
    try:
        p.configure_and_start_broker()
        yield p
    finally:
        for proc in reversed(p.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _cfg(p: Plane) -> AgentConfig:
    """The agent's config for a hand-made request with the claim (as agent/ops/provision.py sends)."""
    cfg = AgentConfig()
    claim = p.tmp / "claim-factory"
    cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.ca = "localhost", p.device_port, claim / "ca.pem"
    cfg.provisioning.claim_cert, cfg.provisioning.claim_key = claim / "claim.pem", claim / "claim.key"
    cfg.provisioning.timeout = 5.0
    return cfg


def _csr(device: str, key: ec.EllipticCurvePrivateKey) -> str:
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    return req.public_bytes(serialization.Encoding.PEM).decode()


def _client(p: Plane, cert: Path, key: Path, *, port: int | None = None) -> tuple[mqtt.Client, list[int]]:
    """A connected client (paho thread running) and the CONNACK codes it got ([] when TLS refused it)."""
    ctx = ssl.create_default_context(cafile=str(p.home / "pki" / "ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    client = mqtt.Client(client_id=f"probe-{time.monotonic_ns()}", protocol=mqtt.MQTTv311)
    client.tls_set_context(ctx)
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc: codes.append(rc)
    try:
        client.connect("localhost", port or p.device_port)
    except (OSError, ssl.SSLError):
        return client, codes
    client.loop_start()
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    return client, codes


def test_claim_provisions_an_agent_that_reconnects_as_itself_and_is_revocable(plane: Plane) -> None:
    p = plane
    prov = p.start_provisioner()
    agent = p.start_agent("sensor", p.agent_toml("sensor", "sensor-1"))
    wait_for(
        lambda: any(d["id"] == "sensor-1" and d["online"] for d in p.devices()),
        40,
        lambda: f"{p.devices()}\n{p.log('sensor')}\n{p.log('provision')}",
    )
    row = next(d for d in p.devices() if d["id"] == "sensor-1")
    assert row["tags"] == {"site": "lyon", "line": "3"}
    ident = p.tmp / "sensor" / "identity"
    assert (ident / "device.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((ident / "device.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
    assert '"provision.done"' in p.log("sensor")
    # The claim never shows up as a device: it only spoke on the provisioning topics.
    assert not any(d["id"].startswith("claim-") for d in p.devices())

    # Next boot: no provisioning handler running, and the agent still comes online as itself.
    agent.terminate()
    agent.wait(20)
    prov.terminate()
    prov.wait(20)
    before = p.log("sensor").count('"provision.requesting"')
    assert before == 1
    wait_for(lambda: not any(d["online"] for d in p.devices()), 20, lambda: f"{p.devices()}")
    p.start_agent("sensor", p.agent_toml("sensor", "sensor-1"))
    wait_for(
        lambda: any(d["id"] == "sensor-1" and d["online"] for d in p.devices()), 30, lambda: p.log("sensor")
    )
    assert p.log("sensor").count('"provision.requesting"') == before

    # Revoked: the broker refuses it after its restart (the CRL is read at start)...
    client, codes = _client(p, ident / "device.pem", ident / "device.key")
    client.loop_stop()
    client.disconnect()
    assert codes == [0]
    edge("device", "revoke", "sensor-1", cwd=p.tmp, env=p.env)
    broker = p.procs[0]
    broker.terminate()
    broker.wait(10)
    p.start_broker()
    client, codes = _client(p, ident / "device.pem", ident / "device.key")
    client.loop_stop()
    assert codes == []
    assert "certificate verify failed" in p.log("mosquitto")
    # ...and the claim cannot bring it back, not even with the device's own key.
    p.start_provisioner()
    key = serialization.load_pem_private_key((ident / "device.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    answer = request_once(_cfg(p), "claim-factory", "sensor-1", _csr("sensor-1", key))
    assert answer == {"ok": False, "code": "provisioning_revoked", "message": "device 'sensor-1' was revoked"}


def test_refused_device_id_gets_no_identity_and_the_agent_retries(plane: Plane) -> None:
    p = plane
    # `edge-deploy serve` answers provisioning requests itself when the home has a policy
    listen = f"127.0.0.1:{free_port('127.0.0.1')}"
    p.spawn("serve", [sys.executable, "-m", "deploy.cli", "serve", "--listen", listen, "--api-listen", ""])
    wait_for(lambda: '"provisioning": true' in p.log("serve"), 30, lambda: p.log("serve"))
    agent = p.start_agent("rogue", p.agent_toml("rogue", "rogue-1"))
    wait_for(lambda: p.log("rogue").count('"provision.refused"') >= 2, 40, lambda: p.log("rogue"))
    assert "provisioning_refused" in p.log("rogue")
    assert "not allowed for claim-factory" in p.log("rogue")
    assert agent.poll() is None  # it keeps asking: it has no identity to run with
    assert not (p.tmp / "rogue" / "identity" / "device.pem").exists()
    assert not any(d["id"] == "rogue-1" for d in p.devices())


def test_a_claim_cannot_take_over_an_existing_device_but_may_ask_again(plane: Plane) -> None:
    p = plane
    p.start_provisioner()
    cfg = _cfg(p)
    key = ec.generate_private_key(ec.SECP256R1())
    first = request_once(cfg, "claim-factory", "sensor-7", _csr("sensor-7", key))
    assert first["ok"] is True and "BEGIN CERTIFICATE" in first["certificate"]
    again = request_once(cfg, "claim-factory", "sensor-7", _csr("sensor-7", key))  # a lost answer
    assert again["ok"] is True
    other = ec.generate_private_key(ec.SECP256R1())
    stolen = request_once(cfg, "claim-factory", "sensor-7", _csr("sensor-7", other))
    assert stolen["ok"] is False and stolen["code"] == "provisioning_conflict"
    claimish = request_once(cfg, "claim-factory", "claim-factory", _csr("claim-factory", other))
    assert claimish["ok"] is False and claimish["code"] == "provisioning_refused"


def _received(client: mqtt.Client, topic: str) -> list[bytes]:
    got: list[bytes] = []
    subscribed = threading.Event()
    # per filter: one client's several probes must not share one list
    client.message_callback_add(topic, lambda _c, _u, msg: got.append(bytes(msg.payload)))
    client.on_subscribe = lambda *_a: subscribed.set()
    client.subscribe(topic, qos=1)
    assert subscribed.wait(5)
    return got


def test_the_claim_is_confined_to_its_own_provisioning_topics(plane: Plane) -> None:
    p = plane
    edge("device", "enroll", "dev-1", "--out", "dev-1", cwd=p.tmp, env=p.env)
    edge("pki", "claim", "other", "--out", str(p.tmp / "claim-other"), cwd=p.tmp, env=p.env)
    pki = p.home / "pki"
    claim = p.tmp / "claim-factory"
    device, codes = _client(
        p, p.tmp / "dev-1" / "certs" / "device.pem", p.tmp / "dev-1" / "certs" / "device.key"
    )
    assert codes == [0]
    desired = _received(device, "edge/devices/dev-1/desired")
    other, codes = _client(p, p.tmp / "claim-other" / "claim.pem", p.tmp / "claim-other" / "claim.key")
    assert codes == [0]
    nonce = "0" * 32
    own_answers = _received(other, f"edge/provisioning/claim-other/response/{nonce}")
    spied = _received(other, f"edge/provisioning/claim-factory/response/{nonce}")
    spied_all = _received(other, "edge/provisioning/claim-factory/#")
    factory, codes = _client(p, claim / "claim.pem", claim / "claim.key")
    assert codes == [0]
    # the claim writes the device's desired topic: the broker drops it
    factory.publish("edge/devices/dev-1/desired", b"forged", qos=1).wait_for_publish(5)
    # the operator answers the factory claim and the other claim on their own answer topics
    operator, codes = _client(p, pki / "operator.pem", pki / "operator.key", port=p.operator_port)
    assert codes == [0]
    operator.publish(
        f"edge/provisioning/claim-factory/response/{nonce}", b"for factory", qos=1
    ).wait_for_publish(5)
    operator.publish(f"edge/provisioning/claim-other/response/{nonce}", b"for other", qos=1).wait_for_publish(
        5
    )
    operator.publish("edge/devices/dev-1/desired", b"real", qos=1).wait_for_publish(5)
    wait_for(lambda: bool(own_answers) and bool(desired), 5, lambda: f"{own_answers} {desired}")
    time.sleep(0.5)
    assert desired == [b"real"]  # the operator's only: the claim's forgery never arrived
    assert own_answers == [b"for other"]  # a claim reads its own answers...
    assert spied == [] and spied_all == []  # ...and never another claim's
    for c in (device, other, factory, operator):
        c.loop_stop()
        c.disconnect()
