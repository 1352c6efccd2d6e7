"""Staged fleet rollouts: waves, thresholds, model-level health gates, automatic rollback.

Two halves: :mod:`deploy.rollout.policy` decides (pure: observations and the time in, decisions
out), :mod:`deploy.rollout.driver` acts (reads the registry and the devices' reports, signs and
publishes manifests, records, sleeps). The names below are re-exported so that importers written
before the split, and branches still being merged, keep working.
"""

from deploy.rollout.driver import Driver, Fleet, command, summary
from deploy.rollout.policy import (
    COMMANDS,
    TERMINAL,
    TRANSITIONS,
    Decision,
    Gate,
    Policy,
    Window,
    device_outcome,
    gate_verdict,
    next_state,
    plan_waves,
    wave_verdict,
)

__all__ = [
    "COMMANDS",
    "TERMINAL",
    "TRANSITIONS",
    "Decision",
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
