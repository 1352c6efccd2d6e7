"""The rollout policy: what a staged rollout decides, from what it observed. Pure: no registry, no
broker, no clock, no logging. Time comes in as an argument (``now``), the devices' reports and
heartbeats as plain data, and the answer goes out as a value. :mod:`deploy.rollout.driver` does the
reading, publishing and waiting around it, the way python-tuf keeps ``TrustedMetadataSet`` apart
from ``Updater``: every decision can then be tested as a table, without a broker or a registry.

The deployment's states, as one table (docs/control-plane.md):

    running       --wave_passed (last wave)-->   succeeded
    running       --wave_failed-->               rolling_back   (automatic: past the failure threshold,
                                                                  or a health gate failed)
    running       --wave_held-->                 paused         (between the two thresholds)
    running       --pause-->                     paused
    paused        --resume-->                    running
    running|paused --abort-->                    aborted        (no more waves; devices keep what they run)
    running|paused|succeeded|aborted --rollback--> rolling_back
    rolling_back  --reverted-->                  rolled_back

A device in a deployment: pending -> updating -> active | failed; after a rollback of an active one:
reverting -> reverted | revert_failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_core.errors import ControlPlaneError, ErrorCode

TRANSITIONS: dict[tuple[str, str], str] = {
    ("running", "wave_passed_last"): "succeeded",
    ("running", "wave_failed"): "rolling_back",
    ("running", "wave_held"): "paused",
    ("running", "pause"): "paused",
    ("paused", "resume"): "running",
    ("running", "abort"): "aborted",
    ("paused", "abort"): "aborted",
    ("running", "rollback"): "rolling_back",
    ("paused", "rollback"): "rolling_back",
    ("succeeded", "rollback"): "rolling_back",
    ("aborted", "rollback"): "rolling_back",
    ("rolling_back", "reverted"): "rolled_back",
}
TERMINAL = ("succeeded", "aborted", "rolled_back")
COMMANDS = ("pause", "resume", "abort", "rollback")


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ControlPlaneError(
            ErrorCode.DEPLOYMENT_STATE_CONFLICT,
            f"a deployment that is {state} cannot {event.replace('_', ' ')}",
            "see `edge-deploy deploy show` for its state; "
            + ("it is finished" if state in TERMINAL else "wait for it to settle"),
        ) from None


def transition(
    state: str, phase: str | None, event: str, reason: Any, now: float
) -> tuple[str, dict[str, Any]]:
    """The deployment's next state and the fields to record with it."""
    new = next_state(state, event)
    fields: dict[str, Any] = {"state": new, "reason": reason}
    if event == "resume":
        # The wave's clock starts again: time spent paused is not the devices' fault. A held wave
        # resumed is one the operator accepted.
        fields["phase_since"] = now
        if phase == "held":
            fields["phase"] = "next"
    elif event == "wave_held":
        fields["phase"] = "held"
    elif new != "paused":
        fields.update(phase=None, phase_since=now)
    return new, fields


