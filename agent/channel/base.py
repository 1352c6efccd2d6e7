"""The control channel seam: how desired state reaches the agent and how reports leave it.

The deployer knows only this interface, and this module imports no implementation:
:mod:`agent.channel.mqtt` (a plain MQTT 5 broker with mutual TLS) and :mod:`agent.channel.iothub`
(Azure IoT Hub's device twin, through the azure-iot-device SDK). ``transport`` in the config chooses
one, in the daemon's wiring (:func:`agent.ops.wiring.open_channel`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

DesiredHandler = Callable[[bytes], None]
ConnectHandler = Callable[[], None]


class ControlChannel(Protocol):
    def start(self, on_desired: DesiredHandler, on_connect: ConnectHandler) -> None:
        """Connect (and keep reconnecting) in the background; call ``on_desired`` with every desired-state
        message (the signed manifest, as bytes) and ``on_connect`` after every (re)connection."""

    def report_status(self, doc: dict[str, Any]) -> None:
        """Publish the status document (retained: the control plane reads rollout progress from it)."""

    def report_inventory(self, doc: dict[str, Any]) -> None:
        """Publish the device's capabilities (retained)."""

    def report_heartbeat(self, doc: dict[str, Any]) -> None:
        """Publish a small periodic summary (not retained; skipped while offline)."""

    @property
    def connected(self) -> bool: ...

    @property
    def thread(self) -> threading.Thread:
        """The channel's network loop, watched by the daemon: it never ends before :meth:`stop`."""
        ...

    def describe(self) -> dict[str, Any]:
        """``{"transport", "endpoint", "connected", "last_error"}``: for run.json and the logs."""
        ...

    def stop(self) -> None:
        """Say goodbye (online=false), disconnect and stop the background thread."""
