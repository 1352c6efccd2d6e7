"""The operator's MQTT connection: publishes desired state, watches every device's reports.

Desired state is published retained (QoS 1), so a device that is offline gets its manifest the
moment it connects. Reports (status, online, inventory) are read from the devices' retained topics:
the control plane's view of the fleet is rebuilt from them alone.

The network loop is our own thread, as in the agent: paho 1.6's ``loop_start`` thread dies on an
``ssl.SSLEOFError`` when the broker goes away in the middle of a write, and never reconnects (a
broker restart in the middle of a rollout showed it). Ours catches it and reconnects.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCodes

from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.log import get_logger
from edge_core.retry import backoff_delays
from edge_core.topics import DEFAULT_PREFIX, Topics

log = get_logger("operator")


class _Client(mqtt.Client):
    """paho 1.6 parses the MQTT 5 reason code of a PUBACK and then drops it, so a publication the
    broker refused (135 "Not authorized" from mosquitto's ACL) looks acknowledged. Keep it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: mid -> the reason code of a PUBACK that reported a failure (>= 0x80)
        self.refused: dict[int, int] = {}

    def _handle_pubackcomp(self, cmd: str) -> int:
        packet: bytes = self._in_packet["packet"]  # type: ignore[attr-defined]
        if cmd == "PUBACK" and len(packet) > 2 and packet[2] >= 0x80:
            (mid,) = struct.unpack("!H", packet[:2])
            self.refused[mid] = packet[2]
        rc: int = super()._handle_pubackcomp(cmd)  # type: ignore[misc]
        return rc


StatusPredicate = Callable[[dict[str, Any]], bool]


class OperatorClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        prefix: str = DEFAULT_PREFIX,
        client_id: str | None = None,
        heartbeat_group: str | None = None,
    ) -> None:
        self.prefix = prefix
        #: an MQTT 5 shared subscription group for heartbeats (docs/scaling.md): each heartbeat goes
        #: to one member of the group, so replicas of `edge-deploy serve` store it once, not once each
        self.heartbeat_group = heartbeat_group
        self._client = _Client(
            client_id=client_id or f"operator-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        if ca and cert and key:
            self._client.tls_set(
                ca_certs=str(ca), certfile=str(cert), keyfile=str(key), tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        self._cond = threading.Condition()
        self._reports: dict[tuple[str, str], dict[str, Any]] = {}
        #: every report since the last drain(), as (device, kind, received at, document)
        self._log: list[tuple[str, str, float, dict[str, Any]]] = []
        self._last_message = time.monotonic()
        self.keep_log = False
        self._connected = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        #: message ids the broker acknowledged (PUBACK) and publish_manifest has not collected yet
        self._acked: set[int] = set()
        self._host, self._port = host, port
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delay = backoff_delays(0.5, 5.0)

    def __enter__(self) -> OperatorClient:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._thread = threading.Thread(target=self._loop, name="operator-mqtt", daemon=True)
        # Without this paho writes each publish from the caller's thread while ours reads the same
        # TLS socket, which corrupts the stream (agent/channel/mqtt.py says more).
        self._client._thread = self._thread  # type: ignore[attr-defined]
        self._thread.start()
        if not self._connected.wait(timeout):
            self.close()
            raise TimeoutError(f"operator could not connect to {self._host}:{self._port} within {timeout}s")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._client._thread = None  # type: ignore[attr-defined]  # ours is gone: write inline
        with contextlib.suppress(OSError, ValueError):
            self._client.disconnect()

    def _loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                if attempt:
                    self._client.reconnect()
                rc = mqtt.MQTT_ERR_SUCCESS
                while rc == mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                    rc = self._client.loop(timeout=0.5)
                    if self._connected.is_set():
                        attempt = 1
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("operator.connection_lost", host=self._host, port=self._port, error=str(exc))
            if self._stop.is_set():
                break
            self._connected.clear()
            self._stop.wait(self._delay(attempt))
            attempt += 1

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc == 0:
            client.subscribe(f"{self.prefix}/devices/+/status", qos=1)
            client.subscribe(f"{self.prefix}/devices/+/online", qos=1)
            client.subscribe(f"{self.prefix}/devices/+/inventory", qos=1)
            # Heartbeats only may be shared: they are live, not retained. The retained reports above
            # stay a subscription of each replica's own, as a broker does not deliver retained
            # messages on a shared subscription (MQTT 5, 4.8.2), and every replica's driver needs
            # every device's status.
            beats = f"{self.prefix}/devices/+/heartbeat"
            if self.heartbeat_group:
                beats = f"$share/{self.heartbeat_group}/{beats}"
            client.subscribe(beats, qos=0)
            with self._cond:
                self._last_message = time.monotonic()  # the retained reports are on their way
            self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _rc: Any, _p: Any = None) -> None:
        self._connected.clear()  # our loop thread reconnects

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 4:
            return
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            return
        with self._cond:
            self._reports[(parts[2], parts[3])] = doc
            if msg.retain:  # heartbeats never stop; settle() waits for the retained documents only
                self._last_message = time.monotonic()
            if self.keep_log:
                self._log.append((parts[2], parts[3], time.time(), doc))
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def drain(self) -> list[tuple[str, str, float, dict[str, Any]]]:
        """The reports received since the last call (only while ``keep_log`` is set)."""
        with self._cond:
            out, self._log = self._log, []
        return out

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 5.0) -> None:
        """Wait until the retained reports have arrived: none for ``quiet_s``, at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while time.monotonic() < deadline:
                idle = time.monotonic() - self._last_message
                if idle >= quiet_s:
                    return
                self._cond.wait(quiet_s - idle)

    def devices(self) -> list[str]:
        with self._cond:
            return sorted({d for d, _ in self._reports})

    def publish_manifest(self, device_id: str, envelope: bytes, timeout: float = 30.0) -> None:
        self.publish_manifests([(device_id, envelope)], timeout)

    def publish_manifests(self, items: list[tuple[str, bytes]], timeout: float = 30.0) -> None:
        """Publish each device's envelope as its retained desired state, all at once, and return when
        the broker has acknowledged every one (a wave of a thousand is one round trip, not a thousand)."""
        if not self._connected.wait(timeout):
            raise TimeoutError(f"not connected to the broker {self._host}:{self._port} for {timeout}s")
        mids = {}
        for device_id, envelope in items:
            info = self._client.publish(Topics(self.prefix, device_id).desired, envelope, qos=1, retain=True)
            # A connection that dropped since the check above gives MQTT_ERR_NO_CONN, but paho has
            # queued the message and sends it on reconnect (its wait_for_publish would raise).
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise OSError(f"cannot publish the manifest for {device_id}: {mqtt.error_string(info.rc)}")
            mids[info.mid] = device_id
        deadline = time.monotonic() + timeout
        with self._cond:
            while not set(mids) <= self._acked:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(d for m, d in mids.items() if m not in self._acked)
                    raise TimeoutError(
                        f"the broker did not acknowledge the manifests for {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} in {timeout}s"
                    )
                self._cond.wait(left)
            self._acked -= set(mids)
        refused = {d: self._client.refused.pop(m) for m, d in mids.items() if m in self._client.refused}
        if refused:
            dev, code = next(iter(sorted(refused.items())))
            raise ControlPlaneError(
                ErrorCode.BROKER_REFUSED,
                f"the broker refused the manifest for {len(refused)} device(s), {dev} first: MQTT reason "
                f"code {code} ({ReasonCodes(PacketTypes.PUBACK, identifier=code).getName()})",
                "publish as the operator identity on the operator listener (check [broker] cert and port, "
                "and the broker's operator ACL)",
            )

    def report(self, device_id: str, kind: str = "status") -> dict[str, Any] | None:
        with self._cond:
            return self._reports.get((device_id, kind))

    def wait_for(
        self, device_id: str, predicate: StatusPredicate, timeout: float = 30.0, kind: str = "status"
    ) -> dict[str, Any]:
        """Block until the device's latest report of ``kind`` satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                doc = self._reports.get((device_id, kind))
                if doc is not None and predicate(doc):
                    return doc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{device_id} {kind} did not reach the expected state in {timeout}s; last: {doc}"
                    )
                self._cond.wait(left)
