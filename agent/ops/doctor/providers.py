"""The ``onnxruntime`` check: onnxruntime imports, and the execution provider it would use is the one
runtime.execution_providers asks for."""

from __future__ import annotations

from agent.config import AgentConfig, RuntimeConfig
from agent.ops.doctor.report import Result


def check_onnxruntime(cfg: AgentConfig) -> list[Result]:
    try:
        import onnxruntime as ort

        from agent.serving.runtime import CPU, choose_providers

        available = list(ort.get_available_providers())
        version = str(ort.__version__)
    except Exception as exc:  # a broken install raises anything from ImportError to OSError
        return [
            Result(
                "onnxruntime",
                "fail",
                f"onnxruntime cannot be imported: {exc}",
                "reinstall the agent's Python environment (onnxruntime, or the build for the device's "
                "accelerator)",
            )
        ]
    preference = cfg.runtime.execution_providers
    chosen = choose_providers(preference, available)[0]
    msg = f"onnxruntime {version} would use {chosen}; available: {', '.join(available) or 'none'}"
    first = preference[0] if preference else CPU
    # The default list means "whatever accelerator this host has": CPU on a CPU-only host is what
    # was asked for. Only a list the operator wrote himself says an accelerator is expected.
    chose_list = preference != RuntimeConfig().execution_providers
    if chosen == CPU and first != CPU and chose_list:
        return [
            Result(
                "onnxruntime",
                "warn",
                f"onnxruntime {version} would use {chosen}: no accelerator of runtime.execution_providers "
                f"({first} first) is in this build (available: {', '.join(available) or 'none'})",
                "install the accelerator's onnxruntime build and drivers (onnxruntime-gpu, "
                "onnxruntime-openvino, the Vitis AI runtime), or put CPUExecutionProvider first in "
                "runtime.execution_providers",
            )
        ]
    return [Result("onnxruntime", "ok", msg)]
