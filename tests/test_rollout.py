"""The rollout policy's pure functions: wave plans, device outcomes, wave and gate verdicts, and the
deployment state table. No registry, no broker: data in, verdict out."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from deploy.rollout import (
    COMMANDS,
    TERMINAL,
    TRANSITIONS,
    Gate,
    Policy,
    Window,
    device_outcome,
    gate_verdict,
    next_state,
    plan_waves,
    wave_verdict,
)
from edge_core.errors import ControlPlaneError, ErrorCode

# -- plan_waves ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "kwargs", "expected"),
    [
        (10, {"canary": 1, "growth": 2}, [1, 2, 4, 3]),
        (10, {"canary": 1, "growth": 2, "max_wave": 3}, [1, 2, 3, 3, 1]),
        (10, {"canary": 3, "growth": 1}, [3, 3, 3, 1]),
        (9, {"canary": 3, "growth": 1}, [3, 3, 3]),
        (2, {"canary": 5, "growth": 2}, [2]),
        (1, {"canary": 1, "growth": 2}, [1]),
        (0, {"canary": 1, "growth": 2}, []),
        (10, {"canary": 2, "growth": 1.5}, [2, 3, 5]),
        # a growth barely above 1 still grows each wave by at least one device
        (6, {"canary": 1, "growth": 1.2}, [1, 2, 3]),
        (100, {"canary": 5, "growth": 3, "max_wave": 20}, [5, 15, 20, 20, 20, 20]),
    ],
)
def test_plan_waves(n: int, kwargs: dict[str, Any], expected: list[int]) -> None:
    assert plan_waves(n, Policy(**kwargs)) == expected


@pytest.mark.parametrize(
    ("canary", "growth", "max_wave"),
    list(itertools.product([1, 2, 7], [1, 1.5, 2, 4], [0, 1, 3])),
)
def test_plan_waves_covers_every_device_once(canary: int, growth: float, max_wave: int) -> None:
    policy = Policy(canary=canary, growth=growth, max_wave=max_wave)
    for n in range(0, 40):
        sizes = plan_waves(n, policy)
        assert sum(sizes) == n
        assert all(s >= 1 for s in sizes)
        if sizes:
            assert sizes[0] == min(canary, n, max_wave or n)
        if max_wave:
            assert max(sizes, default=0) <= max_wave


def test_plan_waves_growth_one_gives_equal_waves() -> None:
    sizes = plan_waves(12, Policy(canary=4, growth=1))
    assert sizes == [4, 4, 4]


# -- Policy --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"canary": 0}, "canary"),
        ({"growth": 0.5}, "growth"),
        ({"max_wave": -1}, "max_wave"),
        ({"failure_threshold": 0.5, "success_threshold": 0.5}, "thresholds"),
        ({"failure_threshold": 0.6, "success_threshold": 0.5}, "thresholds"),
        ({"failure_threshold": -0.1}, "thresholds"),
        ({"success_threshold": 1.1}, "thresholds"),
        ({"wave_timeout_s": 0}, "wave_timeout_s"),
        ({"wave_timeout_s": -5}, "wave_timeout_s"),
        ({"gate": Gate(no_data="maybe")}, "no_data"),
    ],
)
def test_policy_refuses_bad_values(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ControlPlaneError) as ei:
        Policy(**kwargs)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert words in ei.value.message


def test_policy_lists_every_problem() -> None:
    with pytest.raises(ControlPlaneError) as ei:
        Policy(canary=0, growth=0, wave_timeout_s=0)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    for words in ("canary", "growth", "wave_timeout_s"):
        assert words in ei.value.message


def test_policy_accepts_boundary_thresholds() -> None:
    p = Policy(failure_threshold=0.0, success_threshold=1.0)
    assert (p.failure_threshold, p.success_threshold) == (0.0, 1.0)
    p = Policy(failure_threshold=0.99, success_threshold=1.0)
    assert p.failure_threshold == 0.99


def test_policy_round_trip() -> None:
    policy = Policy(
        canary=2,
        growth=3.0,
        max_wave=10,
        success_threshold=0.9,
        failure_threshold=0.1,
        wave_timeout_s=120.0,
        auto_rollback=False,
        manifest_ttl_s=3600.0,
        gate=Gate(
            soak_s=30.0,
            max_error_rate=0.05,
            max_error_rate_increase=0.01,
            max_p99_ratio=1.5,
            max_p99_ms=250.0,
            min_requests=50,
            no_data="fail",
        ),
    )
    d = policy.as_dict()
    assert d["gate"]["max_p99_ratio"] == 1.5
    assert Policy.from_dict(d) == policy
    # the registry stores the policy as JSON
    assert Policy.from_dict(json.loads(json.dumps(d))) == policy
    assert Policy.from_dict(Policy().as_dict()) == Policy()
    assert Policy.from_dict({}) == Policy()


def test_gate_enabled_and_relative() -> None:
    assert not Gate().enabled
    assert not Gate(soak_s=10).enabled
    assert not Gate(max_error_rate=0.1).enabled  # no soak: never looks
    assert Gate(soak_s=10, max_p99_ms=100).enabled
    assert not Gate(soak_s=10, max_p99_ms=100, max_error_rate=0.1).relative
    assert Gate(max_p99_ratio=2).relative
    assert Gate(max_error_rate_increase=0.01).relative


# -- device_outcome ------------------------------------------------------------------------------------

DEP = "dep-1"
GEN = 1000


def _status(**kw: Any) -> dict[str, Any]:
    return {"deployment_id": DEP, "generation": GEN, **kw}


def test_device_outcome_active() -> None:
    assert device_outcome(_status(state="active"), DEP, GEN) == ("active", None)


def test_device_outcome_failed_carries_the_error() -> None:
    err = {"code": "digest_mismatch", "message": "bad bytes", "hint": "rebuild"}
    assert device_outcome(_status(state="failed", error=err), DEP, GEN) == ("failed", err)
    assert device_outcome(_status(state="failed"), DEP, GEN) == ("failed", {"code": "failed"})


def test_device_outcome_rolled_back_is_failed() -> None:
    assert device_outcome(_status(state="rolled_back"), DEP, GEN) == ("failed", {"code": "rolled_back"})
    err = {"code": "smoke_test_failed"}
    assert device_outcome(_status(state="rolled_back", error=err), DEP, GEN) == ("failed", err)


@pytest.mark.parametrize("state", ["downloading", "verifying", "installing", "received", None])
def test_device_outcome_pending_while_in_progress(state: str | None) -> None:
    assert device_outcome(_status(state=state), DEP, GEN) == ("pending", None)


def test_device_outcome_no_status_is_pending() -> None:
    assert device_outcome(None, DEP, GEN) == ("pending", None)
    assert device_outcome({}, DEP, GEN) == ("pending", None)


def test_device_outcome_newer_generation_is_superseded() -> None:
    status = {"deployment_id": "dep-2", "generation": GEN + 5, "state": "active"}
    outcome, error = device_outcome(status, DEP, GEN)
    assert outcome == "failed"
    assert error["code"] == "superseded"
    assert str(GEN + 5) in error["message"]
    # the same deployment at a newer generation also means this manifest lost
    outcome, error = device_outcome(_status(generation=GEN + 1, state="active"), DEP, GEN)
    assert (outcome, error["code"]) == ("failed", "superseded")


def test_device_outcome_rejected_message() -> None:
    rejected = {
        "message_sha256": "ab" * 32,
        "code": "manifest_bad_signature",
        "message": "signature does not verify",
        "hint": "check the key",
        "extra": "ignored",
    }
    status = {"deployment_id": "older", "generation": GEN - 10, "state": "active", "rejected": rejected}
    assert device_outcome(status, DEP, GEN, message_sha256="ab" * 32) == (
        "failed",
        {"code": "manifest_bad_signature", "message": "signature does not verify", "hint": "check the key"},
    )
    # a rejection of some other message says nothing about this one
    assert device_outcome(status, DEP, GEN, message_sha256="cd" * 32) == ("pending", None)
    assert device_outcome(status, DEP, GEN) == ("pending", None)


def test_device_outcome_other_deployment_is_pending() -> None:
    status = {"deployment_id": "dep-0", "generation": GEN - 1, "state": "active"}
    assert device_outcome(status, DEP, GEN) == ("pending", None)
    # same generation number, but another deployment's: not ours
    status = {"deployment_id": "dep-0", "generation": GEN, "state": "active"}
    assert device_outcome(status, DEP, GEN) == ("pending", None)


# -- wave_verdict --------------------------------------------------------------------------------------


def test_wave_verdict_default_policy() -> None:
    p = Policy()  # success 1.0, failure 0.0
    assert wave_verdict(["active", "pending"], p, timed_out=False) == "wait"
    assert wave_verdict(["active", "active"], p, timed_out=False) == "pass"
    assert wave_verdict(["failed", "pending", "pending"], p, timed_out=False) == "fail"
    assert wave_verdict(["active", "pending"], p, timed_out=True) == "fail"
    assert wave_verdict([], p, timed_out=False) == "pass"


def test_wave_verdict_fails_fast_past_failure_threshold() -> None:
    p = Policy(failure_threshold=0.25, success_threshold=1.0)
    assert wave_verdict(["failed", "pending", "pending", "pending", "pending"], p, False) == "wait"
    assert wave_verdict(["failed", "failed", "pending", "pending", "pending"], p, False) == "fail"


def test_wave_verdict_hold_between_thresholds() -> None:
    p = Policy(failure_threshold=0.2, success_threshold=0.9)
    outcomes = ["active"] * 4 + ["failed"]  # 20% failed (not above 0.2), 80% active (below 0.9)
    assert wave_verdict(outcomes, p, timed_out=False) == "hold"
    assert wave_verdict(["active"] * 9 + ["failed"], p, timed_out=False) == "pass"
    assert wave_verdict(["active"] * 3 + ["failed"] * 2, p, timed_out=False) == "fail"


def test_wave_verdict_timed_out_counts_pending_as_failed() -> None:
    p = Policy(failure_threshold=0.4, success_threshold=0.5)
    assert wave_verdict(["active", "active", "active", "pending"], p, timed_out=False) == "wait"
    assert wave_verdict(["active", "active", "active", "pending"], p, timed_out=True) == "pass"
    assert wave_verdict(["active", "pending", "pending", "pending"], p, timed_out=True) == "fail"
    p = Policy(failure_threshold=0.4, success_threshold=0.9)
    assert wave_verdict(["active", "active", "active", "pending"], p, timed_out=True) == "hold"


# -- gate_verdict --------------------------------------------------------------------------------------

FULL = Gate(
    soak_s=60,
    max_error_rate=0.05,
    max_error_rate_increase=0.02,
    max_p99_ratio=2.0,
    max_p99_ms=100.0,
    min_requests=20,
)


def test_gate_passes_within_bounds() -> None:
    ok, facts = gate_verdict([Window(100, 1, 20.0)], [Window(100, 2, 30.0)], FULL)
    assert ok is True
    assert facts["violations"] == []
    assert facts["baseline"] == {"requests": 100, "error_rate": 0.01, "p99_ms": 20.0}
    assert facts["current"] == {"requests": 100, "error_rate": 0.02, "p99_ms": 30.0}
    assert "note" not in facts
    assert "no_data" not in facts


def test_gate_aggregates_request_weighted_p99() -> None:
    current = [Window(10, 0, 10.0), Window(30, 3, 50.0), Window(0, 0, 999.0), Window(5, 0, None)]
    ok, facts = gate_verdict([], current, Gate(soak_s=1, max_p99_ms=45.0, min_requests=1))
    assert facts["current"]["requests"] == 45
    assert facts["current"]["p99_ms"] == pytest.approx(40.0)  # (10*10 + 30*50) / 40
    assert facts["current"]["error_rate"] == pytest.approx(3 / 45, abs=1e-6)
    assert ok is True


def test_gate_fails_on_p99_ratio() -> None:
    ok, facts = gate_verdict([Window(100, 0, 20.0)], [Window(100, 0, 50.0)], FULL)
    assert ok is False
    assert len(facts["violations"]) == 1
    assert "max_p99_ratio" in facts["violations"][0]
    assert "2.5x" in facts["violations"][0]


def test_gate_fails_on_absolute_p99() -> None:
    gate = Gate(soak_s=60, max_p99_ms=40.0)
    ok, facts = gate_verdict([Window(100, 0, 45.0)], [Window(100, 0, 50.0)], gate)
    assert ok is False
    assert len(facts["violations"]) == 1
    assert "max_p99_ms" in facts["violations"][0]
    ok, _ = gate_verdict([], [Window(100, 0, 40.0)], gate)
    assert ok is True


def test_gate_fails_on_error_rate() -> None:
    gate = Gate(soak_s=60, max_error_rate=0.05)
    ok, facts = gate_verdict([Window(100, 10, 5.0)], [Window(100, 10, 5.0)], gate)
    assert ok is False
    assert len(facts["violations"]) == 1
    assert "max_error_rate" in facts["violations"][0]
    ok, _ = gate_verdict([], [Window(100, 5, 5.0)], gate)
    assert ok is True  # 5% is not above 5%


def test_gate_fails_on_error_rate_increase() -> None:
    ok, facts = gate_verdict([Window(100, 0, 20.0)], [Window(100, 3, 20.0)], FULL)
    assert ok is False
    assert len(facts["violations"]) == 1
    assert "max_error_rate_increase" in facts["violations"][0]
    ok, facts = gate_verdict([Window(100, 2, 20.0)], [Window(100, 3, 20.0)], FULL)
    assert ok is True, facts


@pytest.mark.parametrize(("no_data", "expected"), [("pass", True), ("fail", False)])
def test_gate_without_enough_requests_follows_no_data(no_data: str, expected: bool) -> None:
    gate = Gate(soak_s=60, max_p99_ms=1.0, min_requests=20, no_data=no_data)
    # p99 far above the bound, but 19 requests are not enough evidence either way
    ok, facts = gate_verdict([Window(100, 0, 5.0)], [Window(19, 19, 500.0)], gate)
    assert ok is expected
    assert facts["no_data"] is True
    assert len(facts["violations"]) == 1
    assert "only 19 requests" in facts["violations"][0]


def test_gate_without_baseline_skips_relative_bounds() -> None:
    # 10x the baseline's p99 and errors risen by 4 points: would fail, but the baseline has 5 requests
    baseline = [Window(5, 0, 10.0)]
    current = [Window(100, 4, 100.0)]
    ok, facts = gate_verdict(baseline, current, FULL)
    assert ok is True, facts
    assert facts["violations"] == []
    assert "no baseline" in facts["note"]
    # absolute bounds still apply without a baseline
    ok, facts = gate_verdict(baseline, [Window(100, 4, 150.0)], FULL)
    assert ok is False
    assert len(facts["violations"]) == 1
    assert "max_p99_ms" in facts["violations"][0]
    assert "note" in facts


def test_gate_without_baseline_and_absolute_only_has_no_note() -> None:
    ok, facts = gate_verdict([], [Window(100, 0, 10.0)], Gate(soak_s=60, max_p99_ms=50.0))
    assert ok is True
    assert "note" not in facts


# -- the state table -----------------------------------------------------------------------------------

EXPECTED_TRANSITIONS = {
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
STATES = sorted({s for s, _ in EXPECTED_TRANSITIONS} | set(EXPECTED_TRANSITIONS.values()))
EVENTS = sorted({e for _, e in EXPECTED_TRANSITIONS})


def test_transition_table_is_the_documented_one() -> None:
    assert TRANSITIONS == EXPECTED_TRANSITIONS
    assert set(TERMINAL) == {"succeeded", "aborted", "rolled_back"}
    assert set(COMMANDS) <= set(EVENTS)


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED_TRANSITIONS))
def test_next_state_allowed(state: str, event: str) -> None:
    assert next_state(state, event) == EXPECTED_TRANSITIONS[(state, event)]


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in STATES for e in EVENTS if (s, e) not in EXPECTED_TRANSITIONS],
)
def test_next_state_forbidden(state: str, event: str) -> None:
    with pytest.raises(ControlPlaneError) as ei:
        next_state(state, event)
    assert ei.value.code == ErrorCode.DEPLOYMENT_STATE_CONFLICT
    assert state in ei.value.message


def test_next_state_forbidden_message() -> None:
    with pytest.raises(ControlPlaneError) as ei:
        next_state("succeeded", "pause")
    assert ei.value.code == ErrorCode.DEPLOYMENT_STATE_CONFLICT
    assert ei.value.message == "a deployment that is succeeded cannot pause"
    assert "it is finished" in ei.value.hint
    with pytest.raises(ControlPlaneError) as ei:
        next_state("rolling_back", "wave_passed_last")
    assert ei.value.message == "a deployment that is rolling_back cannot wave passed last"
    assert "wait for it to settle" in ei.value.hint
