"""The operator's first hour, on a real mosquitto: `pki init`, `broker config`, `device enroll`, a real
`edge-agent` from the install bundle seen by `device list`, and `device revoke` refused by the broker.

Everything runs through the real command lines (subprocesses); only the listener ports are chosen
here (flags and EDGE_* variables), so that tests can run beside each other."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from simulators.broker import find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent


def edge(
    *argv: str, cwd: Path, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv], cwd=cwd, env=full_env, capture_output=True, text=True
    )
    if ok:
        assert p.returncode == 0, f"edge-deploy {' '.join(argv)} -> {p.returncode}\n{p.stderr}"
    return p


class Broker:
    def __init__(self, home: Path, tmp: Path) -> None:
        self.home, self.tmp = home, tmp
        self.device_port, self.operator_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.home / "broker" / "mosquitto.conf"
        seen = len(self.log()) if (self.tmp / "mosquitto.log").exists() else 0
        log = open(self.tmp / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while "Opening ipv4 listen socket on port " + str(self.operator_port) not in self.log()[seen:]:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.tmp / "mosquitto.log").read_text(errors="replace")


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[Path, Broker, dict[str, str]]]:
    home = tmp_path / "cp"
    broker = Broker(home, tmp_path)
    env = {"EDGE_DEPLOY_HOME": str(home), "EDGE_DEPLOY_BROKER__PORT": str(broker.operator_port)}
    edge("pki", "init", "--broker-host", "localhost", "--broker-host", "127.0.0.1", cwd=tmp_path, env=env)
    edge(
        "broker",
        "config",
        "--device-port",
        str(broker.device_port),
        "--device-bind",
        "127.0.0.1",
        # under pytest as root: mosquitto's own user could not read the test's private tmp directory
        *(["--run-as", "root"] if os.geteuid() == 0 else []),
        cwd=tmp_path,
        env=env,
    )
    broker.start()
    try:
        yield home, broker, env
    finally:
        broker.stop()


def test_pki_files_modes_and_idempotence(tmp_path: Path) -> None:
    env = {"EDGE_DEPLOY_HOME": str(tmp_path / "cp")}
    edge("pki", "init", "--broker-host", "broker.example", cwd=tmp_path, env=env)
    pki_dir = tmp_path / "cp" / "pki"
    assert (pki_dir.stat().st_mode & 0o777) == 0o700
    for key in ("ca.key", "operator.key", "broker.key"):
        assert ((pki_dir / key).stat().st_mode & 0o777) == 0o600
    cert = x509.load_pem_x509_certificate((pki_dir / "broker.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    ca_before = (pki_dir / "ca.pem").read_bytes()
    again = edge("pki", "init", "--broker-host", "broker.example", cwd=tmp_path, env=env, ok=False)
    assert again.returncode == 2 and "already_exists" in again.stderr and "hint:" in again.stderr
    assert (pki_dir / "ca.pem").read_bytes() == ca_before
    edge("pki", "init", "--broker-host", "broker.example", "--force", cwd=tmp_path, env=env)
    assert (pki_dir / "ca.pem").read_bytes() != ca_before


def test_enroll_with_csr_and_as_tar(tmp_path: Path) -> None:
    env = {"EDGE_DEPLOY_HOME": str(tmp_path / "cp")}
    edge("pki", "init", "--broker-host", "broker.example", cwd=tmp_path, env=env)
    key = ec.generate_private_key(ec.SECP256R1())

    def csr(cn: str) -> Path:
        req = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256())
        )
        path = tmp_path / f"{cn}.csr"
        path.write_bytes(req.public_bytes(serialization.Encoding.PEM))
        return path

    wrong = edge("device", "enroll", "dev-9", "--csr", str(csr("dev-8")), cwd=tmp_path, env=env, ok=False)
    assert wrong.returncode == 2 and "csr_invalid" in wrong.stderr
    done = edge(
        "device", "enroll", "dev-9", "--csr", str(csr("dev-9")), "--out", "dev-9.tar", cwd=tmp_path, env=env
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    assert "install.sh --device-id dev-9" in doc["install"]
    with tarfile.open(tmp_path / "dev-9.tar") as tar:
        names = set(tar.getnames())
        cert_file = tar.extractfile("certs/device.pem")
        assert cert_file is not None
        cert = x509.load_pem_x509_certificate(cert_file.read())
    assert names == {"agent.toml", "certs/ca.pem", "certs/device.pem", "trust/signing.pub"}  # no key
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()


def _connect(bundle: Path, port: int) -> int:
    """The CONNACK reason code for a client with the bundle's identity, or -1 when TLS refused it."""
    ctx = ssl.create_default_context(cafile=str(bundle / "certs" / "ca.pem"))
    ctx.load_cert_chain(str(bundle / "certs" / "device.pem"), str(bundle / "certs" / "device.key"))
    client = mqtt.Client(client_id="probe", protocol=mqtt.MQTTv311)
    client.tls_set_context(ctx)
    result: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc: result.append(rc)
    try:
        client.connect("localhost", port)
        deadline = time.monotonic() + 5
        while not result and time.monotonic() < deadline:
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError):
        return -1
    finally:
        with contextlib.suppress(OSError):  # after a refused handshake there is nothing to close
            client.disconnect()
    return result[0] if result else -1


def test_enrolled_agent_is_seen_and_revoked_device_is_refused(
    plane: tuple[Path, Broker, dict[str, str]], tmp_path: Path
) -> None:
    _home, broker, env = plane
    edge("device", "enroll", "dev-1", "--out", "dev-1", cwd=tmp_path, env=env)
    edge("device", "enroll", "dev-2", "--out", "dev-2", cwd=tmp_path, env=env)
    agent_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EDGE_AGENT_MQTT__PORT": str(broker.device_port),
        "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
        "EDGE_AGENT_API__LISTEN": "127.0.0.1:0",
    }
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - owned by the child
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.ops.cli", "run", "--config", str(tmp_path / "dev-1" / "agent.toml")],
        env=agent_env,
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            listed = json.loads(edge("device", "list", "--json", cwd=tmp_path, env=env).stdout)
            if any(d["id"] == "dev-1" and d["online"] for d in listed):
                break
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()
            assert time.monotonic() < deadline, f"{listed}\n{(tmp_path / 'agent.log').read_text()}"
            time.sleep(0.5)
    finally:
        agent.terminate()
        agent.wait(20)

    assert _connect(tmp_path / "dev-2", broker.device_port) == 0
    edge("device", "revoke", "dev-2", cwd=tmp_path, env=env)
    broker.stop()
    broker.start()  # mosquitto reads the CRL at start
    assert _connect(tmp_path / "dev-2", broker.device_port) != 0
    assert _connect(tmp_path / "dev-1", broker.device_port) == 0
    assert "certificate verify failed" in broker.log()
