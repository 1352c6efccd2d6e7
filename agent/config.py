"""Agent configuration: defaults -> TOML file -> environment -> validation that names the bad field.

Environment overrides use ``EDGE_AGENT_`` + the dotted path in upper case with ``__`` between
sections: ``EDGE_AGENT_DEVICE_ID``, ``EDGE_AGENT_MQTT__HOST``, ``EDGE_AGENT_DOWNLOAD__RETRIES``.
Lists in the environment are comma-separated. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_core.confmerge import build_section, env_overrides, merge
from edge_core.errors import ConfigError
from edge_core.topics import DEFAULT_PREFIX

ENV_PREFIX = "EDGE_AGENT_"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, brackets allowed) can only be reached from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 8883
    #: CA that signed the broker's certificate, and this device's client certificate and key (mTLS).
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    prefix: str = DEFAULT_PREFIX
    keepalive: int = 30
    #: MQTT 5 SessionExpiryInterval: how long the broker keeps this device's session and queued
    #: messages while it is offline. Without it a persistent session is dropped at disconnect.
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0


@dataclass
class IotHubConfig:
    """Azure IoT Hub (device twin) as the control channel: ``transport = "iothub"``.

    Authenticate with a device connection string (``HostName=...;DeviceId=...;SharedAccessKey=...``,
    best kept in ``connection_string_file``, readable only by the agent) or with X.509: ``hostname``
    plus this device's ``cert`` and ``key`` (its CN is the device id). The SDK always dials port 8883.
    """

    connection_string: str = ""
    connection_string_file: Path | None = None
    hostname: str = ""
    cert: Path | None = None
    key: Path | None = None
    #: CA that signed the hub's (or gateway's) server certificate; default: the system's roots.
    ca: Path | None = None
    #: Connect through an IoT Edge gateway (or a protocol gateway) instead of the hub itself.
    gateway_hostname: str = ""
    keepalive: int = 60
    #: SAS tokens made from a connection string live this long; the SDK renews them.
    sastoken_ttl: int = 3600
    #: The most a twin read, a reported-property update or a message may wait for the hub's answer.
    request_timeout: float = 30.0
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0

    def endpoint_host(self) -> str:
        """Where the SDK connects: the gateway when there is one, else the hub."""
        if self.connection_string or self.connection_string_file:
            parts = parse_connection_string(self.read_connection_string())
            return parts.get("GatewayHostName") or parts["HostName"]
        return self.gateway_hostname or self.hostname

    def read_connection_string(self) -> str:
        if self.connection_string_file is not None:
            try:
                return self.connection_string_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    "iothub.connection_string_file",
                    f"cannot read {self.connection_string_file}: {exc.strerror}",
                ) from None
        return self.connection_string


def parse_connection_string(text: str) -> dict[str, str]:
    """``HostName=...;DeviceId=...;SharedAccessKey=...`` as a dict; a malformed one names what is wrong."""
    parts: dict[str, str] = {}
    for item in text.strip().split(";"):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError("iothub.connection_string", f"{item!r} is not KEY=VALUE")
        parts[key] = value
    missing = [k for k in ("HostName", "DeviceId") if k not in parts]
    if missing:
        raise ConfigError("iothub.connection_string", f"has no {' or '.join(missing)}")
    if "SharedAccessKey" not in parts:
        raise ConfigError(
            "iothub.connection_string",
            "has no SharedAccessKey (for X.509 set hostname, cert and key instead)",
        )
    return parts


@dataclass
class ServiceConfig:
    """How the agent behaves under systemd (``Type=notify``)."""

    #: READY=1 is sent once the control channel is connected and the API serves, or after this many
    #: seconds offline: a device without a network must keep serving its last image, not be
    #: restarted by systemd for a slow broker. Keep it below the unit's TimeoutStartSec.
    ready_timeout: float = 20.0
    #: The scoring API's event loop not running for this long means it is hung (models that run on it
    #: take milliseconds): the watchdog pings stop, and systemd restarts the agent.
    api_stall_timeout: float = 30.0


@dataclass
class TrustConfig:
    #: PEM files of the Ed25519 public keys whose manifest signatures this device accepts.
    keys: list[Path] = field(default_factory=list)


@dataclass
class DownloadConfig:
    #: Seconds without progress (connect or read) before an attempt is abandoned.
    timeout: float = 30.0
    #: Attempts per URL for retryable failures (connection errors, timeouts, 5xx, cut transfers).
    retries: int = 5
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    #: Free space that must remain after the bundle and its unpacked copy are on disk.
    disk_margin: int = 64 * 1024 * 1024
    chunk_size: int = 1024 * 1024
    #: CA bundle (PEM) for HTTPS bundle servers signed by a private CA; default: the system's roots.
    ca: Path | None = None
    #: One deadline for a whole download, every URL and retry included: ``deadline_base`` seconds
    #: plus the bundle's size at ``min_rate`` bytes/second (defaults: 100 MiB in about 8 minutes). A
    #: server that trickles a byte a second never trips the per-read ``timeout``; it trips this.
    #: ``min_rate = 0`` turns the deadline off.
    min_rate: int = 256 * 1024
    deadline_base: float = 120.0
    #: Redirects followed per request (a loop ends as download_failed, not as a hang).
    max_redirects: int = 5


@dataclass
class StoreConfig:
    #: Images kept on disk, the active one included; older ones are garbage-collected.
    keep_images: int = 2


@dataclass
class RuntimeConfig:
    #: Tried in this order among the providers this onnxruntime build has; CPU is always the last resort.
    execution_providers: list[str] = field(
        default_factory=lambda: [
            "VitisAIExecutionProvider", "OpenVINOExecutionProvider", "TensorrtExecutionProvider",
            "CUDAExecutionProvider", "CPUExecutionProvider",
        ]
    )  # fmt: skip
    #: Set on purpose, never left to onnxruntime's default (all cores): the agent shares the device.
    intra_op_num_threads: int = 1
    inter_op_num_threads: int = 1
    #: score.py worker processes per image, and their per-request and init() timeouts.
    workers: int = 1
    request_timeout: float = 30.0
    init_timeout: float = 120.0
    #: Models whose inferences take less than this run on the API's event loop (no thread hop).
    inline_max_ms: float = 5.0


@dataclass
class ApiConfig:
    enabled: bool = True
    #: ``HOST:PORT`` or ``unix:/path``. Loopback by default: exposing it is an explicit choice.
    listen: str = "127.0.0.1:8080"
    #: A file holding a bearer token that every request (but the health checks) must carry.
    token_file: Path | None = None
    #: TLS for the API: this server certificate and key (PEM). With ``client_ca`` every client must
    #: present a certificate signed by that CA (mutual TLS: the certificate-based authentication Azure
    #: ML secures its services with), health checks included.
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    #: Off loopback, the API refuses to start with neither a token nor client certificates unless this
    #: says that the network itself is the protection (an isolated VLAN, a host firewall).
    allow_unauthenticated: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    #: Threads for score.py calls and slow models.
    threads: int = 4


@dataclass
class TelemetryConfig:
    #: One disk budget for the whole telemetry buffer (captures, metrics, events): the lowest-priority
    #: oldest records are dropped first when it is reached, and counted.
    buffer_budget_bytes: int = 256 * 1024 * 1024
    #: The writer thread commits at least this often: the most a kill -9 can lose (docs/buffer.md).
    flush_interval: float = 0.2
    #: SQLite's synchronous for the buffer (WAL): "NORMAL" (a committed record survives a crash of the
    #: agent; a power cut can lose the commits since the last checkpoint) or "FULL" (an fsync per
    #: commit: it survives a power cut too). docs/monitoring.md, "What survives what".
    buffer_synchronous: str = "NORMAL"
    #: When a captured request is answered: "before_answer" (after its record is committed to the
    #: buffer, so a crash of the agent never loses the record of an answer a client got) or
    #: "after_answer" (at once; a crash loses up to flush_interval of answered requests' records).
    capture_commit: str = "before_answer"
    #: before_answer waits at most this long for the commit, then answers anyway (and counts it in
    #: edge_capture_commit_timeouts): a slow or wedged disk must not stop the serving.
    capture_commit_timeout: float = 2.0
    max_record_bytes: int = 1024 * 1024
    #: System and inference metrics sampling, and the heartbeat.
    interval: float = 30.0


@dataclass
class SyncConfig:
    #: Where telemetry goes: file:///dir (default: <state_dir>/outbox), an Azure Blob container SAS
    #: URL, or s3://bucket/prefix.
    url: str = ""
    #: Upload when a class has this many records or bytes waiting, or its oldest is this old.
    batch_max_records: int = 5000
    batch_max_bytes: int = 8 * 1024 * 1024
    max_batch_age: float = 300.0
    #: How often the uploader looks at the buffer.
    interval: float = 10.0
    #: Bytes per second on the wire (0: no cap).
    bandwidth: int = 0
    #: gzip level of the uploaded blobs: 6 for thin uplinks, 1 for a busy CPU with a fast link.
    compress_level: int = 6
    #: On a clean stop (SIGTERM), the uploader ships what is waiting for at most this many seconds
    #: (0: not at all); what it cannot ship in time, or while the storage fails, waits for the next start.
    drain_timeout: float = 10.0
    retries: int = 5
    backoff_min: float = 1.0
    backoff_max: float = 60.0


@dataclass
class ProvisioningConfig:
    """Fleet provisioning (docs/control-plane.md): with ``claim_cert`` set and no identity in
    ``identity_dir`` yet, the agent asks the control plane for one before it opens the channel."""

    #: The shared claim certificate and key (CN ``claim-NAME``); unset: the device was enrolled.
    claim_cert: Path | None = None
    claim_key: Path | None = None
    #: Where the device id comes from: "config" (``device_id`` here, else the top-level one),
    #: "machine-id" (the file ``machine_id_file``) or "hostname"; then put into ``device_id_template``.
    device_id_source: str = "config"
    device_id: str = ""
    device_id_template: str = "{id}"
    machine_id_file: Path = Path("/etc/machine-id")
    #: Where the new key (0600) and certificate are kept; default ``<state_dir>/identity``.
    identity_dir: Path | None = None
    #: Seconds to wait for an answer to one request; then retried, after a backoff.
    timeout: float = 30.0
    backoff_min: float = 2.0
    backoff_max: float = 300.0


@dataclass
class AgentConfig:
    device_id: str = ""
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: str = "info"
    #: The control channel: "mqtt" (a plain MQTT 5 broker, [mqtt]) or "iothub" (Azure IoT Hub device
    #: twin, [iothub]). The deployer does not know which one it talks to.
    transport: str = "mqtt"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    iothub: IotHubConfig = field(default_factory=IotHubConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)

    def control_endpoint(self) -> str:
        """``host:port`` of the control channel in use (IoT Hub's port is always 8883)."""
        if self.transport == "iothub":
            return f"{self.iothub.endpoint_host()}:8883"
        return f"{self.mqtt.host}:{self.mqtt.port}"

    def validate(self) -> None:
        provisioned = self._validate_provisioning()
        if not self.device_id and not provisioned:
            raise ConfigError("device_id", "is required (the device's id, equal to its certificate's CN)")
        if self.device_id and not _ID.match(self.device_id):
            raise ConfigError("device_id", f"{self.device_id!r} may only use letters, digits and . _ : -")
        if self.transport not in ("mqtt", "iothub"):
            raise ConfigError("transport", f'{self.transport!r} is neither "mqtt" nor "iothub"')
        if self.transport == "iothub":
            self._validate_iothub()
        if self.service.ready_timeout <= 0:
            raise ConfigError("service.ready_timeout", "must be > 0")
        if self.service.api_stall_timeout <= 0:
            raise ConfigError("service.api_stall_timeout", "must be > 0")
        if not 0 < self.mqtt.port < 65536:
            raise ConfigError("mqtt.port", f"{self.mqtt.port} is not a TCP port")
        if "/" in self.mqtt.prefix or "+" in self.mqtt.prefix or "#" in self.mqtt.prefix:
            raise ConfigError("mqtt.prefix", "must not contain '/', '+' or '#'")
        if self.mqtt.session_expiry <= 0:
            raise ConfigError("mqtt.session_expiry", "must be > 0, or queued messages are lost at disconnect")
        if self.mqtt.reconnect_min <= 0 or self.mqtt.reconnect_max < self.mqtt.reconnect_min:
            raise ConfigError("mqtt.reconnect_max", "need 0 < reconnect_min <= reconnect_max")
        tls = [self.mqtt.ca, self.mqtt.cert, self.mqtt.key]
        # a device still to provision has the broker's CA only: its identity comes later
        if (
            any(tls)
            and not all(tls)
            and not (provisioned and self.mqtt.cert is None and self.mqtt.key is None)
        ):
            raise ConfigError("mqtt", "ca, cert and key go together (mutual TLS); set all three or none")
        for name in ("ca", "cert", "key"):
            p = getattr(self.mqtt, name)
            if p is not None and not p.is_file():
                raise ConfigError(f"mqtt.{name}", f"file {p} does not exist or is not readable")
        if not self.trust.keys:
            raise ConfigError("trust.keys", "lists no public key: the agent would accept no manifest")
        for i, p in enumerate(self.trust.keys):
            if not p.is_file():
                raise ConfigError(f"trust.keys[{i}]", f"file {p} does not exist")
        if self.download.retries < 1:
            raise ConfigError("download.retries", "must be >= 1")
        if self.download.timeout <= 0:
            raise ConfigError("download.timeout", "must be > 0")
        if self.download.ca is not None and not self.download.ca.is_file():
            raise ConfigError("download.ca", f"file {self.download.ca} does not exist")
        if self.download.chunk_size < 4096:
            raise ConfigError("download.chunk_size", "must be >= 4096")
        if self.store.keep_images < 2:
            raise ConfigError("store.keep_images", "must be >= 2 (the active image and one to roll back to)")
        for name in ("intra_op_num_threads", "inter_op_num_threads"):
            if not 0 <= getattr(self.runtime, name) <= 256:
                raise ConfigError(f"runtime.{name}", "must be between 0 (onnxruntime decides) and 256")
        if self.runtime.workers < 1:
            raise ConfigError("runtime.workers", "must be >= 1")
        if self.runtime.request_timeout <= 0 or self.runtime.init_timeout <= 0:
            raise ConfigError("runtime.request_timeout", "timeouts must be > 0")
        if not self.api.listen.startswith("unix:"):
            host, sep, port = self.api.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError("api.listen", f"{self.api.listen!r} is neither HOST:PORT nor unix:/path")
        if self.api.token_file is not None and not self.api.token_file.is_file():
            raise ConfigError("api.token_file", f"file {self.api.token_file} does not exist")
        self._validate_api_tls()
        if self.api.max_body_bytes < 1024:
            raise ConfigError("api.max_body_bytes", "must be >= 1024")
        if self.telemetry.buffer_budget_bytes < 1024 * 1024:
            raise ConfigError("telemetry.buffer_budget_bytes", "must be >= 1 MiB")
        if self.telemetry.interval <= 0 or self.telemetry.flush_interval <= 0:
            raise ConfigError("telemetry.interval", "intervals must be > 0")
        if self.telemetry.buffer_synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigError(
                "telemetry.buffer_synchronous",
                f"{self.telemetry.buffer_synchronous!r} is not NORMAL, FULL or EXTRA (OFF risks corruption)",
            )
        if self.telemetry.capture_commit not in ("before_answer", "after_answer"):
            raise ConfigError(
                "telemetry.capture_commit",
                f'{self.telemetry.capture_commit!r} is neither "before_answer" nor "after_answer"',
            )
        if not self.telemetry.capture_commit_timeout > 0:
            raise ConfigError("telemetry.capture_commit_timeout", "must be > 0")
        if self.sync.url and not (
            self.sync.url.startswith(("file://", "https://", "http://", "s3://"))
            or self.sync.url.startswith("/")
        ):
            raise ConfigError(
                "sync.url", f"{self.sync.url!r}: use file:///dir, an https:// SAS URL or s3://bucket"
            )
        if self.sync.batch_max_records < 1 or self.sync.batch_max_bytes < 1024:
            raise ConfigError("sync.batch_max_records", "batches need >= 1 record and >= 1 KiB")
        if not 1 <= self.sync.compress_level <= 9:
            raise ConfigError("sync.compress_level", "must be between 1 and 9")
        if self.sync.bandwidth < 0:
            raise ConfigError("sync.bandwidth", "must be >= 0 (0: no cap)")
        if not self.sync.drain_timeout >= 0:
            raise ConfigError("sync.drain_timeout", "must be >= 0 (0: no upload at shutdown)")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level", "must be one of debug, info, warning, error")

    def _validate_provisioning(self) -> bool:
        """Whether this device provisions itself (and the section is sound)."""
        pv = self.provisioning
        if pv.claim_cert is None and pv.claim_key is None:
            return False
        for name in ("claim_cert", "claim_key"):
            p = getattr(pv, name)
            if p is None or not p.is_file():
                raise ConfigError(
                    f"provisioning.{name}", f"file {p} does not exist (claim_cert and claim_key go together)"
                )
        if self.transport != "mqtt" or self.mqtt.ca is None:
            raise ConfigError("provisioning", 'needs transport = "mqtt" and mqtt.ca (the broker\'s CA)')
        if pv.device_id_source not in ("config", "machine-id", "hostname"):
            raise ConfigError(
                "provisioning.device_id_source",
                f'{pv.device_id_source!r} is not "config", "machine-id" or "hostname"',
            )
        if pv.device_id_source == "config" and not (pv.device_id or self.device_id):
            raise ConfigError("provisioning.device_id", 'is required with device_id_source = "config"')
        if "{id}" not in pv.device_id_template:
            raise ConfigError("provisioning.device_id_template", "must contain {id}")
        if pv.timeout <= 0 or pv.backoff_min <= 0 or pv.backoff_max < pv.backoff_min:
            raise ConfigError("provisioning.timeout", "need timeout > 0 and 0 < backoff_min <= backoff_max")
        return True

    def _validate_iothub(self) -> None:
        hub = self.iothub
        has_cs = bool(hub.connection_string or hub.connection_string_file)
        has_x509 = bool(hub.cert or hub.key)
        if hub.connection_string and hub.connection_string_file:
            raise ConfigError(
                "iothub.connection_string", "set connection_string or connection_string_file, not both"
            )
        if has_cs == has_x509:
            raise ConfigError(
                "iothub",
                "set either a connection string (connection_string_file) or X.509 (hostname, cert and key)",
            )
        for name in ("connection_string_file", "cert", "key", "ca"):
            p = getattr(hub, name)
            if p is not None and not p.is_file():
                raise ConfigError(f"iothub.{name}", f"file {p} does not exist or is not readable")
        if has_cs:
            parts = parse_connection_string(hub.read_connection_string())
            if parts["DeviceId"] != self.device_id:
                raise ConfigError(
                    "iothub.connection_string",
                    f"is for device {parts['DeviceId']!r}, but device_id is {self.device_id!r}",
                )
        elif not (hub.hostname and hub.cert and hub.key):
            raise ConfigError("iothub.hostname", "X.509 needs hostname, cert and key")
        if not 5 <= hub.keepalive <= 1740:
            raise ConfigError("iothub.keepalive", "must be between 5 and 1740 seconds (IoT Hub's limit)")
        if hub.sastoken_ttl < 300:
            raise ConfigError(
                "iothub.sastoken_ttl", "must be >= 300 s (the SDK renews a token 120 s before it expires)"
            )
        if hub.request_timeout <= 0:
            raise ConfigError("iothub.request_timeout", "must be > 0")
        if hub.reconnect_min <= 0 or hub.reconnect_max < hub.reconnect_min:
            raise ConfigError("iothub.reconnect_max", "need 0 < reconnect_min <= reconnect_max")

    def _validate_api_tls(self) -> None:
        api = self.api
        for name in ("cert", "key", "client_ca"):
            path = getattr(api, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"api.{name}", f"file {path} does not exist")
        if (api.cert is None) != (api.key is None):
            raise ConfigError(
                "api.cert", "api.cert and api.key go together (the server certificate and its key)"
            )
        if api.client_ca is not None and api.cert is None:
            raise ConfigError("api.client_ca", "client certificates need TLS: set api.cert and api.key too")
        if (
            not api.listen.startswith("unix:")
            and not is_loopback(api.listen.rpartition(":")[0])
            and api.token_file is None
            and api.client_ca is None
            and not api.allow_unauthenticated
        ):
            raise ConfigError(
                "api.listen",
                f"{api.listen} is reachable from the network and nothing authenticates its clients: "
                "set api.token_file and/or api.client_ca (with api.cert and api.key), or "
                "api.allow_unauthenticated = true if the network itself is the protection",
            )


def load(path: Path | None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Load and validate. Relative paths in the file are relative to the file's directory."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    merge(data, env_overrides(os.environ if env is None else env, ENV_PREFIX))
    cfg: AgentConfig = build_section(AgentConfig, data, "")
    if path is not None:
        base = path.parent
        cfg.state_dir = base / cfg.state_dir
        for section, names in (
            (cfg.mqtt, ("ca", "cert", "key")),
            (cfg.iothub, ("ca", "cert", "key", "connection_string_file")),
        ):
            for name in names:
                p = getattr(section, name)
                if p is not None:
                    setattr(section, name, base / p)
        cfg.trust.keys = [base / p for p in cfg.trust.keys]
        for name in ("claim_cert", "claim_key", "identity_dir"):
            if (p := getattr(cfg.provisioning, name)) is not None:
                setattr(cfg.provisioning, name, base / p)
        if cfg.download.ca is not None:
            cfg.download.ca = base / cfg.download.ca
        for name in ("token_file", "cert", "key", "client_ca"):
            if (p := getattr(cfg.api, name)) is not None:
                setattr(cfg.api, name, base / p)
    cfg.validate()
    return cfg
