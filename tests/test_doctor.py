"""``edge-agent doctor`` and agent/ops/certs.py against real parts: the module's mosquitto with mutual TLS,
certificates issued by deploy/pki.py (expired, not yet valid, from another CA, with the wrong key),
real SQLite files and real sockets. The CLI runs as a real process where its exit code matters."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import config
from agent.ops import certs, doctor
from agent.telemetry.buffer import Buffer, RecordClass
from deploy import pki, signer
from simulators.broker import Mosquitto, free_port
from simulators.rig import to_toml

DEV = "dev-doc"
NOW = datetime.now(UTC)


@dataclass
class Pki:
    ca: bytes
    ca_key: bytes

    def issue(self, cn: str = DEV, **kw: Any) -> tuple[bytes, bytes]:
        return pki.issue_cert(self.ca, self.ca_key, cn, **kw)


@pytest.fixture(scope="module")
def broker_pki(broker: Mosquitto) -> Pki:
    return Pki(broker.ca_path.read_bytes(), broker.ca_key_path.read_bytes())


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    return Pki(*pki.create_ca("another fleet's CA"))


@pytest.fixture(scope="module")
def trust_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _key, pub, _keyid = signer.create_keypair(tmp_path_factory.mktemp("keys"))
    return pub


class Setup:
    """A device's files and config in one directory; ``write()`` puts the config on disk."""

    def __init__(self, tmp: Path, broker: Mosquitto, trust_key: Path, bp: Pki) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.state.mkdir()
        self.ca = tmp / "ca.pem"
        self.ca.write_bytes(bp.ca)
        self.cert, self.key = tmp / "device.pem", tmp / "device.key"
        self.use(*bp.issue())
        self.cfg: dict[str, Any] = {
            "device_id": DEV,
            "state_dir": "state",
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "ca": "ca.pem",
                "cert": "device.pem",
                "key": "device.key",
            },
            "trust": {"keys": [str(trust_key)]},
            "api": {"listen": "127.0.0.1:0"},
        }

    def use(self, cert: bytes, key: bytes) -> None:
        pki.write_pem(self.cert, cert, private=False)
        pki.write_pem(self.key, key, private=True)

    def write(self) -> Path:
        path = self.tmp / "agent.toml"
        path.write_text(to_toml(self.cfg))
        return path

    def load(self) -> config.AgentConfig:
        return config.load(self.write(), env={})

    def results(self, timeout: float = 5.0) -> list[doctor.Result]:
        return doctor.run_checks(self.write(), timeout=timeout, env={})


@pytest.fixture
def setup(tmp_path: Path, broker: Mosquitto, trust_key: Path, broker_pki: Pki) -> Setup:
    return Setup(tmp_path, broker, trust_key, broker_pki)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.ops.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def by_check(results: list[doctor.Result], check: str) -> list[doctor.Result]:
    found = [r for r in results if r.check == check]
    assert found, f"no {check} result in {results}"
    return found


