"""The control plane's configuration: ``<home>/config.toml``, then ``EDGE_DEPLOY_*`` variables.

The home directory (``--home``, ``EDGE_DEPLOY_HOME``, default ``./.edge-deploy``) holds the registry
(``registry.db``, unless ``registry.url`` names a PostgreSQL database), the local artifact store
(``artifacts/``) and, by default, the signing key.
Relative paths in the file are relative to the home directory. Every setting has a default, so a
new home works on embedded defaults (a local broker on 127.0.0.1:8883, a local artifact store
served by ``edge-deploy serve`` on 127.0.0.1:8700).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_core.confmerge import build_section, env_overrides, merge
from edge_core.errors import ConfigError
from edge_core.topics import DEFAULT_PREFIX

ENV_PREFIX = "EDGE_DEPLOY_"


@dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    #: the operator listener (`edge-deploy broker config`); device_port is the devices' listener
    port: int = 8883
    device_port: int = 8883
    #: the broker's CA and the operator identity (its certificate's CN must be an operator in the ACL)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    prefix: str = DEFAULT_PREFIX
    connect_timeout: float = 10.0


@dataclass
class ArtifactsConfig:
    #: a directory (relative to home), file:///dir, an Azure container SAS URL or s3://bucket/prefix
    url: str = "artifacts"
    #: for a local store: where devices reach `edge-deploy serve` (default: serve.listen)
    public_url: str = ""
    #: lifetime of presigned S3 URLs put in manifests, seconds (S3 allows at most 7 days)
    url_expiry: int = 7 * 24 * 3600


@dataclass
class RegistryConfig:
    #: empty: the SQLite file <home>/registry.db; or postgresql://user@host/db, shared by several
    #: `edge-deploy serve` replicas (docs/scaling.md)
    url: str = ""


@dataclass
class ServeConfig:
    #: the artifact HTTP endpoint of `edge-deploy serve`
    listen: str = "127.0.0.1:8700"
    #: seconds between two passes over the live deployments
    poll: float = 0.5
    #: seconds a replica's hold on a deployment lasts without renewal: how soon another replica
    #: resumes the rollouts of one that died (each pass renews it, so it must exceed a step's time)
    lease: float = 30.0


@dataclass
class ApiConfig:
    """The operators' JSON API and dashboard of `edge-deploy serve` (deploy/web/), on a listener of
    its own: the artifact endpoint is for devices, this one for people and scripts."""

    #: HOST:PORT, or "" for no API
    listen: str = "127.0.0.1:8701"
    #: the operator bearer token (relative to home); `serve` creates it (mode 0600) when absent
    token_file: Path = Path("api.token")
    #: whether requests need the token (false: mutual TLS alone authenticates)
    require_token: bool = True
    #: HTTPS: the server's certificate and key; with client_ca, clients need a certificate from it
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    #: listen off loopback with neither a token nor mutual TLS (an open API: for a trusted network only)
    allow_open: bool = False


@dataclass
class ControlPlaneConfig:
    home: Path = Path(".edge-deploy")
    signing_key: Path = Path("keys/signing.key")
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    @property
    def registry_path(self) -> Path:
        return self.home / "registry.db"

    @property
    def registry_location(self) -> Path | str:
        """What Registry() opens: registry.url, else the SQLite file in the home directory."""
        return self.registry.url or self.registry_path

    @property
    def artifacts_url(self) -> str:
        url = self.artifacts.url
        if "://" in url or url.startswith("/"):
            return url
        return str((self.home / url).absolute())

    @property
    def public_url(self) -> str:
        return self.artifacts.public_url or f"http://{self.serve.listen}/"

    def validate(self) -> None:
        # [broker] is checked where the broker is used (validate_broker): the offline commands
        # (model list, image build, ...) must keep working while it is being fixed.
        host, sep, port = self.serve.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError("serve.listen", f"{self.serve.listen!r} is not HOST:PORT")
        if not 0 < self.artifacts.url_expiry <= 7 * 24 * 3600:
            raise ConfigError("artifacts.url_expiry", "must be between 1 s and 7 days")
        url = self.registry.url
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("registry.url", "must be a postgresql:// URL, or empty for <home>/registry.db")
        if self.serve.lease <= 0:
            raise ConfigError("serve.lease", "must be a positive number of seconds")

    def validate_broker(self) -> None:
        if not 0 < self.broker.port < 65536:
            raise ConfigError("broker.port", f"{self.broker.port} is not a TCP port")
        tls = [self.broker.ca, self.broker.cert, self.broker.key]
        if any(tls) and not all(tls):
            raise ConfigError("broker", "ca, cert and key go together (mutual TLS); set all three or none")
        for name in ("ca", "cert", "key"):
            p = getattr(self.broker, name)
            if p is not None and not p.is_file():
                raise ConfigError(f"broker.{name}", f"file {p} does not exist or is not readable")
        if (self.api.cert is None) != (self.api.key is None):
            raise ConfigError("api", "cert and key go together; set both or neither")
        if self.api.client_ca is not None and self.api.cert is None:
            raise ConfigError("api.client_ca", "mutual TLS needs the server's cert and key too")


def load(home: Path | None = None, env: Mapping[str, str] | None = None) -> ControlPlaneConfig:
    env = os.environ if env is None else env
    home = home or Path(env.get(ENV_PREFIX + "HOME") or ".edge-deploy")
    data: dict[str, Any] = {}
    path = home / "config.toml"
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    overrides = env_overrides(env, ENV_PREFIX)
    overrides.pop("home", None)
    merge(data, overrides)
    if "home" in data:
        raise ConfigError("home", "is set by --home or EDGE_DEPLOY_HOME, not in config.toml")
    cfg: ControlPlaneConfig = build_section(ControlPlaneConfig, data, "")
    cfg.home = home
    cfg.signing_key = home / cfg.signing_key
    for name in ("ca", "cert", "key"):
        p = getattr(cfg.broker, name)
        if p is not None:
            setattr(cfg.broker, name, home / p)
    cfg.api.token_file = home / cfg.api.token_file
    for name in ("cert", "key", "client_ca"):
        p = getattr(cfg.api, name)
        if p is not None:
            setattr(cfg.api, name, home / p)
    cfg.validate()
    return cfg
