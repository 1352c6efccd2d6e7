"""The daemon's wiring: the one place that picks implementations from the config.

Every wing is written against an interface (the control channel, the blob backend, the deployer's
activator); this module reads the config and names the implementation, as Litestream picks a replica
client by URL scheme. Implementations are imported only when chosen, so a device on MQTT never loads
the IoT Hub SDK.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.channel.base import ControlChannel
from agent.config import AgentConfig
from cloud_sync.base import BlobBackend
from cloud_sync.factory import open_backend
from edge_core import manifest as mf
from edge_core.errors import BlobError, ConfigError


def open_channel(cfg: AgentConfig) -> ControlChannel:
    """The control channel that ``transport`` names."""
    if cfg.transport == "iothub":
        from agent.channel.iothub import HubChannel

        return HubChannel(cfg.device_id, cfg.iothub)
    from agent.channel.mqtt import MqttChannel

    return MqttChannel(cfg.device_id, cfg.mqtt)


def open_sync_backend(cfg: AgentConfig, should_stop: Callable[[], bool]) -> BlobBackend:
    """Where the uploader puts the buffer's batches: ``sync.url``, or ``<state_dir>/outbox``."""
    sc = cfg.sync
    # The embedded default store is created; a configured directory must exist (it is a mount).
    opts = {} if sc.url else {"create": True}
    try:
        return open_backend(
            sc.url or (cfg.state_dir / "outbox").as_uri(), retries=sc.retries, backoff_min=sc.backoff_min,
            backoff_max=sc.backoff_max, bandwidth=sc.bandwidth or None, should_stop=should_stop, **opts,
        )  # fmt: skip
    except BlobError as exc:
        raise ConfigError("sync.url", exc.message + (f" ({exc.hint})" if exc.hint else "")) from None


def load_trusted_keys(cfg: AgentConfig) -> dict[str, Ed25519PublicKey]:
    """The manifest signers this device trusts, by key id (``trust.keys``)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for i, path in enumerate(cfg.trust.keys):
        try:
            key = mf.load_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"trust.keys[{i}]", f"{path} is not an Ed25519 public key in PEM: {exc}"
            ) from None
        keys[mf.key_id(key)] = key
    return keys


#: SQLite's page size for a new database, which is what the buffer's budget is planned with first
NEW_DB_PAGE_SIZE = 4096


def check_channel_package(cfg: AgentConfig) -> None:
    """The IoT Hub SDK is an extra (``pip install 'edge-ml[iothub]'``): say so before anything starts."""
    if cfg.transport == "iothub":
        import importlib.util

        try:
            found = importlib.util.find_spec("azure.iot.device") is not None
        except ModuleNotFoundError:  # find_spec imports the parents: without `azure` itself, it raises
            found = False
        if not found:
            raise ConfigError(
                "transport",
                '"iothub" needs the Azure IoT Hub SDK, which is not installed: '
                "pip install 'edge-ml[iothub]' (systemd/install.sh does when the config says iothub)",
            )


def validate_for_run(cfg: AgentConfig) -> None:
    """Every refusal ``edge-agent run`` makes from the config alone, before it opens anything.

    ``run``, ``check-config`` and ``doctor`` all call this, so no config passes the two checks and
    is then refused at start (a telemetry budget below the buffer's real minimum did, once).
    """
    from agent.telemetry.buffer import DEFAULT_BATCH_MAX
    from agent.telemetry.buffer.budget import Limits, plan

    tc = cfg.telemetry
    plan(Limits(tc.buffer_budget_bytes, tc.max_record_bytes, DEFAULT_BATCH_MAX), NEW_DB_PAGE_SIZE)
    load_trusted_keys(cfg)
    check_channel_package(cfg)
