"""The control channel seam: how desired state reaches the agent and how reports leave it.

The deployer knows only this interface. Implementations: :mod:`agent.mqtt_channel` (a plain MQTT 5
broker with mutual TLS) and :mod:`agent.hub_channel` (Azure IoT Hub's device twin, through the
azure-iot-device SDK). ``transport`` in the config chooses one (:func:`open_channel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.config import AgentConfig

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

    def describe(self) -> dict[str, Any]:
        """``{"transport", "endpoint", "connected", "last_error"}``: for run.json and the logs."""
        ...

    def stop(self) -> None:
        """Say goodbye (online=false), disconnect and stop the background thread."""


def open_channel(cfg: AgentConfig) -> ControlChannel:
    if cfg.transport == "iothub":
        from agent.hub_channel import HubChannel

        return HubChannel(cfg.device_id, cfg.iothub)
    from agent.mqtt_channel import MqttChannel

    return MqttChannel(cfg.device_id, cfg.mqtt)
