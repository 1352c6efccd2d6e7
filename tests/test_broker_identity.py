"""Identities on the real broker: a certificate can take no session but its own CN's, and each of the
two listeners (devices, operators) lets only its own kind of certificate do anything.

The attack these tests pin down: with the client id left to the client, device A's certificate
connecting with client id ``dev-b`` logs dev-b off and takes over its persistent session. The ACL
keeps A out of dev-b's topics, but any device could keep any other off the broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import TIMEOUT_S, tls_refused

from deploy import pki
from simulators.broker import ClientCert, Mosquitto

if TYPE_CHECKING:
    from conftest import MqttClientFactory

#: How long a message that the broker should not deliver is given to arrive anyway.
QUIET_S = 0.5


def _cert(broker: Mosquitto, tmp_path: Path, name: str, *, operator_ca: bool) -> ClientCert:
    """A certificate with CN ``name`` from the CA of the other kind than ``client_cert`` would use."""
    ca, ca_key = (
        (broker.operator_ca_path, broker.operator_ca_key_path)
        if operator_ca
        else (broker.ca_path, broker.ca_key_path)
    )
    cert, key = pki.issue_cert(ca.read_bytes(), ca_key.read_bytes(), name)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    pki.write_pem(cert_path, cert, private=False)
    pki.write_pem(key_path, key, private=True)
    return ClientCert(broker.ca_path, cert_path, key_path)


class _NoClientIdRewrite(Mosquitto):
    """The broker as it was before the fix: the device listener keeps the client's own id."""

    def config_text(self) -> str:
        text = super().config_text()
        assert "use_username_as_clientid true\n" in text
        return text.replace("use_username_as_clientid true\n", "")


@pytest.fixture
def unfixed_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with _NoClientIdRewrite(tmp_path / "unfixed") as broker:
        yield broker


def test_without_the_fix_another_certificate_logs_a_device_off(
    unfixed_broker: Mosquitto, mqtt_client: MqttClientFactory
) -> None:
    """The control for the test below: its assertions do catch the attack when it works."""
    victim = mqtt_client("dev-b", broker=unfixed_broker)
    attacker = mqtt_client("dev-a", broker=unfixed_broker, client_id="dev-b")
    assert victim.disconnected.wait(TIMEOUT_S)
    attacker.close()


def test_a_device_certificate_cannot_take_another_devices_session(
    broker: Mosquitto, mqtt_client: MqttClientFactory
) -> None:
    operator = mqtt_client("operator")
    operator.publish("edge/devices/dev-b/desired", b"for dev-b, 1", retain=True)
    operator.publish("edge/devices/dev-a/desired", b"for dev-a", retain=True)
    victim = mqtt_client("dev-b")
    victim.subscribe("edge/devices/dev-b/desired")
    assert victim.expect("edge/devices/dev-b/desired").payload == b"for dev-b, 1"

    # dev-a's certificate asks for dev-b's client id: without the rewrite, that logs dev-b off.
    attacker = mqtt_client("dev-a", client_id="dev-b")
    attacker.subscribe("edge/devices/dev-b/desired")
    attacker.subscribe("edge/devices/dev-a/desired")
    operator.publish("edge/devices/dev-b/desired", b"for dev-b, 2", retain=True)

    assert victim.expect("edge/devices/dev-b/desired").payload == b"for dev-b, 2"
    time.sleep(QUIET_S)
    assert not victim.disconnected.is_set()
    # The broker knows the attacker as dev-a, by its certificate: dev-a's desired state is its lot.
    assert [(m.topic, m.payload) for m in attacker.drain()] == [("edge/devices/dev-a/desired", b"for dev-a")]
    for topic in ("edge/devices/dev-b/desired", "edge/devices/dev-a/desired"):
        operator.publish(topic, b"", retain=True)


def test_the_client_id_is_the_certificates_cn_whatever_the_client_sends(
    mqtt_client: MqttClientFactory,
) -> None:
    """The other side of the rewrite: a second connection with dev-e's certificate takes dev-e's
    session even under another client id, as a device that reboots takes over its stale one."""
    first = mqtt_client("dev-e")
    second = mqtt_client("dev-e", client_id="not-dev-e")
    assert first.disconnected.wait(TIMEOUT_S)
    second.close()


