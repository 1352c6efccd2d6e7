"""The agent and its broker: losing the broker, reconnecting with jittered backoff, getting desired
state published while the device was offline, and being refused without a valid certificate."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from deploy import pki
from simulators.rig import Rig, wait_until


@pytest.fixture
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig(tmp_path_factory.mktemp("conn")) as r:
        yield r


def test_broker_outage_then_reconnect_and_deploy(rig: Rig) -> None:
    agent = rig.add_device("dev-c").start()
    rig.deploy("dev-c", rig.manifest("dev-c", rig.build_bundle("m", "1"), 1))
    rig.wait_active("dev-c", 1)

    rig.broker.kill()  # the broker crashes: no clean disconnect for anyone
    assert wait_until(lambda: '"mqtt.reconnect_wait"' in agent.log_text(), timeout=10)
    assert wait_until(lambda: agent.log_text().count('"mqtt.reconnect_wait"') >= 3, timeout=15)
    rig.broker.start()  # same port, same persistence
    assert wait_until(lambda: agent.log_text().count('"mqtt.connected"') >= 2, timeout=40), agent.log_text()[
        -2000:
    ]
    assert agent.running

    waits = [json.loads(x) for x in agent.log_text().splitlines() if '"mqtt.reconnect_wait"' in x]
    delays = [w["delay_s"] for w in waits]
    assert all(0 < d <= 2.0 for d in delays)  # reconnect_max in the rig's config
    assert len(set(delays)) > 1  # jittered, not a fixed period

    rig.op.wait_for("dev-c", lambda o: o.get("online") is True, kind="online", timeout=40)
    rig.deploy("dev-c", rig.manifest("dev-c", rig.build_bundle("m", "2"), 2))
    rig.wait_active("dev-c", 2)


def test_last_will_and_offline_deployment(rig: Rig) -> None:
    agent = rig.add_device("dev-o").start()
    rig.deploy("dev-o", rig.manifest("dev-o", rig.build_bundle("m", "1"), 1))
    rig.wait_active("dev-o", 1)
    agent.kill()  # no goodbye: the broker publishes the last will after the keepalive lapses
    # A manifest published while the device is away is retained and taken when it comes back.
    rig.deploy("dev-o", rig.manifest("dev-o", rig.build_bundle("m", "2"), 2))
    agent.start()
    status = rig.wait_active("dev-o", 2)
    assert status["active"]["version"] == "2" and agent.current_image() == status["active"]["sha256"]


def test_a_device_whose_certificate_the_broker_refuses_keeps_retrying(
    rig: Rig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A certificate from another CA: the TLS handshake fails; the agent logs it and backs off."""
    other_ca, other_key = pki.create_ca("not-the-fleet-ca")
    cert, key = pki.issue_cert(other_ca, other_key, "dev-x")
    d = tmp_path_factory.mktemp("badcert")
    pki.write_pem(d / "dev.pem", cert, private=False)
    pki.write_pem(d / "dev.key", key, private=True)
    agent = rig.add_device("dev-x", {"mqtt": {"cert": str(d / "dev.pem"), "key": str(d / "dev.key")}}).start()
    assert wait_until(lambda: agent.log_text().count('"mqtt.connect_failed"') >= 2, timeout=15), (
        agent.log_text()
    )
    assert agent.running
    assert '"mqtt.connected"' not in agent.log_text()
