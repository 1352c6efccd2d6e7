"""Every config key (the agent's and the control plane's) is in docs/config.md, and every metric the
agent registers is in docs/monitoring.md: a key or a metric added without its documentation fails here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.telemetry.metrics import Metrics
from deploy.config import ControlPlaneConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def keys(cls: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_every_config_key_is_documented() -> None:
    # Each side's keys in its own section: both have an [api], and one must not document the other.
    agent_text, _, plane_text = (DOCS / "config.md").read_text().partition("\n## The control plane")
    agent = [k for k in keys(AgentConfig) if f"| `{k}` |" not in agent_text]
    plane = [
        k for k in keys(ControlPlaneConfig) if k != "home" and f"| `{k}` |" not in plane_text
    ]  # home is --home, never a key
    missing = agent + plane
    assert not missing, f"document these keys in docs/config.md: {missing}"


def test_every_metric_is_documented() -> None:
    text = (DOCS / "monitoring.md").read_text()
    names = {m.name for m in Metrics().registry.collect()}
    missing = sorted(n for n in names if n not in text)
    assert not missing, f"document these metrics in docs/monitoring.md: {missing}"
