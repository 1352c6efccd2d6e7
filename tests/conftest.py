"""Shared fixtures: a real mosquitto broker, a local bundle server and MQTT test clients.

The broker and the bundle server are module-scoped because starting them costs a little and tests
in one module can share them: tests that need a pristine broker (crash and restart, say) make their
own :class:`~simulators.broker.Mosquitto` in ``tmp_path``. Every process or thread these fixtures
start is stopped at teardown, even when the test fails.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest_pg import fresh_database

from simulators.broker import ClientCert, Mosquitto
from simulators.bundle_server import BundleServer

#: Generous enough for a loaded CI machine; a passing test never waits this long.
TIMEOUT_S = 5.0


class MqttClient:
    """A paho 1.6 MQTT v5 client with blocking helpers, authenticated by a certificate CN = ``name``.

    An operator name connects to the broker's operator listener, any other to its device listener,
    as the real clients do; ``port=`` overrides that (a test of what a listener refuses), and
    ``cert=`` presents another certificate than the broker's own for ``name``.
    Received messages go to a queue so that tests can wait for one (:meth:`expect`) or check that
    none arrived (:meth:`drain`).
    """

    def __init__(
        self,
        broker: Mosquitto,
        name: str,
        *,
        client_id: str | None = None,
        port: int | None = None,
        cert: ClientCert | None = None,
    ) -> None:
        self.broker = broker
        self.name = name
        if port is None:
            port = broker.operator_port if name in broker.operators else broker.port
        self.port = port
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected = threading.Event()
        #: set when the broker closes the connection (paho then reconnects on its own)
        self.disconnected = threading.Event()
        self._connect_rc: int | None = None
        self._suback: dict[int, list[int]] = {}
        self._suback_cond = threading.Condition()
        self.client = mqtt.Client(client_id=client_id or name, protocol=mqtt.MQTTv5)
        self.client.tls_set_context((cert or broker.client_cert(name)).ssl_context())
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self._connect_rc = int(rc.value) if hasattr(rc, "value") else int(rc)
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, rc: Any, props: Any = None) -> None:
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, granted: Any, props: Any = None
    ) -> None:
        with self._suback_cond:
            self._suback[mid] = [int(code.value) if hasattr(code, "value") else int(code) for code in granted]
            self._suback_cond.notify_all()

    def connect(self) -> MqttClient:
        self.client.connect(self.broker.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(TIMEOUT_S):
            raise TimeoutError(f"{self.name}: no CONNACK within {TIMEOUT_S} s")
        if self._connect_rc != 0:
            raise ConnectionError(f"{self.name}: connection refused, reason code {self._connect_rc}")
        return self

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its reason codes (>= 0x80 means refused)."""
        with self._suback_cond:
            result, mid = self.client.subscribe(topic, qos)
            assert result == mqtt.MQTT_ERR_SUCCESS, result
            if not self._suback_cond.wait_for(lambda: mid in self._suback, TIMEOUT_S):
                raise TimeoutError(f"{self.name}: no SUBACK for {topic}")
            return self._suback.pop(mid)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS >= 1, wait until the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        if not info.is_published():
            raise TimeoutError(f"{self.name}: {topic} not acknowledged")

    def expect(self, topic: str, timeout: float = TIMEOUT_S) -> mqtt.MQTTMessage:
        """The next message on ``topic``; messages on other topics received meanwhile are dropped."""
        while True:
            try:
                message = self.messages.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.name}: nothing on {topic} within {timeout} s") from None
            if message.topic == topic:
                return message

    def drain(self) -> list[mqtt.MQTTMessage]:
        """Every message received so far and not yet consumed."""
        out: list[mqtt.MQTTMessage] = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


MqttClientFactory = Callable[..., MqttClient]


def tls_refused(
    broker: Mosquitto, port: int, certfile: Path | None = None, keyfile: Path | None = None
) -> bool:
    """Whether the broker's listener on ``port`` refuses a TLS client presenting ``certfile`` (or no
    certificate)."""
    context = ssl.create_default_context(cafile=str(broker.ca_path))
    if certfile is not None:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    client = mqtt.Client(client_id="intruder", protocol=mqtt.MQTTv5)
    client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p=None: connected.set() if rc == 0 else None
    # Drive the network loop in this thread: a refusal surfaces as an exception or an error code
    # (with TLS 1.3 the client finishes its handshake before the server checks the certificate,
    # so the refusal is an alert read after connect() returned).
    try:
        client.connect(broker.host, port)
        deadline = time.monotonic() + 3
        while not connected.is_set():
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                return True
            assert time.monotonic() < deadline, "neither accepted nor refused"
    except (ssl.SSLError, OSError):
        return True
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
    return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A TLS mosquitto broker with the project ACL (prefix "edge", operator CN "operator")."""
    instance = Mosquitto(tmp_path_factory.mktemp("broker"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BundleServer]:
    """An HTTP server for the files under its ``root`` (write them with ``put`` or directly)."""
    with BundleServer(tmp_path_factory.mktemp("bundles")) as server:
        yield server


@pytest.fixture
def mqtt_client(broker: Mosquitto) -> Iterator[MqttClientFactory]:
    """Factory: ``mqtt_client("dev-1")`` is a connected client whose certificate CN is ``dev-1``.

    Pass ``broker=`` to connect to another broker than the module's; ``client_id=`` to differ from
    the CN; ``port=`` for another listener than the one the name belongs on. Every client is
    disconnected at teardown.
    """
    clients: list[MqttClient] = []

    def make(
        name: str,
        *,
        broker: Mosquitto = broker,
        client_id: str | None = None,
        port: int | None = None,
        cert: ClientCert | None = None,
    ) -> MqttClient:
        client = MqttClient(broker, name, client_id=client_id, port=port, cert=cert)
        clients.append(client)
        return client.connect()

    yield make
    for client in clients:
        client.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """Where a registry lives, once per database: one test body run on both (a new SQLite file;
    a new PostgreSQL database, dropped after the test: tests/conftest_pg.py)."""
    if request.param == "sqlite":
        yield tmp_path / "registry.db"
        return
    with fresh_database() as url:
        yield url
