"""Serving: the runtime, the scorer and the API put together, and the deployer's Activator.

An image becomes current in three steps: ``prepare`` loads it beside the serving image and runs its
smoke test through the serving path; the deployer switches ``current`` on disk; ``commit`` swaps
traffic. A failure before the swap leaves the serving image untouched.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.serving.api import ApiServer, ScoringApp, TlsSettings
from agent.serving.commits import CommitWaiter
from agent.serving.runtime import LoadedImage, Runtime, RuntimeSettings
from agent.serving.scoring import Scorer
from agent.telemetry.capture import Capturer, CaptureSettings, RecordSink, UrgentSink
from agent.telemetry.collections import Collections, child_env
from agent.telemetry.metrics import Metrics
from edge_core import manifest as mf
from edge_core.log import get_logger

log = get_logger("serving")


class Serving:
    def __init__(self, cfg: AgentConfig, sink: RecordSink | None = None) -> None:
        self.cfg = cfg
        self.sink = sink
        rc = cfg.runtime
        self.envs_root = cfg.state_dir / "store" / "envs"
        self.runtime = Runtime(
            RuntimeSettings(tuple(rc.execution_providers), rc.intra_op_num_threads, rc.inter_op_num_threads),
            worker_factory=self._make_worker,
        )
        self.scorer = Scorer(inline_max_s=rc.inline_max_ms / 1000)
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=cfg.api.threads, thread_name_prefix="score")
        self.api: ApiServer | None = None
        tc = cfg.telemetry
        self.commits: CommitWaiter | None = None
        if tc.capture_commit == "before_answer" and isinstance(sink, UrgentSink):
            self.commits = CommitWaiter(tc.capture_commit_timeout, self.metrics.commit_timeout)
            sink.add_commit_listener(self.commits.notify)

    def _make_worker(self, image_dir: Path, meta: dict[str, Any], env: dict[str, str] | None = None) -> Any:
        from agent.serving.pyenv import ensure_image_env
        from agent.serving.worker import WorkerPool

        rc = self.cfg.runtime
        python = ensure_image_env(image_dir, self.envs_root, list(meta.get("wheels") or []))
        pool = WorkerPool(
            image_dir,
            python=python,
            size=rc.workers,
            timeout_s=rc.request_timeout,
            init_timeout_s=rc.init_timeout,
            entry_script=str(meta["entry_script"]),
            env=env,
        )
        pool.start()
        return pool

    def start(self, active_dir: Path | None, manifest: mf.Manifest | None) -> None:
        """Load the image that is current on disk (if any) as its deployment configured it, then open
        the API."""
        if active_dir is not None:
            try:
                img = self.runtime.load(
                    active_dir, manifest.runtime if manifest else None, self._worker_env(manifest)
                )
                self._attach_capture(img, manifest)
                self.runtime.swap(img)
            except Exception as exc:  # keep the agent up: it can still take a fixing deployment
                log.error("serving.load_failed", image=active_dir.name[:12], error=str(exc))
        if self.cfg.api.enabled:
            token = self.cfg.api.token_file.read_text().strip() if self.cfg.api.token_file else None
            app = ScoringApp(
                self.runtime,
                self.scorer,
                self.metrics,
                max_body=self.cfg.api.max_body_bytes,
                token=token,
                executor=self.executor,
                commits=self.commits,
            )
            api = self.cfg.api
            tls = TlsSettings(api.cert, api.key, api.client_ca) if api.cert and api.key else None
            self.api = ApiServer(app, api.listen, tls)
            self.api.start()

    def api_stalled_for(self) -> float:
        """How long the API's event loop has not run (0 without an API): for the watchdog."""
        return self.api.stalled_for() if self.api is not None else 0.0

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()  # lets requests in flight finish
        self.runtime.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- deployer.Activator -------------------------------------------------------------------

    def _worker_env(self, manifest: mf.Manifest | None) -> dict[str, str] | None:
        """What the score.py workers must know of the deployment's Azure ML collections."""
        if manifest is None or self.sink is None:
            return None
        dc = manifest.data_collector()
        return child_env(dc, self.cfg.device_id, manifest.image.version) if dc.active else None

    def _attach_collection(self, img: LoadedImage, manifest: mf.Manifest) -> None:
        dc = manifest.data_collector()
        if not dc.active:
            return
        img.collection = Collections(
            self.sink,
            dc,
            device_id=self.cfg.device_id,
            endpoint=img.name,  # Azure ML's endpoint is what clients score: the image, on the edge
            deployment=manifest.deployment_id,
            model_version=img.version,
            max_payload_bytes=int(manifest.data_collection.get("max_payload_bytes", 64 * 1024)),
        )

    def _attach_capture(self, img: LoadedImage, manifest: mf.Manifest | None) -> None:
        if manifest is None or self.sink is None:
            return
        self._attach_collection(img, manifest)
        settings = CaptureSettings.from_manifest(manifest.data_collection)
        if not settings.active:
            return
        lineage = {
            "device_id": self.cfg.device_id, "deployment_id": manifest.deployment_id,
            "rollout_id": manifest.rollout_id, "generation": manifest.generation,
            "image": {"name": img.name, "version": img.version, "sha256": img.sha256},
        }  # fmt: skip
        img.capturer = Capturer(self.sink, settings, lineage, durable=self.commits is not None)

    def prepare(self, image_dir: Path, manifest: mf.Manifest) -> LoadedImage:
        img = self.runtime.load(image_dir, manifest.runtime, self._worker_env(manifest))
        self._attach_capture(img, manifest)
        try:
            took = self.scorer.smoke_test(img)
        except BaseException:
            img.close()
            raise
        log.info(
            "serving.smoke_test_passed" if took is not None else "serving.no_smoke_test",
            image=f"{img.name}:{img.version}",
            seconds=round(took or 0, 4),
        )
        return img

    def commit(self, prepared: LoadedImage) -> None:
        self.runtime.swap(prepared)

    def discard(self, prepared: LoadedImage | None) -> None:
        if prepared is not None:
            prepared.close()

    def describe(self) -> dict[str, Any]:
        img = self.runtime.current
        return {"api": self.api.url if self.api else None, "image": img.describe() if img else None}