# -- the policy's settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """A model-level health gate: after a wave is active, its devices serve for ``soak_s`` seconds and
    their heartbeats on the new image are compared with the same devices' heartbeats on the image they
    ran before. Any bound left None is not checked."""

    soak_s: float = 0.0
    #: error rate on the new image, absolute (0.05 = 5% of requests answered 4xx/5xx)
    max_error_rate: float | None = None
    #: error rate on the new image minus the baseline's, absolute
    max_error_rate_increase: float | None = None
    #: p99 latency on the new image divided by the baseline's
    max_p99_ratio: float | None = None
    #: p99 latency on the new image, milliseconds
    max_p99_ms: float | None = None
    #: fewer requests than this in the soak window: not enough evidence, and ``no_data`` decides
    min_requests: int = 20
    #: "pass" or "fail" when a wave's devices served fewer than ``min_requests`` during the soak
    no_data: str = "pass"

    @property
    def enabled(self) -> bool:
        return self.soak_s > 0 and any(
            b is not None
            for b in (self.max_error_rate, self.max_error_rate_increase, self.max_p99_ratio, self.max_p99_ms)
        )

    @property
    def relative(self) -> bool:
        return self.max_error_rate_increase is not None or self.max_p99_ratio is not None


@dataclass(frozen=True)
class Policy:
    #: devices in the first wave
    canary: int = 1
    #: each later wave is this many times the previous one
    growth: float = 2.0
    #: no wave is larger than this (0: no limit)
    max_wave: int = 0
    #: a wave passes when at least this fraction of its devices is active
    success_threshold: float = 1.0
    #: a wave fails (and the rollout rolls back) when more than this fraction of its devices failed
    failure_threshold: float = 0.0
    #: seconds a wave waits for its devices; a device silent that long counts as failed
    wave_timeout_s: float = 600.0
    #: roll the updated devices back by itself when a wave fails
    auto_rollback: bool = True
    #: lifetime of the manifests it signs
    manifest_ttl_s: float = 7 * 24 * 3600
    gate: Gate = field(default_factory=Gate)

    def __post_init__(self) -> None:
        problems = []
        if self.canary < 1:
            problems.append("canary must be at least 1")
        if self.growth < 1:
            problems.append("growth must be at least 1")
        if self.max_wave < 0:
            problems.append("max_wave must be 0 (no limit) or positive")
        if not 0 <= self.failure_threshold < self.success_threshold <= 1:
            problems.append("thresholds need 0 <= failure_threshold < success_threshold <= 1")
        if self.wave_timeout_s <= 0:
            problems.append("wave_timeout_s must be positive")
        if self.gate.no_data not in ("pass", "fail"):
            problems.append("gate.no_data is 'pass' or 'fail'")
        if problems:
            raise ControlPlaneError(ErrorCode.INVALID_ARGUMENT, "; ".join(problems), "fix the rollout policy")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        d = dict(d)
        gate = Gate(**d.pop("gate", {}))
        return cls(**d, gate=gate)


def plan_waves(n: int, policy: Policy) -> list[int]:
    """Wave sizes for ``n`` devices: the canary, then waves growing by ``growth``."""
    sizes: list[int] = []
    size = float(min(policy.canary, n))
    left = n
    while left > 0:
        k = max(1, min(left, math.ceil(size)))
        if policy.max_wave:
            k = min(k, policy.max_wave)
        sizes.append(k)
        left -= k
        size = max(size * policy.growth, size + 1) if policy.growth > 1 else size
    return sizes


# -- devices -------------------------------------------------------------------------------------------


def device_outcome(
    status: Mapping[str, Any] | None, deployment_id: str, generation: int, message_sha256: str | None = None
) -> tuple[str, Any]:
    """What a device's retained status says of one manifest: ("active" | "failed" | "pending", error)."""
    if not status:
        return "pending", None
    gen = status.get("generation")
    if status.get("deployment_id") == deployment_id and gen == generation:
        state = status.get("state")
        if state == "active":
            return "active", None
        if state in ("failed", "rolled_back"):
            return "failed", status.get("error") or {"code": state}
        return "pending", None
    if isinstance(gen, int) and gen > generation:
        return "failed", {"code": "superseded", "message": f"the device took generation {gen} instead"}
    rejected = status.get("rejected") or {}
    if message_sha256 and rejected.get("message_sha256") == message_sha256:
        return "failed", {k: rejected.get(k) for k in ("code", "message", "hint")}
    return "pending", None


def update_outcome(
    status: Mapping[str, Any] | None,
    deployment_id: str,
    generation: int,
    message_sha256: str | None,
    published_at: float | None,
    now: float,
    policy: Policy,
) -> tuple[str, Any]:
    """An updating device's outcome: :func:`device_outcome`, or "failed" once it stayed silent past the
    wave timeout."""
    outcome, error = device_outcome(status, deployment_id, generation, message_sha256)
    if outcome == "pending" and now - (published_at or now) > policy.wave_timeout_s:
        return "failed", {
            "code": "timeout",
            "message": f"no status for this deployment within {policy.wave_timeout_s:g}s",
        }
    return outcome, error


def revert_outcome(
    status: Mapping[str, Any] | None,
    revert_id: str,
    generation: int,
    reverting_since: float | None,
    now: float,
    policy: Policy,
) -> tuple[str, Any]:
    """A reverting device's outcome: ("reverted" | "revert_failed" | "pending", error)."""
    outcome, error = device_outcome(status, revert_id, generation)
    if outcome == "pending" and now - (reverting_since or now) > policy.wave_timeout_s:
        outcome, error = "failed", {"code": "timeout", "message": "no status for the rollback"}
    if outcome == "pending":
        return "pending", None
    return ("reverted" if outcome == "active" else "revert_failed"), error


# -- waves ---------------------------------------------------------------------------------------------


