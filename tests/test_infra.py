"""The test infrastructure itself: the PKI, the real mosquitto broker and its ACL, the bundle server.

Everything else (agent, simulators, demo) builds on these; if the ACL or a fault injection does not
do what it claims, tests built on them would pass for the wrong reasons.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import paho.mqtt.client as mqtt
import pytest
from conftest import tls_refused
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy import pki
from simulators.broker import BrokerError, Mosquitto
from simulators.bundle_server import BundleServer, Fault, RangeNotSatisfiable, parse_range

if TYPE_CHECKING:
    from conftest import MqttClientFactory

# -- PKI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.create_ca("test CA")


def test_ca_is_a_ca(ca: tuple[bytes, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(ca[0])
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert pki.cert_common_name(ca[0]) == "test CA"
    assert pki.cert_expiry(ca[0]) > datetime.now(UTC) + timedelta(days=3600)
    cert.verify_directly_issued_by(cert)


def test_server_cert_sans_and_usage(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = pki.issue_cert(*ca, "broker", server=True, sans=["localhost", "10.0.0.7", "::1"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca[0]))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert b"PRIVATE KEY" in key_pem


def test_client_cert(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.issue_cert(*ca, "dev-1")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert pki.cert_common_name(cert_pem) == "dev-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expiry = pki.cert_expiry(cert_pem)
    assert timedelta(days=824) < expiry - datetime.now(UTC) <= timedelta(days=825)


def test_expired_cert_and_refusals(ca: tuple[bytes, bytes]) -> None:
    past = datetime.now(UTC) - timedelta(days=1)
    cert_pem, _ = pki.issue_cert(*ca, "dev-old", not_after=past)
    assert pki.cert_expiry(cert_pem) == past.replace(microsecond=0)
    with pytest.raises(ValueError, match="MQTT username"):
        pki.issue_cert(*ca, "dev/1")
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.issue_cert(*ca, "dev-1", not_after=datetime.now())
    other_ca = pki.create_ca("other")
    with pytest.raises(ValueError, match="does not belong"):
        pki.issue_cert(ca[0], other_ca[1], "dev-1")
    leaf = pki.issue_cert(*ca, "dev-1")
    with pytest.raises(ValueError, match="not a CA"):
        pki.issue_cert(*leaf, "dev-2")


def test_write_pem_modes(tmp_path: Path) -> None:
    key = tmp_path / "sub" / "k.pem"
    pki.write_pem(key, b"secret", private=True)
    pki.write_pem(tmp_path / "c.pem", b"public", private=False)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c.pem").stat().st_mode) == 0o644
    pki.write_pem(key, b"replaced", private=True)
    assert key.read_bytes() == b"replaced"
    assert sorted(p.name for p in key.parent.iterdir()) == ["k.pem"]  # no temporary file left over


# -- broker --------------------------------------------------------------------------------------


def test_device_reads_own_desired_and_writes_own_status(
    broker: Mosquitto, mqtt_client: MqttClientFactory
) -> None:
    assert broker.url == f"mqtts://127.0.0.1:{broker.port}"
    assert broker.operator_url == f"mqtts://127.0.0.1:{broker.operator_port}" != broker.url
    operator = mqtt_client("operator")
    operator.subscribe("edge/devices/+/status")
    device = mqtt_client("dev-1")
    assert device.subscribe("edge/devices/dev-1/desired") == [1]

    # ACL: a device cannot write another device's reports, nor its own desired state. The allowed
    # publish goes last: once it has arrived, the refused ones would have arrived before it.
    device.publish("edge/devices/dev-2/status", b"forged")
    device.publish("edge/devices/dev-1/desired", b"self-granted")
    device.publish("edge/devices/dev-1/status", b"ok")
    assert operator.expect("edge/devices/dev-1/status").payload == b"ok"
    assert [m.topic for m in operator.drain()] == []

    operator.publish("edge/devices/dev-1/desired", b"manifest-1", retain=True)
    message = device.expect("edge/devices/dev-1/desired")
    assert message.payload == b"manifest-1"  # not b"self-granted"
    operator.publish("edge/devices/dev-1/desired", b"", retain=True)  # clear the retained message


def test_device_cannot_read_another_devices_desired(
    broker: Mosquitto, mqtt_client: MqttClientFactory
) -> None:
    operator = mqtt_client("operator")
    operator.publish("edge/devices/dev-2/desired", b"for dev-2 only", retain=True)
    operator.publish("edge/devices/dev-1/desired", b"marker", retain=True)
    device = mqtt_client("dev-1")
    device.subscribe("edge/devices/dev-2/desired")
    device.subscribe("edge/devices/+/desired")
    device.subscribe("edge/devices/dev-1/desired")
    assert device.expect("edge/devices/dev-1/desired").payload == b"marker"
    time.sleep(0.5)
    assert [(m.topic, m.payload) for m in device.drain() if m.topic != "edge/devices/dev-1/desired"] == []
    for topic in ("edge/devices/dev-2/desired", "edge/devices/dev-1/desired"):
        operator.publish(topic, b"", retain=True)


def test_clients_without_a_valid_certificate_are_refused(broker: Mosquitto, tmp_path: Path) -> None:
    valid = broker.client_cert("dev-1")
    assert not tls_refused(broker, broker.port, valid.cert_path, valid.key_path)  # the probe itself can tell
    assert tls_refused(broker, broker.port)
    assert tls_refused(broker, broker.operator_port)

    ca_cert, ca_key = broker.ca_path.read_bytes(), broker.ca_key_path.read_bytes()
    expired, expired_key = pki.issue_cert(
        ca_cert, ca_key, "dev-1", not_after=datetime.now(UTC) - timedelta(hours=1)
    )
    pki.write_pem(tmp_path / "expired.crt", expired, private=False)
    pki.write_pem(tmp_path / "expired.key", expired_key, private=True)
    assert tls_refused(broker, broker.port, tmp_path / "expired.crt", tmp_path / "expired.key")

    rogue_ca = pki.create_ca("rogue")
    rogue, rogue_key = pki.issue_cert(*rogue_ca, "operator")
    pki.write_pem(tmp_path / "rogue.crt", rogue, private=False)
    pki.write_pem(tmp_path / "rogue.key", rogue_key, private=True)
    assert tls_refused(broker, broker.port, tmp_path / "rogue.crt", tmp_path / "rogue.key")
    assert tls_refused(broker, broker.operator_port, tmp_path / "rogue.crt", tmp_path / "rogue.key")


def test_kill_and_restart_keep_port_certificates_and_retained_messages(
    tmp_path: Path, mqtt_client: MqttClientFactory
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        ports, ca = (broker.port, broker.operator_port), broker.ca_path.read_bytes()
        operator = mqtt_client("operator", broker=broker)
        db = broker.persistence_path
        before = db.stat().st_mtime_ns if db.exists() else None
        operator.publish("edge/devices/dev-9/desired", b"manifest-9", retain=True)
        # autosave_changes=1: the broker saves after the retained message; wait for that save.
        deadline = time.monotonic() + 5
        while (db.stat().st_mtime_ns if db.exists() else None) == before:
            assert time.monotonic() < deadline, "the broker never saved its database"
            time.sleep(0.01)
        operator.close()

        broker.kill()
        assert not broker.running
        broker.restart()
        assert broker.running
        assert (broker.port, broker.operator_port) == ports
        assert broker.ca_path.read_bytes() == ca

        device = mqtt_client("dev-9", broker=broker)
        device.subscribe("edge/devices/dev-9/desired")
        message = device.expect("edge/devices/dev-9/desired")
        assert message.payload == b"manifest-9" and message.retain
        device.close()  # before the broker goes: a client left behind would wait to reconnect
    assert not broker.running


def test_start_fails_loudly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        broker = Mosquitto(tmp_path / "broker", port=squatter.getsockname()[1])
        with pytest.raises(BrokerError, match="exited"):
            broker.start()
        assert not broker.running


def test_plain_broker_without_tls(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "plain", tls=False) as broker:
        assert broker.url.startswith("mqtt://")
        assert broker.operator_port == broker.port  # one listener for everyone
        client = mqtt.Client(client_id="anyone", protocol=mqtt.MQTTv5)
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p=None: connected.set() if rc == 0 else None
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            assert connected.wait(5)
        finally:
            client.disconnect()
            client.loop_stop()


# -- bundle server ------------------------------------------------------------------------------

DATA = os.urandom(100_000)


@pytest.fixture(scope="module")
def bundle_url(bundle_server: BundleServer) -> str:
    return bundle_server.put("bundles/model-1.tar", DATA)


@pytest.fixture(autouse=True)
def _no_faults(request: pytest.FixtureRequest) -> None:
    if "bundle_server" in request.fixturenames:
        request.getfixturevalue("bundle_server").clear_faults()


def test_full_and_head(bundle_server: BundleServer, bundle_url: str) -> None:
    response = httpx.get(bundle_url)
    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["accept-ranges"] == "bytes"
    head = httpx.head(bundle_url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA)) and not head.content
    assert httpx.get(bundle_server.url_for("missing.tar")).status_code == 404
    assert httpx.get(f"{bundle_server.url}/../etc/passwd").status_code == 404


def test_ranges(bundle_server: BundleServer, bundle_url: str) -> None:
    tail = httpx.get(bundle_url, headers={"Range": "bytes=99000-"})
    assert tail.status_code == 206
    assert tail.headers["content-range"] == f"bytes 99000-{len(DATA) - 1}/{len(DATA)}"
    assert tail.content == DATA[99000:]
    middle = httpx.get(bundle_url, headers={"Range": "bytes=10-19"})
    assert middle.status_code == 206 and middle.content == DATA[10:20]
    bad = httpx.get(bundle_url, headers={"Range": f"bytes={len(DATA)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(DATA)}"
    records = [r for r in bundle_server.requests if r.name == "bundles/model-1.tar" and r.range]
    assert [(r.range, r.status, r.bytes_sent) for r in records[-3:]] == [
        ("bytes=99000-", 206, 1000),
        ("bytes=10-19", 206, 10),
        (f"bytes={len(DATA)}-", 416, 0),
    ]


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-", 10) == (2, 10)
    assert parse_range("bytes=2-100", 10) == (2, 10)
    assert parse_range("bytes=-3", 10) == (7, 10)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: serve everything
    assert parse_range("bytes=5-2", 10) is None  # invalid: ignored
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=10-", 10)


def test_cut_then_resume(bundle_server: BundleServer, bundle_url: str) -> None:
    bundle_server.set_fault("bundles/model-1.tar", Fault(cut_after=30_000))
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", bundle_url) as response:
        assert response.headers["content-length"] == str(len(DATA))
        for chunk in response.iter_raw():
            received += chunk
    assert bytes(received) == DATA[: len(received)] and len(received) == 30_000

    resumed = httpx.get(bundle_url, headers={"Range": f"bytes={len(received)}-"})
    assert resumed.status_code == 206
    assert bytes(received) + resumed.content == DATA
    last_two = bundle_server.requests[-2:]
    assert [(r.range, r.bytes_sent) for r in last_two] == [(None, 30_000), ("bytes=30000-", 70_000)]


def test_corrupt_and_extra_bytes(bundle_server: BundleServer, bundle_url: str) -> None:
    bundle_server.set_fault("bundles/model-1.tar", Fault(corrupt=True))
    corrupted = httpx.get(bundle_url).content
    assert len(corrupted) == len(DATA) and corrupted != DATA
    assert hashlib.sha256(corrupted).digest() != hashlib.sha256(DATA).digest()

    bundle_server.set_fault("bundles/model-1.tar", Fault(extra_bytes=1234))
    longer = httpx.get(bundle_url)
    assert longer.headers["content-length"] == str(len(DATA) + 1234)
    assert longer.content[: len(DATA)] == DATA and len(longer.content) == len(DATA) + 1234


def test_status_then_success(bundle_server: BundleServer, bundle_url: str) -> None:
    name = "bundles/model-1.tar"
    bundle_server.set_fault(name, Fault(status=500, status_times=2))
    before = bundle_server.counts(name)
    assert [httpx.get(bundle_url).status_code for _ in range(3)] == [500, 500, 200]
    assert bundle_server.counts(name) == before + 3
    bundle_server.set_fault(name, Fault(status=403, status_times=1))
    assert httpx.get(bundle_url).status_code == 403


def test_ignore_range(bundle_server: BundleServer, bundle_url: str) -> None:
    bundle_server.set_fault("bundles/model-1.tar", Fault(ignore_range=True))
    response = httpx.get(bundle_url, headers={"Range": "bytes=50000-"})
    assert response.status_code == 200 and response.content == DATA
    assert "content-range" not in response.headers


def test_throttle(bundle_server: BundleServer) -> None:
    url = bundle_server.put("slow.bin", b"x" * 20_000)
    bundle_server.set_fault("slow.bin", Fault(rate_bytes_per_s=100_000))
    began = time.monotonic()
    assert httpx.get(url).content == b"x" * 20_000
    assert time.monotonic() - began >= 0.15


def test_https(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    cert, key = pki.issue_cert(*ca, "localhost", server=True, sans=["127.0.0.1"])
    pki.write_pem(tmp_path / "ca.crt", ca[0], private=False)
    pki.write_pem(tmp_path / "s.crt", cert, private=False)
    pki.write_pem(tmp_path / "s.key", key, private=True)
    with BundleServer(tmp_path / "root", tls=(tmp_path / "s.crt", tmp_path / "s.key")) as server:
        url = server.put("a.bin", b"over tls")
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        assert httpx.get(url, verify=context).content == b"over tls"
