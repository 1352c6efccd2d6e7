"""The ``config`` check: the agent's config loads and validates. Every other check reads it, so when
it fails the doctor reports nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from agent import config as config_mod
from agent.config import AgentConfig
from agent.ops.doctor.report import Result
from agent.ops.wiring import validate_for_run
from edge_core.errors import ConfigError


def _env_name(field: str) -> str:
    base = field.split("[", 1)[0]
    return config_mod.ENV_PREFIX + base.upper().replace(".", "__")


def check_config(path: Path | None, env: Mapping[str, str]) -> tuple[AgentConfig | None, Result]:
    try:
        cfg = config_mod.load(path, env=env)
        validate_for_run(cfg)  # what `edge-agent run` refuses at start, doctor fails
    except ConfigError as exc:
        if exc.field == "--config":
            hint = "give --config the agent's TOML config file and fix its TOML syntax"
        else:
            var = _env_name(exc.field)
            where = f"in {path}" if path is not None else "in the config"
            hint = f"fix {exc.field} {where}" + (
                f"; it is also set in the environment ({var})" if var in env else f" (or {var})"
            )
            if path is None:
                hint += (
                    "; give --config the agent's config file (the service's is /etc/edge-agent/agent.toml)"
                )
        return None, Result("config", "fail", exc.message, hint)
    src = str(path) if path is not None else "defaults and environment"
    return cfg, Result(
        "config",
        "ok",
        f"{src} loads and validates (device_id {cfg.device_id}, transport {cfg.transport}, "
        f"state_dir {cfg.state_dir})",
    )
