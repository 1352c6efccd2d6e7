"""Live updates for the event stream (/api/events): the control plane's own view of the fleet.

`serve`'s main loop ingests every device report into the registry. The Watcher reads the registry
(its own connection, its own thread) every ``interval`` and publishes what changed: a device whose
state, image, generation, online flag or tags changed, and a deployment whose state, wave, phase,
devices or history changed. Polling the registry rather than hooking the loop keeps the stream
independent of who drives (another `serve`, a CLI `deploy create` that drives itself): whatever
reaches the registry reaches the page.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploy.plane import ControlPlane
from deploy.registry import LIVE_STATES
from deploy.rollout import summary
from deploy.web.routes import fleet_rows


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: Any

    def encode(self) -> bytes:
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(self.data, default=str)}\n\n".encode()


class EventHub:
    """Fan-out to the open streams. A subscriber too slow to keep ``maxsize`` events is dropped (its
    queue gets None and the stream ends; the page reconnects and reloads) instead of holding memory."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._lock = threading.Lock()
        self._subs: list[queue.Queue[Event | None]] = []
        self._ids = itertools.count(1)
        self.maxsize = maxsize

    def subscribe(self) -> queue.Queue[Event | None]:
        q: queue.Queue[Event | None] = queue.Queue(self.maxsize)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[Event | None]) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, kind: str, data: Any) -> None:
        with self._lock:
            ev = Event(next(self._ids), kind, data)
            for q in list(self._subs):
                try:
                    q.put_nowait(ev)
                except queue.Full:
                    self._subs.remove(q)
                    _end(q)

    def close(self) -> None:
        with self._lock:
            for q in self._subs:
                _end(q)
            self._subs.clear()


def _end(q: queue.Queue[Event | None]) -> None:
    try:
        q.put_nowait(None)
    except queue.Full:
        # a full queue: the reader drains it and then blocks; one slot is freed for the end mark
        q.get_nowait()
        q.put_nowait(None)


def _device_key(d: dict[str, Any]) -> str:
    keys = ("online", "state", "image", "generation", "deployment_id", "tags")
    return json.dumps(
        [d.get(k) for k in keys] + [(d["status"] or {}).get("error")], sort_keys=True, default=str
    )


def _deployment_key(s: dict[str, Any], n_events: int) -> str:
    keys = ("state", "wave", "waves", "phase", "counts", "members", "reason")
    return json.dumps([s.get(k) for k in keys] + [n_events], sort_keys=True, default=str)


class Watcher:
    """Publishes the registry's changes to a hub, from a daemon thread."""

    def __init__(self, open_plane: Callable[[], ControlPlane], hub: EventHub, interval: float = 0.5) -> None:
        self.open_plane, self.hub, self.interval = open_plane, hub, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._devices: dict[str, str] = {}
        self._deployments: dict[str, tuple[float, str]] = {}
        self._primed = False

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name="api-events", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        with self.open_plane() as cp:
            while not self._stop.is_set():
                try:
                    self.scan(cp)
                except Exception as exc:  # a failed scan (a locked file) is retried, never fatal
                    self.hub.publish("error", {"message": f"{type(exc).__name__}: {exc}"})
                self._stop.wait(self.interval)

    def scan(self, cp: ControlPlane) -> None:
        """One pass: the first only records what is there; later ones publish what changed."""
        reg = cp.registry
        for row in fleet_rows(cp):
            key = _device_key(row)
            if self._devices.get(row["id"]) != key:
                self._devices[row["id"]] = key
                if self._primed:
                    self.hub.publish("device", row)
        for dep in reg.deployments():
            seen = self._deployments.get(dep["id"])
            # finished deployments whose row did not change are skipped: their summary cannot move
            if (
                seen is not None
                and dep["state"] not in LIVE_STATES
                and not dep["command"]
                and seen[0] == dep["updated_at"]
            ):
                continue
            s = summary(reg, dep["id"])
            events = reg.events(dep["id"])
            key = _deployment_key(s, len(events))
            self._deployments[dep["id"]] = (dep["updated_at"], key)
            if (seen is None or seen[1] != key) and self._primed:
                self.hub.publish("deployment", {**s, "events": events})
        self._primed = True