def wave_verdict(outcomes: Sequence[str], policy: Policy, timed_out: bool) -> str:
    """'wait', 'pass', 'hold' or 'fail' for one wave's device outcomes."""
    n = len(outcomes)
    if n == 0:
        return "pass"
    failed = sum(o == "failed" for o in outcomes)
    active = sum(o == "active" for o in outcomes)
    pending = n - failed - active
    if failed / n > policy.failure_threshold:
        return "fail"  # known already: no need to wait for the rest
    if pending and not timed_out:
        return "wait"
    if timed_out:
        failed += pending  # a device that never answered counts as failed
        if failed / n > policy.failure_threshold:
            return "fail"
    return "pass" if active / n >= policy.success_threshold else "hold"


@dataclass(frozen=True)
class Decision:
    """What the driver does next with the wave it is on."""

    #: "wait" (look again at the next step), "soak" (start the health gate's soak), "pass" (the wave
    #: passed), or an event of TRANSITIONS to apply ("wave_failed", "wave_held")
    action: str
    #: what the driver records with the action's event
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: the numbers a health gate judged by (``gate_verdict``), for its gate_passed/gate_failed event
    facts: Mapping[str, Any] = field(default_factory=dict)


def _failure(policy: Policy, reason: str, detail: Mapping[str, Any], facts: Mapping[str, Any]) -> Decision:
    if policy.auto_rollback:
        return Decision("wave_failed", {**detail, "reason": reason}, facts)
    # without auto_rollback a failed wave waits for the operator, who may still roll back by hand
    return Decision("wave_held", {**detail, "reason": reason + " (auto_rollback is off)"}, facts)


def judge_wave(
    wave: int, member_states: Sequence[str], policy: Policy, waiting_since: float, now: float
) -> Decision:
    """The decision on a published wave from its devices' states (as the registry records them)."""
    outcomes = [s if s in ("active", "failed") else "pending" for s in member_states]
    timed_out = now - waiting_since > policy.wave_timeout_s
    verdict = wave_verdict(outcomes, policy, timed_out)
    if verdict == "wait":
        return Decision("wait")
    counts = {o: outcomes.count(o) for o in ("active", "failed", "pending")}
    if verdict == "fail":
        reason = f"wave {wave}: {counts['failed']} of {len(outcomes)} device(s) failed"
        return _failure(policy, reason, {"wave": wave, **counts}, {})
    if verdict == "hold":
        return Decision(
            "wave_held", {"wave": wave, **counts, "reason": f"wave {wave} below the success threshold"}
        )
    if policy.gate.enabled:
        return Decision("soak", {"wave": wave, "seconds": policy.gate.soak_s})
    return Decision("pass")


# -- health gates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    requests: int
    errors: int
    p99_ms: float | None


def _aggregate(windows: Sequence[Window]) -> tuple[int, float, float | None]:
    """Requests, error rate, and p99: the request-weighted mean of the windows' p99s (each window is
    one device over one heartbeat interval)."""
    req = sum(w.requests for w in windows)
    err = sum(w.errors for w in windows)
    weighted = [(w.p99_ms, w.requests) for w in windows if w.p99_ms is not None and w.requests]
    total = sum(n for _, n in weighted)
    p99 = sum(p * n for p, n in weighted) / total if total else None
    return req, (err / req if req else 0.0), p99


