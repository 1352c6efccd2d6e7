"""A whole deployment rig on one machine: broker, bundle server, signing key, operator, real agents.

The demo, the end-to-end tests and the fleet simulator all stand on this. Each device is a real
``edge-agent run`` process with its own certificate, config and state directory, so a test can kill
it with SIGKILL and start it again exactly as a device loses power and boots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from deploy import bundle, signer
from deploy.cli import new_manifest
from deploy.publisher import OperatorClient, StatusPredicate
from edge_core import manifest as mf
from simulators.broker import Mosquitto
from simulators.bundle_server import BundleServer


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(cfg: Mapping[str, Any]) -> str:
    """Enough TOML for agent configs: scalars and lists at the top, one level of tables."""
    top = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, Mapping)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, v in cfg.items()
        if isinstance(v, Mapping)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


class AgentProcess:
    """One real agent: ``python -m agent.ops.cli run --config FILE`` with its own state directory."""

    def __init__(
        self, rig: Rig, device_id: str, overrides: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.rig = rig
        self.device_id = device_id
        self.dir = rig.workdir / "devices" / device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        cert = rig.broker.client_cert(device_id)
        cfg: dict[str, Any] = {
            "device_id": device_id,
            "state_dir": str(self.dir / "state"),
            "mqtt": {
                "host": rig.broker.host,
                "port": rig.broker.port,
                "ca": str(cert.ca_path),
                "cert": str(cert.cert_path),
                "key": str(cert.key_path),
                "prefix": rig.broker.prefix,
                "reconnect_min": 0.2,
                "reconnect_max": 2.0,
            },
            "trust": {"keys": [str(rig.pubkey_path)]},
            # port 0: many agents on one machine; each reports its address in its status and inventory
            "api": {"listen": "127.0.0.1:0"},
            "download": {
                "timeout": 5.0,
                "retries": 3,
                "backoff_min": 0.1,
                "backoff_max": 0.5,
                "disk_margin": 1 << 20,
            },
        }
        for section, values in (overrides or {}).items():
            if isinstance(values, Mapping):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        self.config_path = self.dir / "agent.toml"
        self.config_path.write_text(to_toml(cfg))
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def start(self, env: Mapping[str, str] | None = None) -> Self:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.ops.cli", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what a power cut or the OOM killer does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait, as systemd stops a service."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait()

    def wait(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def current_image(self) -> str | None:
        """What the device really runs: the ``current`` symlink on its disk."""
        try:
            return Path(os.readlink(self.state_dir / "store" / "current")).name
        except FileNotFoundError:
            return None


class Rig:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(self.workdir / "broker")
        self.bundles_dir = self.workdir / "bundles"
        self.bundles_dir.mkdir(exist_ok=True)
        self.server = BundleServer(self.bundles_dir)
        keys = self.workdir / "keys"
        if not (keys / "signing.key").exists():
            signer.create_keypair(keys)
        self.key = signer.load_private(keys / "signing.key")
        self.pubkey_path = keys / "signing.pub"
        self.operator: OperatorClient | None = None
        self.agents: dict[str, AgentProcess] = {}

    def start(self) -> Self:
        self.broker.start()
        self.server.start()
        cert = self.broker.client_cert("operator")
        self.operator = OperatorClient(
            self.broker.host,
            self.broker.operator_port,
            ca=cert.ca_path,
            cert=cert.cert_path,
            key=cert.key_path,
            prefix=self.broker.prefix,
        )
        self.operator.connect()
        return self

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop(timeout=5.0)
        if self.operator is not None:
            self.operator.close()
            self.operator = None
        self.server.stop()
        self.broker.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def op(self) -> OperatorClient:
        assert self.operator is not None, "rig not started"
        return self.operator

    def add_device(
        self, device_id: str, overrides: Mapping[str, Mapping[str, Any]] | None = None
    ) -> AgentProcess:
        agent = AgentProcess(self, device_id, overrides)
        self.agents[device_id] = agent
        return agent

    def build_bundle(self, name: str, version: str, files: Mapping[str, bytes] | None = None) -> Path:
        """Build a bundle into the server's root (it is then downloadable at ``url_for(path.name)``)."""
        src = self.workdir / "src" / f"{name}-{version}"
        src.mkdir(parents=True, exist_ok=True)
        paths = {}
        for arc, data in (files or {"model.onnx": f"{name} {version}".encode()}).items():
            (src / arc).parent.mkdir(parents=True, exist_ok=True)
            (src / arc).write_bytes(data)
            paths[arc] = src / arc
        out = self.bundles_dir / f"{name}-{version}.tar"
        bundle.build(out, name, version, paths)
        return out

    def manifest(self, device_id: str, bundle_path: Path, generation: int, **over: Any) -> dict[str, Any]:
        meta = bundle.read_metadata(bundle_path)
        doc = new_manifest(
            device_id,
            bundle_path,
            [self.server.url_for(bundle_path.name)],
            name=meta["name"],
            version=str(meta["version"]),
            generation=generation,
            deployment_id=f"dep-{generation}",
        )
        for k, v in over.items():
            if k == "image":
                doc["image"] = {**doc["image"], **v}
            else:
                doc[k] = v
        return doc

    def sign(self, doc: Mapping[str, Any]) -> bytes:
        return mf.sign(doc, self.key)

    def publish(self, device_id: str, data: bytes) -> None:
        self.op.publish_manifest(device_id, data)

    def deploy(self, device_id: str, doc: Mapping[str, Any]) -> None:
        self.publish(device_id, self.sign(doc))

    def wait_status(
        self, device_id: str, predicate: StatusPredicate, timeout: float = 30.0
    ) -> dict[str, Any]:
        try:
            return self.op.wait_for(device_id, predicate, timeout)
        except TimeoutError as exc:
            agent = self.agents.get(device_id)
            tail = agent.log_text()[-3000:] if agent else ""
            raise TimeoutError(f"{exc}\n--- agent log tail ---\n{tail}") from None

    def wait_active(self, device_id: str, generation: int, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(
            device_id, lambda s: s.get("generation") == generation and s.get("state") == "active", timeout
        )


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
