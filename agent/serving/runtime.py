"""The inference runtime: onnxruntime sessions (and score.py workers) for one installed image, and
the atomic swap between images.

An image is loaded *beside* the one serving, smoke-tested through the same code path that serves
requests, and only then made current by swapping one reference. Requests hold the image they started
on until they finish, so a swap never fails a request in flight; the old image is closed when its
last request is done.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.telemetry.capture import Capturer
from agent.telemetry.collections import Collections
from edge_core.errors import ErrorCode, ModelLoadError
from edge_core.log import get_logger
from edge_core.tensors import v2_datatype

log = get_logger("runtime")

DEFAULT_PROVIDERS = (
    "VitisAIExecutionProvider",
    "OpenVINOExecutionProvider",
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeSettings:
    """Resolved from the agent config, overridden per deployment by the manifest's ``runtime``."""

    execution_providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_num_threads: int = 1
    inter_op_num_threads: int = 1

    def merged(self, override: Mapping[str, Any]) -> RuntimeSettings:
        return RuntimeSettings(
            tuple(override.get("execution_providers") or self.execution_providers),
            int(override.get("intra_op_num_threads", self.intra_op_num_threads)),
            int(override.get("inter_op_num_threads", self.inter_op_num_threads)),
        )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str | None  # None for non-tensor values (sequences, maps)
    shape: tuple[int, ...]
    onnx_type: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            a.name, v2_datatype(a.type), tuple(d if isinstance(d, int) else -1 for d in a.shape), a.type
        )
        for a in args
    )


def choose_providers(preference: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this onnxruntime build has, in preference order, CPU always last."""
    chosen = [p for p in preference if p in available and p != CPU]
    return [*chosen, CPU]


@dataclass
class Model:
    name: str
    session: ort.InferenceSession
    provider: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_names: list[str] = field(default_factory=list)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        results = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, results, strict=True))


def load_model(name: str, path: Path, settings: RuntimeSettings) -> Model:
    """A session on the best available provider, falling back down the list (ending on CPU) when a
    provider is present but cannot create this session (driver missing, unsupported operator...)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_num_threads
    opts.inter_op_num_threads = settings.inter_op_num_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = choose_providers(settings.execution_providers, ort.get_available_providers())
    last = ""
    for i in range(len(providers)):
        try:
            sess = ort.InferenceSession(str(path), opts, providers=providers[i:])
        except Exception as exc:  # onnxruntime raises several unrelated types here
            last = f"{type(exc).__name__}: {exc}"
            log.warning("runtime.provider_failed", model=name, provider=providers[i], error=last[:300])
            continue
        outputs = _specs(sess.get_outputs())
        return Model(
            name, sess, sess.get_providers()[0], _specs(sess.get_inputs()), outputs, [o.name for o in outputs]
        )
    raise ModelLoadError(
        ErrorCode.MODEL_LOAD_FAILED,
        f"model {name!r} ({path.name}) could not be loaded: {last}",
        "check that the file is a valid ONNX model for this onnxruntime version",
    )


class LoadedImage:
    """One installed image, ready to serve: its models, and its score.py workers if it has one."""

    def __init__(
        self,
        image_dir: Path,
        meta: Mapping[str, Any],
        models: dict[str, Model],
        settings: RuntimeSettings,
        worker: Any = None,
    ) -> None:
        self.dir = image_dir
        self.sha256 = image_dir.name
        self.name = str(meta.get("name", ""))
        self.version = str(meta.get("version", ""))
        self.meta = meta
        self.models = models
        self.settings = settings
        self.worker = worker
        #: set by serving when the deployment asks for data capture (agent/telemetry/capture.py)
        self.capturer: Capturer | None = None
        #: set by serving when the deployment enables Azure ML collections (agent/telemetry/collections.py)
        self.collection: Collections | None = None
        self._inflight = 0
        self._retired = False
        self._lock = threading.Lock()

    @property
    def entry_script(self) -> str | None:
        entry = self.meta.get("entry_script")
        return str(entry) if entry else None

    def acquire(self) -> None:
        with self._lock:
            self._inflight += 1

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            close = self._retired and self._inflight == 0
        if close:
            self._close_in_background()

    def retire(self) -> None:
        """No new requests will come; close once the ones in flight are done."""
        with self._lock:
            self._retired = True
            close = self._inflight == 0
        if close:
            self._close_in_background()

    def _close_in_background(self) -> None:
        # Stopping score.py workers takes tens of milliseconds; the last request of a retired image
        # releases it on the API's event loop, which must not stall for that.
        threading.Thread(target=self.close, name="image-close", daemon=True).start()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.models.clear()  # sessions are freed with their last reference
        log.info("runtime.image_closed", image=f"{self.name}:{self.version}", sha256=self.sha256[:12])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "sha256": self.sha256,
            "entry_script": self.entry_script,
            "models": {m.name: {"provider": m.provider} for m in self.models.values()},
            "intra_op_num_threads": self.settings.intra_op_num_threads,
            "inter_op_num_threads": self.settings.inter_op_num_threads,
        }  # fmt: skip


def inside(image_dir: Path, rel: str) -> Path:
    """``image_dir / rel``, refused unless it stays inside the image. The store already refused an
    image whose bundle.json names a path that is not one of its files; this holds if the image
    directory was changed by hand after the install."""
    path = (image_dir / rel).resolve()
    if not path.is_relative_to(image_dir.resolve()):
        raise ModelLoadError(
            ErrorCode.MODEL_LOAD_FAILED, f"{rel!r} is outside the image", "rebuild the image"
        )
    return path


def read_meta(image_dir: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((image_dir / "bundle.json").read_bytes())
    return meta


class Runtime:
    """Owns the serving image. ``prepare`` loads and smoke-tests beside it; ``swap`` switches."""

    def __init__(self, settings: RuntimeSettings, worker_factory: Any = None) -> None:
        self.settings = settings
        self._worker_factory = worker_factory
        self._current: LoadedImage | None = None
        self._lock = threading.Lock()
        self.swaps = 0

    @property
    def current(self) -> LoadedImage | None:
        return self._current

    def load(
        self,
        image_dir: Path,
        override: Mapping[str, Any] | None = None,
        worker_env: Mapping[str, str] | None = None,
    ) -> LoadedImage:
        """``worker_env``: more environment for the score.py workers (the deployment's collections)."""
        meta = read_meta(image_dir)
        settings = self.settings.merged(override or {})
        t0 = time.monotonic()
        models = {}
        for m in meta.get("models") or []:
            models[m["name"]] = load_model(m["name"], inside(image_dir, m["file"]), settings)
        worker = None
        if meta.get("entry_script"):
            if self._worker_factory is None:
                raise ModelLoadError(
                    ErrorCode.MODEL_LOAD_FAILED, "this agent cannot run score.py", "upgrade the agent"
                )
            if worker_env:
                worker = self._worker_factory(image_dir, meta, worker_env)
            else:
                worker = self._worker_factory(image_dir, meta)
        img = LoadedImage(image_dir, meta, models, settings, worker)
        log.info(
            "runtime.loaded",
            image=f"{img.name}:{img.version}",
            sha256=img.sha256[:12],
            models={k: v.provider for k, v in models.items()},
            seconds=round(time.monotonic() - t0, 3),
        )
        return img

    def swap(self, img: LoadedImage) -> None:
        with self._lock:
            old, self._current = self._current, img
            self.swaps += 1
        if old is not None and old is not img:
            old.retire()

    def close(self) -> None:
        """At shutdown, after the API stopped (no request in flight): close synchronously."""
        with self._lock:
            old, self._current = self._current, None
        if old is not None:
            old.close()
