"""Wires the agent together and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import inventory
from agent import manifest as mf
from agent.buffer import Buffer, RecordClass
from agent.config import AgentConfig
from agent.deployer import Deployer
from agent.errors import ConfigError
from agent.fetch import Fetcher
from agent.log import get_logger
from agent.mqtt_channel import MqttChannel
from agent.serving import Serving
from agent.state import StateDB
from agent.store import BundleStore
from agent.telemetry import Telemetry
from cloud_sync.backend import BlobError, open_backend
from cloud_sync.uploader import Uploader

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
        tc = cfg.telemetry
        self.buffer = Buffer(
            cfg.state_dir / "telemetry.db",
            budget_bytes=tc.buffer_budget_bytes,
            flush_interval_s=tc.flush_interval,
            max_record_bytes=tc.max_record_bytes,
        )
        self.serving = Serving(cfg, sink=self.buffer)
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
        sc = cfg.sync
        # The embedded default store is created; a configured directory must exist (it is a mount).
        opts = {} if sc.url else {"create": True}
        try:
            self.backend = open_backend(
                sc.url or (cfg.state_dir / "outbox").as_uri(), retries=sc.retries, backoff_min=sc.backoff_min,
                backoff_max=sc.backoff_max, bandwidth=sc.bandwidth or None, should_stop=self._stop.is_set,
                **opts,
            )  # fmt: skip
        except BlobError as exc:
            raise ConfigError("sync.url", exc.message + (f" ({exc.hint})" if exc.hint else "")) from None
        self.uploader = Uploader(
            self.buffer, self.backend, cfg.device_id, self.db, batch_max_records=sc.batch_max_records,
            batch_max_bytes=sc.batch_max_bytes, max_batch_age_s=sc.max_batch_age, interval_s=sc.interval,
            compress_level=sc.compress_level,
        )  # fmt: skip
        self.serving.metrics.telemetry_source = self._telemetry_state
        self.telemetry = Telemetry(
            cfg.device_id, cfg.state_dir, self.serving.metrics,
            put=lambda cls, payload, ts: self.buffer.put(RecordClass(cls), payload, ts=ts),
            heartbeat=self.channel.report_heartbeat,
            extra=self._telemetry_state,
            interval_s=cfg.telemetry.interval,
        )  # fmt: skip

    def _telemetry_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.stats(), "sync": self.uploader.state.as_dict()}

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
        self.buffer.start()
        self.serving.start(
            self.store.image_dir(active) if active else None,
            mf.Manifest.from_payload(row.payload) if row else None,
        )
        self.telemetry.start()
        self.uploader.start()
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
        self.serving.stop()  # requests in flight finish first: their captures reach the buffer
        self.telemetry.stop()
        self.uploader.stop()
        self.buffer.close()  # commits what is queued
        self.backend.close()
        self.channel.stop()
        self.fetcher.close()
        self.db.close()
        log.info("agent.stopped")
        return 0
