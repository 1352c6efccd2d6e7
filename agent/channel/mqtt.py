"""Control channel over a plain MQTT 5 broker with mutual TLS (paho-mqtt 1.6 API).

- Persistent session: ``clean_start=False`` and a SessionExpiryInterval, so the broker keeps the
  subscription and queued QoS 1 messages while the device is offline.
- A retained last will on ``online`` says ``{"online": false}`` when the connection is lost; a clean
  shutdown publishes the same itself and disconnects normally.
- One network thread of our own instead of ``loop_start``: it reconnects with exponential backoff and
  full jitter, so a fleet that lost its broker does not reconnect in lockstep.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.channel.base import ConnectHandler, DesiredHandler
from agent.config import MqttConfig
from edge_core.clock import now_iso
from edge_core.log import get_logger
from edge_core.retry import backoff_delays
from edge_core.topics import Topics

log = get_logger("mqtt")


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class MqttChannel:
    def __init__(self, device_id: str, cfg: MqttConfig) -> None:
        self.device_id = device_id
        self.cfg = cfg
        self.topics = Topics(cfg.prefix, device_id)
        self._client = mqtt.Client(client_id=device_id, protocol=mqtt.MQTTv5)
        if cfg.ca and cfg.cert and cfg.key:
            self._client.tls_set(
                ca_certs=str(cfg.ca),
                certfile=str(cfg.cert),
                keyfile=str(cfg.key),
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._client.will_set(
            self.topics.online, self._online_doc(False, "connection lost"), qos=1, retain=True
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mqtt", daemon=True)
        # paho writes a publish inline, from the publishing thread, unless it knows a network thread
        # (``loop_start`` tells it so). Reading and writing one TLS socket from two threads corrupts
        # the stream and the broker drops the connection, so tell paho about ours.
        self._client._thread = self.thread  # type: ignore[attr-defined]
        self._delay = backoff_delays(cfg.reconnect_min, cfg.reconnect_max)
        self._connected_once = False
        self._on_desired: DesiredHandler = lambda _raw: None
        self._on_connected: ConnectHandler = lambda: None
        self._last_error: str | None = None

    def _online_doc(self, online: bool, reason: str) -> bytes:
        return _json({"device_id": self.device_id, "online": online, "reason": reason, "at": now_iso()})

    # --- ControlChannel ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "mqtt",
            "endpoint": f"{self.cfg.host}:{self.cfg.port}",
            "connected": self.connected,
            "last_error": self._last_error,
        }

    def start(self, on_desired: DesiredHandler, on_connect: ConnectHandler) -> None:
        self._on_desired = on_desired
        self._on_connected = on_connect
        self.thread.start()

    def report_status(self, doc: dict[str, Any]) -> None:
        self._publish(self.topics.status, _json(doc), retain=True)

    def report_inventory(self, doc: dict[str, Any]) -> None:
        self._publish(self.topics.inventory, _json(doc), retain=True)

    def report_heartbeat(self, doc: dict[str, Any]) -> None:
        if self._connected.is_set():  # a stale heartbeat is worth nothing: never queue one while offline
            self._client.publish(self.topics.heartbeat, _json(doc), qos=0, retain=False)

    def stop(self) -> None:
        if self._connected.is_set():
            info = self._client.publish(
                self.topics.online, self._online_doc(False, "shutdown"), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5.0)
        # The network thread is gone: paho may write from this one now. A clean DISCONNECT means
        # the broker does not publish the last will.
        self._client._thread = None  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, ValueError):
            self._client.disconnect()

    # --- internals ---------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        # QoS 1: while offline paho keeps the message and sends it after reconnecting.
        self._client.publish(topic, payload, qos=1, retain=retain)

    def connect_once(self) -> None:
        """One connection attempt (blocking: TCP and TLS handshake); raises OSError, ssl.SSLError or
        ValueError. The first one sets the persistent session up; later ones resume it."""
        if self._connected_once:
            self._client.reconnect()
            return
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        self._client.connect(
            self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, clean_start=False, properties=props
        )
        self._connected_once = True

    def _loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self.connect_once()
                rc = mqtt.MQTT_ERR_SUCCESS
                while rc == mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                    rc = self._client.loop(timeout=0.5)
                    if self._connected.is_set():
                        attempt = 0
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._last_error = str(exc)
                log.warning("mqtt.connect_failed", host=self.cfg.host, port=self.cfg.port, error=str(exc))
            if self._stop.is_set():
                break
            self._connected.clear()
            delay = self._delay(attempt)
            attempt += 1
            log.info("mqtt.reconnect_wait", delay_s=round(delay, 2), attempt=attempt)
            self._stop.wait(delay)
        with contextlib.suppress(OSError, ValueError):
            self._client.loop(timeout=0.1)  # flush what is still queued (the last status)

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: dict[str, Any], rc: Any, _p: Any = None
    ) -> None:
        if rc != 0:
            self._last_error = f"broker refused the connection: {rc}"
            log.error("mqtt.refused", reason=str(rc))
            return
        self._last_error = None
        log.info(
            "mqtt.connected",
            host=self.cfg.host,
            port=self.cfg.port,
            session_present=flags.get("session present"),
        )
        self._connected.set()
        client.subscribe(self.topics.desired, qos=1)
        client.publish(self.topics.online, self._online_doc(True, "connected"), qos=1, retain=True)
        try:
            self._on_connected()
        except Exception:
            log.error("mqtt.on_connect_handler_failed", exc_info=True)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, rc: Any, _p: Any = None) -> None:
        self._connected.clear()
        log.warning("mqtt.disconnected", reason=str(rc))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.topics.desired:
            return
        # An empty message (a cleared retained manifest) goes on too: the deployer refuses it with a
        # status (manifest_malformed) instead of the device saying nothing.
        try:
            self._on_desired(bytes(msg.payload))
        except Exception:  # an exception here would stop paho's loop: log it and keep the connection
            log.error("mqtt.desired_handler_failed", exc_info=True)
