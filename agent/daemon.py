"""Wires the agent together and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import inventory
from agent import manifest as mf
from agent.config import AgentConfig
from agent.deployer import Deployer
from agent.errors import ConfigError
from agent.fetch import Fetcher
from agent.log import get_logger
from agent.mqtt_channel import MqttChannel
from agent.serving import Serving
from agent.state import StateDB
from agent.store import BundleStore

log = get_logger("agent")


def load_trusted_keys(cfg: AgentConfig) -> dict[str, Ed25519PublicKey]:
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


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = StateDB(cfg.state_dir / "agent.db")
        self.store = BundleStore(cfg.state_dir / "store", keep_images=cfg.store.keep_images)
        self.fetcher = Fetcher(cfg.download)
        self.channel = MqttChannel(cfg.device_id, cfg.mqtt)
        self.serving = Serving(cfg)
        self.deployer = Deployer(
            cfg.device_id,
            self.db,
            self.store,
            self.fetcher,
            load_trusted_keys(cfg),
            self.channel.report_status,
            cfg.download.disk_margin,
            activator=self.serving,
        )
        self._stop = threading.Event()

    def _on_connect(self) -> None:
        inv = inventory.collect(self.cfg.device_id, self.cfg.state_dir)
        inv["runtime"] = {
            **self.serving.describe(),
            "execution_providers_preference": self.cfg.runtime.execution_providers,
            "intra_op_num_threads": self.cfg.runtime.intra_op_num_threads,
            "inter_op_num_threads": self.cfg.runtime.inter_op_num_threads,
        }
        self.channel.report_inventory(inv)
        self.deployer.publish()

    def run(self) -> int:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("agent.stopping", signal=signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info(
            "agent.starting",
            device_id=self.cfg.device_id,
            broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
            state_dir=str(self.cfg.state_dir),
            trusted_keys=len(self.deployer.trusted_keys),
        )
        active = self.store.active()
        row = self.db.last_active_with_digest(active) if active else None
        override = dict(mf.Manifest.from_payload(row.payload).runtime) if row else None
        self.serving.start(self.store.image_dir(active) if active else None, override)
        worker = threading.Thread(target=self.deployer.run, name="deployer", daemon=True)
        # Resume an interrupted deployment before taking new manifests: the worker recovers first,
        # and manifests that arrive meanwhile wait in the deployer's intake.
        worker.start()
        self.channel.start(self.deployer.submit, self._on_connect)
        while not self._stop.wait(1.0):
            if not worker.is_alive():
                log.error("agent.deployer_died")
                return 1
        self.deployer.stop()
        worker.join(timeout=10.0)
        self.serving.stop()
        self.channel.stop()
        self.fetcher.close()
        self.db.close()
        log.info("agent.stopped")
        return 0