def verdicts(results: list[doctor.Result]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in results:
        out.setdefault(r.check, set()).add(r.verdict)
    return out


# --- agent/ops/certs.py ------------------------------------------------------------------------------


def test_inspect_cert_reads_subject_issuer_and_validity(broker_pki: Pki) -> None:
    nb = datetime(2030, 1, 1, tzinfo=UTC)
    cert, _ = broker_pki.issue(not_before=nb, not_after=nb + timedelta(days=100))
    info = certs.inspect_cert(cert, nb + timedelta(days=10, hours=1))
    assert info.subject_cn == DEV and info.subject == f"CN={DEV}"
    assert info.issuer_cn is not None and info.issuer_cn.startswith("edge-ml test broker CA")
    assert (info.not_before, info.not_after) == (nb, nb + timedelta(days=100))
    assert (info.validity, info.days_left, info.is_ca) == ("valid", 89, False)
    assert len(info.fingerprint_sha256) == 64
    assert certs.inspect_cert(cert, nb - timedelta(seconds=1)).validity == "not_yet_valid"
    assert certs.inspect_cert(cert, nb + timedelta(days=101)).validity == "expired"
    with pytest.raises(ValueError, match="timezone-aware"):
        certs.inspect_cert(cert, datetime(2030, 2, 1))  # a naive clock is refused
    with pytest.raises(ValueError, match="no PEM certificate"):
        certs.inspect_cert(b"not a certificate", NOW)


def codes(problems: list[certs.CertProblem]) -> dict[str, str]:
    return {p.code: p.severity for p in problems}


def test_check_device_cert_finds_each_problem(broker_pki: Pki, other_pki: Pki) -> None:
    cert, key = broker_pki.issue()
    assert certs.check_device_cert(cert, key, broker_pki.ca, DEV, NOW) == []

    old, old_key = broker_pki.issue(not_after=datetime(2024, 3, 1, tzinfo=UTC))
    (p,) = certs.check_device_cert(old, old_key, broker_pki.ca, DEV, NOW)
    assert (p.severity, p.code) == ("fail", "cert_expired")
    assert "expired on 2024-03-01" in p.message and "renew" in p.hint

    soon, soon_key = broker_pki.issue(days=10)
    assert codes(certs.check_device_cert(soon, soon_key, broker_pki.ca, DEV, NOW)) == {
        "cert_expiring": "warn"
    }

    start = NOW + timedelta(days=2)
    future, future_key = broker_pki.issue(not_before=start, not_after=start + timedelta(days=365))
    (p,) = certs.check_device_cert(future, future_key, broker_pki.ca, DEV, NOW)
    assert (p.severity, p.code) == ("fail", "cert_not_yet_valid") and "clock" in p.hint

    assert codes(certs.check_device_cert(cert, old_key, broker_pki.ca, DEV, NOW)) == {"key_mismatch": "fail"}
    assert codes(certs.check_device_cert(cert, key, broker_pki.ca, "dev-other", NOW)) == {
        "cert_cn_mismatch": "warn"
    }
    foreign, foreign_key = other_pki.issue()
    (p,) = certs.check_device_cert(foreign, foreign_key, broker_pki.ca, DEV, NOW, ca_what="mqtt.ca")
    assert p.code == "cert_untrusted" and "another fleet's CA" in p.message and "mqtt.ca" in p.message

    server, server_key = broker_pki.issue("broker.example", server=True)
    assert codes(certs.check_device_cert(server, server_key, broker_pki.ca, "broker.example", NOW)) == {
        "cert_not_client": "warn"
    }
    assert codes(certs.check_device_cert(b"garbage", key, broker_pki.ca, DEV, NOW)) == {
        "cert_invalid": "fail"
    }
    locked = serialization.load_pem_private_key(key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    assert codes(certs.check_device_cert(cert, locked, broker_pki.ca, DEV, NOW)) == {"key_invalid": "fail"}
    assert codes(certs.check_device_cert(cert, key, b"no CA here", DEV, NOW)) == {"ca_invalid": "fail"}
    # a check left out by passing None is not run
    assert certs.check_device_cert(foreign, None, None, DEV, NOW) == []


def _ca_cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, issuer_key: Any
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def test_a_chain_through_an_intermediate_shipped_with_the_cert_is_trusted() -> None:
    # deploy/pki.py makes no intermediates (path length 0), so build root -> intermediate -> device
    root_key, mid_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("root", root_key, None, root_key)
    mid = _ca_cert("intermediate", mid_key, root, root_key)
    pem = serialization.Encoding.PEM
    mid_pem = mid.public_bytes(pem)
    mid_key_pem = mid_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    leaf, leaf_key = pki.issue_cert(mid_pem, mid_key_pem, DEV)
    root_pem = root.public_bytes(pem)
    assert certs.check_device_cert(leaf + mid_pem, leaf_key, root_pem, DEV, NOW) == []
    # without the intermediate no signature leads to the root
    assert codes(certs.check_device_cert(leaf, leaf_key, root_pem, DEV, NOW)) == {"cert_untrusted": "fail"}


def test_expired_ca_is_reported(broker_pki: Pki) -> None:
    ca, ca_key = pki.create_ca("old CA", days=1)
    cert, key = pki.issue_cert(ca, ca_key, DEV, days=1)
    later = NOW + timedelta(days=3)
    assert codes(certs.check_device_cert(cert, key, ca, DEV, later)) == {
        "cert_expired": "fail",
        "ca_expired": "fail",
    }


# --- doctor: whole runs ----------------------------------------------------------------------------


def test_healthy_setup_is_all_ok_and_exits_0(setup: Setup) -> None:
    r = cli("doctor", "--config", str(setup.write()), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(r.stdout)
    assert [x["verdict"] for x in results] == ["ok"] * len(results), results
    assert {x["check"] for x in results} == set(doctor.CHECKS)
    assert all(set(x) == {"check", "verdict", "message", "hint"} and x["hint"] is None for x in results)
    cert = next(x for x in results if x["check"] == "certificates")
    assert f"CN={DEV} valid until" in cert["message"] and "key matches" in cert["message"]
    channel = next(x for x in results if x["check"] == "channel")
    assert "client certificate accepted" in channel["message"]

    human = cli("doctor", "--config", str(setup.write()))
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert lines[0].startswith("ok    config         ")
    assert any(line.startswith("ok    certificates   device cert CN=dev-doc valid until") for line in lines)


def test_expired_device_cert_fails_with_its_date_and_says_renew(setup: Setup, broker_pki: Pki) -> None:
    setup.use(*broker_pki.issue(not_after=datetime(2024, 3, 1, 12, 0, tzinfo=UTC)))
    r = cli("doctor", "--config", str(setup.write()))
    assert r.returncode == 1, r.stdout
    lines = r.stdout.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith("fail  certificates")]
    assert "expired on 2024-03-01 12:00 UTC" in lines[i]
    assert lines[i + 1].strip().startswith("hint: renew the device certificate")
    # the broker says the same in the handshake
    assert any(
        line.startswith("fail  channel") and "rejected the client certificate" in line for line in lines
    ), r.stdout


def test_cert_from_another_ca_fails_both_offline_and_at_the_broker(setup: Setup, other_pki: Pki) -> None:
    setup.use(*other_pki.issue())
    results = setup.results()
    (cert,) = by_check(results, "certificates")
    assert cert.verdict == "fail" and "was not issued by mqtt.ca" in cert.message
    (channel,) = by_check(results, "channel")
    assert channel.verdict == "fail" and "rejected the client certificate" in channel.message
    assert "TLSV1_ALERT_UNKNOWN_CA" in channel.message
    assert doctor.exit_code(results) == 1


def test_key_that_does_not_match_the_cert(setup: Setup, broker_pki: Pki) -> None:
    cert, _ = broker_pki.issue()
    _, other_key = broker_pki.issue()
    setup.use(cert, other_key)
    results = setup.results()
    (c,) = by_check(results, "certificates")
    assert c.verdict == "fail" and "mqtt.key does not belong to device cert" in c.message
    (channel,) = by_check(results, "channel")
    assert channel.verdict == "fail" and "cannot present the client certificate" in channel.message


def test_broker_that_is_down_is_connection_refused(setup: Setup, tmp_path: Path) -> None:
    down = Mosquitto(tmp_path / "down-broker")
    down.start()
    down.stop()
    setup.cfg["mqtt"]["port"] = down.port
    r = cli("doctor", "--config", str(setup.write()), "--json")
    assert r.returncode == 1
    (channel,) = [x for x in json.loads(r.stdout) if x["check"] == "channel"]
    assert channel["verdict"] == "fail" and "connection refused" in channel["message"]
    assert "start the broker" in channel["hint"]


def test_broker_cert_not_trusted_by_mqtt_ca(setup: Setup, other_pki: Pki) -> None:
    setup.ca.write_bytes(other_pki.ca)
    (channel,) = by_check(setup.results(), "channel")
    assert channel.verdict == "fail" and "server's certificate is not trusted" in channel.message
    assert "mqtt.ca" in channel.hint


def test_dns_failure_is_named(setup: Setup) -> None:
    setup.cfg["mqtt"]["host"] = "broker.invalid"  # RFC 6761: never resolves
    (channel,) = by_check(setup.results(timeout=3.0), "channel")
    assert channel.verdict == "fail" and channel.message.startswith("DNS: ")


def test_a_port_that_never_answers_the_handshake_times_out(setup: Setup) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes TCP connects; nobody ever speaks TLS
        setup.cfg["mqtt"]["port"] = silent.getsockname()[1]
        (channel,) = by_check(setup.results(timeout=0.5), "channel")
    assert channel.verdict == "fail" and "did not finish within 0.5 s" in channel.message


def test_wrong_type_in_the_config_is_the_only_failure(setup: Setup) -> None:
    setup.cfg["mqtt"]["port"] = "x"
    r = cli("doctor", "--config", str(setup.write()), "--json")
    assert r.returncode == 1
    (only,) = json.loads(r.stdout)
    assert (only["check"], only["verdict"]) == ("config", "fail")
    assert only["message"].startswith("mqtt.port: expected an integer")
    assert "mqtt.port" in only["hint"] and "EDGE_AGENT_MQTT__PORT" in only["hint"]


def test_missing_certificate_file_names_the_field(setup: Setup) -> None:
    setup.cert.unlink()
    r = cli("doctor", "--config", str(setup.write()))
    assert r.returncode == 1
    assert r.stdout.startswith("fail  config         mqtt.cert: file ")
    assert "does not exist" in r.stdout.splitlines()[0]


def test_bad_usage_exits_2(setup: Setup) -> None:
    r = cli("doctor", "--config", str(setup.write()), "--timeout", "0")
    assert r.returncode == 2 and "must be > 0" in r.stderr


# --- doctor: single checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "verdict"),
    [(0, "fail"), (99, "fail"), (100, "warn"), (199, "warn"), (200, "ok"), (10**12, "ok")],
)
def test_disk_verdict_thresholds(free: int, verdict: str) -> None:
    assert doctor.disk_verdict(free, 100) == verdict


def test_disk_check_reports_a_missing_state_dir_and_free_space(setup: Setup) -> None:
    setup.state.rmdir()
    results = doctor.check_disk(setup.load())
    assert [r.verdict for r in results] == ["warn", "ok"]
    assert "does not exist" in results[0].message and "free on" in results[1].message
    setup.cfg["download"] = {"disk_margin": 1 << 60}  # more than any disk: the fail branch
    results = doctor.check_disk(setup.load())
    assert results[-1].verdict == "fail" and "insufficient_disk" in results[-1].message


def test_trust_key_that_is_not_ed25519(setup: Setup) -> None:
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    bad = setup.tmp / "ec.pub"
    bad.write_bytes(
        ec_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    setup.cfg["trust"]["keys"].append(str(bad))
    (r,) = doctor.check_trust_keys(setup.load())
    assert r.verdict == "fail" and r.message.startswith("trust.keys[1]") and "Ed25519" in r.message


def test_state_dbs_are_checked_read_only_and_damage_is_reported(setup: Setup) -> None:
    buf = Buffer(setup.state / "telemetry.db", budget_bytes=64 << 20)
    buf.start()
    buf.put(RecordClass.EVENT, {"event": "x"})
    buf.close()
    before = {p.name: p.read_bytes() for p in setup.state.iterdir()}
    results = doctor.check_state_dbs(setup.load())
    assert [(r.verdict, r.message.split(":")[0]) for r in results] == [
        ("ok", "agent.db does not exist yet (the agent creates it)"),
        ("ok", "telemetry.db"),
    ]
    assert {p.name: p.read_bytes() for p in setup.state.iterdir()} == before  # nothing written, nothing added

    (setup.state / "telemetry.db").write_bytes(b"this is not a database" * 200)
    (setup.state / "agent.db").write_bytes(b"")  # empty is a valid, empty database
    results = doctor.check_state_dbs(setup.load())
    assert [r.verdict for r in results] == ["ok", "fail"]
    assert "not a readable SQLite database" in results[1].message and "restart the agent" in results[1].hint


def test_onnxruntime_warns_when_a_preferred_accelerator_is_missing(setup: Setup) -> None:
    (ok,) = doctor.check_onnxruntime(setup.load())
    assert ok.verdict == "ok" and "would use CPUExecutionProvider" in ok.message
    setup.cfg["runtime"] = {}
    setup.cfg["runtime"]["execution_providers"] = [
        "NoSuchAcceleratorExecutionProvider",
        "CPUExecutionProvider",
    ]
    (warn,) = doctor.check_onnxruntime(setup.load())
    assert warn.verdict == "warn" and "NoSuchAcceleratorExecutionProvider first" in warn.message
    assert "CPUExecutionProvider first" in warn.hint
    # The default list means "any accelerator there is": CPU on this host is what it asked for.
    setup.cfg["runtime"].pop("execution_providers")
    (default,) = doctor.check_onnxruntime(setup.load())
    assert default.verdict == "ok", default


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_api_port_taken_by_another_process(setup: Setup, taken_port: int) -> None:
    setup.cfg["api"]["listen"] = f"127.0.0.1:{taken_port}"
    (r,) = by_check(setup.results(), "api-port")
    assert r.verdict == "fail" and "is taken by" in r.message and "api.listen" in r.hint
    setup.cfg["api"]["listen"] = f"127.0.0.1:{free_port('127.0.0.1')}"
    (r,) = by_check(setup.results(), "api-port")
    assert r.verdict == "ok" and "free to bind" in r.message


def test_iothub_probe_dials_the_hub_host_with_the_device_cert(setup: Setup, broker: Mosquitto) -> None:
    # No IoT Hub here: the module's mosquitto stands in for the hub (same TLS, same client cert check);
    # the port is the only thing the real hub fixes (8883).
    setup.cfg["transport"] = "iothub"
    setup.cfg["iothub"] = {"hostname": "localhost", "cert": "device.pem", "key": "device.key", "ca": "ca.pem"}
    cfg = setup.load()
    (r,) = doctor.check_channel(cfg, 5.0, iothub_port=broker.port)
    assert r.verdict == "ok" and r.message.startswith(f"iothub localhost:{broker.port}: ")
    assert "client certificate accepted" in r.message
    # the hub's server CA did not issue the device's certificate: no chain check against it
    (c,) = doctor.check_certificates(cfg, NOW)
    assert c.verdict == "ok" and "issued by" not in c.message


def test_a_check_that_breaks_does_not_hide_the_others(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_cfg: Any) -> list[doctor.Result]:
        raise sqlite3.ProgrammingError("boom")

    monkeypatch.setattr(doctor, "check_disk", broken)
    results = setup.results()
    (disk,) = by_check(results, "disk")
    assert disk.verdict == "fail" and "ProgrammingError: boom" in disk.message
    assert verdicts(results)["api-port"] == {"ok"}
