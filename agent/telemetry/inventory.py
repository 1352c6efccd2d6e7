"""What this device is and can do, published (retained) on every connect."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import psutil

from agent import __version__


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def execution_providers() -> list[str]:
    """onnxruntime's providers available on this host (Vitis AI, OpenVINO, TensorRT, CUDA, CPU...)."""
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # a broken onnxruntime install must not stop the agent from reporting it
        return []


def collect(device_id: str, state_dir: Path) -> dict[str, Any]:
    disk = shutil.disk_usage(state_dir)
    mem = psutil.virtual_memory()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except Exception:
        ort_version = None
    return {
        "schema_version": 1,
        "device_id": device_id,
        "agent_version": __version__,
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "cpu": {"count": os.cpu_count(), "model": _cpu_model()},
        "memory_bytes": mem.total,
        "disk": {"path": str(state_dir), "total_bytes": disk.total, "free_bytes": disk.free},
        "onnxruntime": {"version": ort_version, "execution_providers": execution_providers()},
    }