def gate_verdict(
    baseline: Sequence[Window],
    current: Sequence[Window],
    gate: Gate,
    compared: Sequence[Window] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Whether the new image serves within the gate's bounds; the numbers it judged by.

    ``compared`` is the part of ``current`` served by devices that ran an image before the wave
    (default: all of it): only they have a baseline, so only they are held to the relative bounds.
    Devices on their first image are judged on the absolute bounds alone; an empty ``compared`` (a
    first deployment) skips the relative bounds."""
    b_req, b_rate, b_p99 = _aggregate(baseline)
    c_req, c_rate, c_p99 = _aggregate(current)
    first_image = compared is not None and not compared
    _, r_rate, r_p99 = (c_req, c_rate, c_p99) if compared is None else _aggregate(compared)
    facts: dict[str, Any] = {
        "baseline": {"requests": b_req, "error_rate": round(b_rate, 6), "p99_ms": b_p99},
        "current": {"requests": c_req, "error_rate": round(c_rate, 6), "p99_ms": c_p99},
        "violations": [],
    }
    if c_req < gate.min_requests:
        facts["violations"].append(
            f"only {c_req} requests on the new image (min_requests {gate.min_requests})"
        )
        facts["no_data"] = True
        return gate.no_data == "pass", facts
    v = facts["violations"]
    if gate.max_error_rate is not None and c_rate > gate.max_error_rate:
        v.append(f"error rate {c_rate:.4f} > max_error_rate {gate.max_error_rate}")
    have_baseline = b_req >= gate.min_requests and not first_image
    if (
        have_baseline
        and gate.max_error_rate_increase is not None
        and r_rate - b_rate > gate.max_error_rate_increase
    ):
        v.append(
            f"error rate rose {r_rate - b_rate:+.4f} > max_error_rate_increase {gate.max_error_rate_increase}"
        )
    if c_p99 is not None and gate.max_p99_ms is not None and c_p99 > gate.max_p99_ms:
        v.append(f"p99 {c_p99:.2f} ms > max_p99_ms {gate.max_p99_ms}")
    if (
        r_p99 is not None
        and have_baseline
        and b_p99
        and gate.max_p99_ratio is not None
        and r_p99 / b_p99 > gate.max_p99_ratio
    ):
        v.append(
            f"p99 {r_p99:.2f} ms is {r_p99 / b_p99:.1f}x the baseline {b_p99:.2f} ms "
            f"> max_p99_ratio {gate.max_p99_ratio}"
        )
    if gate.relative and first_image:
        facts["note"] = "first image on these devices: no baseline exists; relative bounds skipped"
    elif gate.relative and not have_baseline:
        facts["note"] = (
            f"no baseline: the same devices served {b_req} requests before; relative bounds skipped"
        )
    return not v, facts


def baseline_window(gate: Gate, until: float) -> tuple[float, float]:
    """Where a wave's baseline heartbeats lie: the two soak periods before ``until`` (the wave's
    publication). One definition for the wait before publishing and for the gate's verdict."""
    return until - 2 * max(gate.soak_s, 1.0), until


def awaits_baseline(gate: Gate, running: Sequence[bool]) -> bool:
    """Whether a wave waits for baseline evidence before it is published. ``running`` says, for each
    of its devices, whether it serves an image now (a device that never reported may: True). Only
    relative bounds need a baseline, and a device on its first image can never have one: a first
    deployment publishes at once and is judged on the absolute bounds."""
    return gate.enabled and gate.relative and any(running)


def baseline_ready(gate: Gate, baseline: Sequence[Window], since: float, now: float) -> bool:
    """Whether a wave waiting for its baseline may be published: enough requests seen, or a soak
    period waited, after which a missing baseline only skips the gate's relative bounds."""
    return sum(w.requests for w in baseline) >= gate.min_requests or now - since >= gate.soak_s


def soak_elapsed(gate: Gate, since: float, now: float) -> bool:
    return now - since >= gate.soak_s


def judge_soak(
    wave: int,
    policy: Policy,
    baseline: Sequence[Window],
    current: Sequence[Window],
    compared: Sequence[Window] | None = None,
) -> Decision:
    """The decision on a wave whose soak is over, from its devices' heartbeats before and after
    (``compared``: as in :func:`gate_verdict`)."""
    ok, facts = gate_verdict(baseline, current, policy.gate, compared)
    if ok:
        return Decision("pass", facts=facts)
    return _failure(policy, f"wave {wave}: health gate failed: {'; '.join(facts['violations'])}", {}, facts)


# -- reports -------------------------------------------------------------------------------------------


def summarize(
    dep: Mapping[str, Any], members: Sequence[Mapping[str, Any]], image_ref: str, models: Sequence[str]
) -> dict[str, Any]:
    """A deployment with its devices' progress, for `deploy show` and progress bars."""
    counts: dict[str, int] = {}
    for m in members:
        counts[m["state"]] = counts.get(m["state"], 0) + 1
    return {
        "id": dep["id"],
        "image": image_ref,
        "models": list(models),
        "state": dep["state"],
        "reason": dep["reason"],
        "wave": dep["wave"],
        "waves": max((m["wave"] for m in members), default=0),
        "phase": dep["phase"],
        "target": dep["target"],
        "devices": len(members),
        "counts": counts,
        "policy": dep["policy"],
        "created_at": dep["created_at"],
        "updated_at": dep["updated_at"],
        "members": [
            {k: m[k] for k in ("device_id", "wave", "state", "generation", "error")} for m in members
        ],
    }