def test_operators_share_one_certificate_without_logging_each_other_off(
    broker: Mosquitto, mqtt_client: MqttClientFactory
) -> None:
    first = mqtt_client("operator", client_id="operator-1")
    second = mqtt_client("operator", client_id="operator-2")
    assert first.port == second.port == broker.operator_port
    for op in (first, second):
        op.subscribe("edge/devices/+/status")
    device = mqtt_client("dev-f")
    device.publish("edge/devices/dev-f/status", b"up")
    for op in (first, second):
        assert op.expect("edge/devices/dev-f/status").payload == b"up"
    assert not first.disconnected.is_set() and not second.disconnected.is_set()


def test_messages_cross_between_the_two_listeners(broker: Mosquitto, mqtt_client: MqttClientFactory) -> None:
    operator = mqtt_client("operator")
    operator.subscribe("edge/devices/+/status")
    operator.publish("edge/devices/dev-g/desired", b"retained before", retain=True)
    device = mqtt_client("dev-g")
    assert (operator.port, device.port) == (broker.operator_port, broker.port)
    assert device.port != operator.port
    device.subscribe("edge/devices/dev-g/desired")
    assert device.expect("edge/devices/dev-g/desired").payload == b"retained before"
    operator.publish("edge/devices/dev-g/desired", b"live", retain=True)
    assert device.expect("edge/devices/dev-g/desired").payload == b"live"
    device.publish("edge/devices/dev-g/status", b"ok")
    assert operator.expect("edge/devices/dev-g/status").payload == b"ok"
    operator.publish("edge/devices/dev-g/desired", b"", retain=True)


def test_an_operator_certificate_can_do_nothing_on_the_device_listener(
    broker: Mosquitto, mqtt_client: MqttClientFactory, tmp_path: Path
) -> None:
    cert = broker.client_cert("operator")
    assert not tls_refused(broker, broker.operator_port, cert.cert_path, cert.key_path)  # the probe can tell
    assert tls_refused(broker, broker.port, cert.cert_path, cert.key_path)

    # Even a certificate named "operator" from the devices' CA, which this listener does accept, gets
    # no operator rights there: the device listener's ACL has no user lines.
    impostor = mqtt_client(
        "operator", cert=_cert(broker, tmp_path, "operator", operator_ca=False), port=broker.port
    )
    impostor.subscribe("edge/devices/+/status")
    device = mqtt_client("dev-c")
    device.subscribe("edge/devices/dev-c/desired")
    impostor.publish("edge/devices/dev-c/desired", b"forged", retain=True)
    device.publish("edge/devices/dev-c/status", b"private")
    operator = mqtt_client("operator")
    operator.publish("edge/devices/dev-c/desired", b"genuine", retain=True)
    assert device.expect("edge/devices/dev-c/desired").payload == b"genuine"  # not b"forged"
    time.sleep(QUIET_S)
    assert [(m.topic, m.payload) for m in impostor.drain()] == []
    operator.publish("edge/devices/dev-c/desired", b"", retain=True)


def test_a_device_certificate_can_do_nothing_on_the_operator_listener(
    broker: Mosquitto, mqtt_client: MqttClientFactory, tmp_path: Path
) -> None:
    cert = broker.client_cert("dev-d")
    assert not tls_refused(broker, broker.port, cert.cert_path, cert.key_path)  # the probe can tell
    assert tls_refused(broker, broker.operator_port, cert.cert_path, cert.key_path)

    # Even a device-named certificate from the operator CA gets no device rights there: the operator
    # listener's ACL has no patterns.
    operator = mqtt_client("operator")
    operator.subscribe("edge/devices/+/status")
    operator.publish("edge/devices/dev-d/desired", b"for dev-d", retain=True)
    odd = mqtt_client(
        "dev-d", cert=_cert(broker, tmp_path, "dev-d", operator_ca=True), port=broker.operator_port
    )
    odd.subscribe("edge/devices/dev-d/desired")
    odd.publish("edge/devices/dev-d/status", b"forged")
    device = mqtt_client("dev-d")
    device.publish("edge/devices/dev-d/status", b"genuine")
    assert operator.expect("edge/devices/dev-d/status").payload == b"genuine"  # not b"forged"
    time.sleep(QUIET_S)
    assert [(m.topic, m.payload) for m in odd.drain()] == []
    operator.publish("edge/devices/dev-d/desired", b"", retain=True)
