"""Staged fleet rollouts (deploy/rollout/policy.py, moved here whole; the next commit splits the
driver out of it). The names are re-exported so that ``deploy.rollout`` imports keep working."""

from deploy.rollout.policy import (
    COMMANDS,
    TERMINAL,
    TRANSITIONS,
    Driver,
    Fleet,
    Gate,
    Policy,
    Window,
    command,
    device_outcome,
    gate_verdict,
    next_state,
    plan_waves,
    summary,
    wave_verdict,
)

__all__ = [
    "COMMANDS",
    "TERMINAL",
    "TRANSITIONS",
    "Driver",
    "Fleet",
    "Gate",
    "Policy",
    "Window",
    "command",
    "device_outcome",
    "gate_verdict",
    "next_state",
    "plan_waves",
    "summary",
    "wave_verdict",
]
