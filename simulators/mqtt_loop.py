"""One selector loop that drives many agents' MQTT connections (the fleet simulator's network thread).

paho's own loops cannot carry a fleet: ``loop_start`` is a thread per client, and each of them
``select()``s, which fails past file descriptor 1024 (about 339 clients a process, at three
descriptors each). Here one thread waits on every socket with the OS selector (epoll), and drives
each paho client through its external-loop API: ``loop_read`` when its socket is readable,
``loop_write`` when it has something to send, ``loop_misc`` once a second for keepalives.

Every :class:`SimChannel` is the agent's own :class:`~agent.channel.mqtt.MqttChannel` (the same
session, last will, topics, callbacks and backoff); only who calls the network functions differs.
Publishing from other threads (the deployers) is safe: paho queues the packet and tells us through
``on_socket_register_write``, which we hand to the loop thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.channel.base import ConnectHandler, DesiredHandler
from agent.channel.mqtt import MqttChannel
from agent.config import MqttConfig
from edge_core.log import get_logger

log = get_logger("sim.mqtt")

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class SelectorLoop:
    def __init__(self, name: str = "sim-mqtt") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, _READ, None)
        self._ops: list[Callable[[], None]] = []
        self._ops_lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._channels: set[SimChannel] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: connection attempts that failed, and connections lost, since start
        self.connect_failures = 0
        self.connections_lost = 0

    def start(self) -> SelectorLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- called from any thread ---------------------------------------------------------------------

    def call(self, fn: Callable[[], None]) -> None:
        with self._ops_lock:
            self._ops.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call(lambda: heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn)))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: already awake; closed: stopping
            self._wake_w.send(b"x")

    # -- the loop thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = 1.0 if not self._timers else max(0.0, min(1.0, self._timers[0][0] - now))
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._io(key.data, mask)
            with self._ops_lock:
                ops, self._ops = self._ops, []
            for op in ops:
                self._guard(op)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard(heapq.heappop(self._timers)[2])
            if now - last_misc >= 1.0:
                last_misc = now
                for ch in list(self._channels):
                    if ch.online_socket is not None:
                        self._check(ch, ch.client.loop_misc())

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one device's failure must not stop the fleet's network
            log.error("sim.loop_op_failed", exc_info=True)

    def _io(self, ch: SimChannel, mask: int) -> None:
        try:
            if mask & _READ:
                rc = ch.client.loop_read()
                sock = ch.online_socket
                # TLS may hold decrypted records the selector cannot see: read them now.
                while rc == mqtt.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
                    rc = ch.client.loop_read()
                self._check(ch, rc)
            if mask & _WRITE and ch.online_socket is not None:
                self._check(ch, ch.client.loop_write())
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("sim.connection_error", device=ch.device_id, error=str(exc))
            self._lost(ch)

    def _check(self, ch: SimChannel, rc: int) -> None:
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            self._lost(ch)

    def _lost(self, ch: SimChannel) -> None:
        self._forget(ch)
        ch.mark_lost()
        if ch.running:
            self.connections_lost += 1
            self._schedule_connect(ch)

    def _forget(self, ch: SimChannel) -> None:
        sock = ch.online_socket
        ch.online_socket = None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)

    def _schedule_connect(self, ch: SimChannel) -> None:
        delay = ch.next_delay()
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), lambda: self._connect(ch)))

    def _connect(self, ch: SimChannel) -> None:
        if not ch.running:
            return
        try:
            ch.connect_once()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.connect_failures += 1
            log.debug("sim.connect_failed", device=ch.device_id, error=str(exc))
            self._schedule_connect(ch)
            return
        sock = ch.client.socket()
        if sock is None:
            self._schedule_connect(ch)
            return
        ch.online_socket = sock
        self._sel.register(sock, _READ | (_WRITE if ch.client.want_write() else 0), ch)

    # -- paho's external-loop callbacks (want_write may come from any thread) ------------------------

    def want_write(self, ch: SimChannel) -> None:
        def arm() -> None:
            if ch.online_socket is not None:
                self._sel.modify(ch.online_socket, _READ | _WRITE, ch)

        if threading.current_thread() is self._thread:
            arm()
        else:
            self.call(arm)

    def done_writing(self, ch: SimChannel) -> None:
        if ch.online_socket is not None:
            self._sel.modify(ch.online_socket, _READ, ch)

    def attach(self, ch: SimChannel) -> None:
        def add() -> None:
            self._channels.add(ch)
            self._connect(ch)

        self.call(add)

    def detach(self, ch: SimChannel, done: threading.Event) -> None:
        def remove() -> None:
            self._channels.discard(ch)
            self._forget(ch)
            try:
                ch.client.disconnect()
                ch.client.loop_write()
            except (OSError, ValueError):
                pass
            done.set()

        self.call(remove)


class SimChannel(MqttChannel):
    """The agent's MQTT channel, on the shared selector loop instead of a thread of its own."""

    def __init__(self, device_id: str, cfg: MqttConfig, loop: SelectorLoop) -> None:
        super().__init__(device_id, cfg)
        self.loop = loop
        self.client = self._client
        self.online_socket: Any = None
        self.running = False
        self._attempt = 0
        #: what this device sent and received (payloads): the scenario report's traffic
        self.sent = [0, 0]
        self.received = [0, 0]
        c = self._client
        c._thread = None  # type: ignore[attr-defined]  # no thread: paho queues and calls back
        c.on_socket_register_write = lambda _c, _u, _s: loop.want_write(self)
        c.on_socket_unregister_write = lambda _c, _u, _s: loop.done_writing(self)

    def start(self, on_desired: DesiredHandler, on_connect: ConnectHandler) -> None:
        self._on_desired = on_desired
        self._on_connected = on_connect
        self.running = True
        self.loop.attach(self)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent[0] += 1
        self.sent[1] += len(payload)
        super()._publish(topic, payload, retain)

    def report_heartbeat(self, doc: dict[str, Any]) -> None:
        if self._connected.is_set():
            payload = json.dumps(doc, separators=(",", ":")).encode()
            self.sent[0] += 1
            self.sent[1] += len(payload)
            self._client.publish(self.topics.heartbeat, payload, qos=0, retain=False)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.received[0] += 1
        self.received[1] += len(msg.payload)
        super()._on_message(c, u, msg)

    def next_delay(self) -> float:
        delay = self._delay(self._attempt)
        self._attempt += 1
        return delay

    def mark_lost(self) -> None:
        self._connected.clear()

    def _on_connect(self, client: mqtt.Client, u: Any, flags: dict[str, Any], rc: Any, p: Any = None) -> None:
        super()._on_connect(client, u, flags, rc, p)
        if rc == 0:
            self._attempt = 0

    def stop(self) -> None:
        if self._connected.is_set():
            info = self._client.publish(
                self.topics.online, self._online_doc(False, "shutdown"), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):  # not sent: the will says offline anyway
                info.wait_for_publish(timeout=2.0)
        self.running = False
        done = threading.Event()
        self.loop.detach(self, done)
        done.wait(5.0)

    def kill(self) -> None:
        """Drop the connection without a goodbye, as a power cut does: the broker sends the last will."""
        self.running = False
        done = threading.Event()

        def cut() -> None:
            sock = self.online_socket
            self.loop._forget(self)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            done.set()

        self.loop.call(cut)
        done.wait(5.0)
