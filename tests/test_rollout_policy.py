"""deploy/rollout/policy.py, table by table (as python-tuf tests its TrustedMetadataSet): every
decision from constructed observations and a given time. No registry, no broker, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.rollout.policy import (
    COMMANDS,
    TERMINAL,
    TRANSITIONS,
    Decision,
    Gate,
    Policy,
    Window,
    awaits_baseline,
    baseline_ready,
    baseline_window,
    judge_soak,
    judge_wave,
    next_state,
    plan_waves,
    revert_outcome,
    soak_elapsed,
    summarize,
    transition,
    update_outcome,
)
from edge_core.errors import ControlPlaneError, ErrorCode

# -- the state table: every (state, event), the refused ones included ----------------------------------

EVENTS = ("wave_passed_last", "wave_failed", "wave_held", "pause", "resume", "abort", "rollback", "reverted")
R, P, S, A, RB, RD = "running", "paused", "succeeded", "aborted", "rolling_back", "rolled_back"
# fmt: off
TABLE: dict[str, tuple[str | None, ...]] = {
    #      wave_passed_last  wave_failed  wave_held  pause  resume  abort  rollback  reverted
    R:    (S,                RB,          P,         P,     None,   A,     RB,       None),
    P:    (None,             None,        None,      None,  R,      A,     RB,       None),
    S:    (None,             None,        None,      None,  None,   None,  RB,       None),
    A:    (None,             None,        None,      None,  None,   None,  RB,       None),
    RB:   (None,             None,        None,      None,  None,   None,  None,     RD),
    RD:   (None,             None,        None,      None,  None,   None,  None,     None),
}
# fmt: on
CASES = [(state, event, row[i]) for state, row in TABLE.items() for i, event in enumerate(EVENTS)]


def test_the_matrix_covers_every_state_and_event_of_the_table() -> None:
    states = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    assert states == set(TABLE)
    assert {e for _, e in TRANSITIONS} == set(EVENTS)
    assert {(s, e): n for s, e, n in CASES if n is not None} == TRANSITIONS
    assert set(TERMINAL) == {S, A, RD}
    assert set(COMMANDS) == {"pause", "resume", "abort", "rollback"}


@pytest.mark.parametrize(("state", "event", "expected"), CASES)
def test_every_state_and_event(state: str, event: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ControlPlaneError) as ei:
            transition(state, "waiting", event, None, 100.0)
        assert ei.value.code == ErrorCode.DEPLOYMENT_STATE_CONFLICT
        assert ei.value.message == f"a deployment that is {state} cannot {event.replace('_', ' ')}"
        assert ("it is finished" if state in TERMINAL else "wait for it to settle") in ei.value.hint
    else:
        new, fields = transition(state, "waiting", event, None, 100.0)
        assert new == expected == fields["state"] == next_state(state, event)


# what each allowed transition records, beside the new state: (state, phase, event) -> fields
FIELDS = [
    # a resumed wave's clock restarts; its phase stays
    (P, "waiting", "resume", {"state": R, "reason": "why", "phase_since": 500.0}),
    (P, "soaking", "resume", {"state": R, "reason": "why", "phase_since": 500.0}),
    # a held wave, resumed, is one the operator accepted
    (P, "held", "resume", {"state": R, "reason": "why", "phase_since": 500.0, "phase": "next"}),
    # held: the phase says why it is paused, and the wave's clock is kept
    (R, "waiting", "wave_held", {"state": P, "reason": "why", "phase": "held"}),
    # paused by the operator: phase and clock kept, so that resume goes on where it stood
    (R, "waiting", "pause", {"state": P, "reason": "why"}),
    (R, "soaking", "pause", {"state": P, "reason": "why"}),
    # every other move ends the wave's phase
    (R, "waiting", "wave_failed", {"state": RB, "reason": "why", "phase": None, "phase_since": 500.0}),
    (R, "next", "wave_passed_last", {"state": S, "reason": "why", "phase": None, "phase_since": 500.0}),
    (R, "waiting", "abort", {"state": A, "reason": "why", "phase": None, "phase_since": 500.0}),
    (P, "held", "abort", {"state": A, "reason": "why", "phase": None, "phase_since": 500.0}),
    (P, "held", "rollback", {"state": RB, "reason": "why", "phase": None, "phase_since": 500.0}),
    (S, None, "rollback", {"state": RB, "reason": "why", "phase": None, "phase_since": 500.0}),
    (A, None, "rollback", {"state": RB, "reason": "why", "phase": None, "phase_since": 500.0}),
    (RB, None, "reverted", {"state": RD, "reason": "why", "phase": None, "phase_since": 500.0}),
]


@pytest.mark.parametrize(("state", "phase", "event", "expected"), FIELDS)
def test_transition_fields(state: str, phase: str | None, event: str, expected: dict[str, Any]) -> None:
    new, fields = transition(state, phase, event, "why", 500.0)
    assert (new, fields) == (expected["state"], expected)


# -- wave planning -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "kwargs", "expected"),
    [
        # no devices: no waves, whatever the policy
        (0, {}, []),
        (0, {"canary": 5, "growth": 3, "max_wave": 2}, []),
        # fewer devices than the canary: one wave of all of them
        (1, {"canary": 3}, [1]),
        (4, {"canary": 10, "growth": 2}, [4]),
        # fewer devices than the planned waves: the last wave takes what is left
        (3, {"canary": 1, "growth": 2}, [1, 2]),
        (4, {"canary": 1, "growth": 2}, [1, 2, 1]),
        (2, {"canary": 1, "growth": 1}, [1, 1]),
        # fractional growth rounds a wave up
        (7, {"canary": 2, "growth": 1.5}, [2, 3, 2]),
        # growth barely above 1 still adds a device per wave
        (5, {"canary": 1, "growth": 1.1}, [1, 2, 2]),
        (4, {"canary": 1, "growth": 1}, [1, 1, 1, 1]),
        # max_wave caps the canary too
        (5, {"canary": 3, "growth": 1, "max_wave": 2}, [2, 2, 1]),
        (5, {"canary": 1, "growth": 3, "max_wave": 2}, [1, 2, 2]),
    ],
)
def test_plan_waves(n: int, kwargs: dict[str, Any], expected: list[int]) -> None:
    assert plan_waves(n, Policy(**kwargs)) == expected


# -- a published wave: its devices' states in, a decision out ------------------------------------------

SINCE = 1000.0  # when the wave was published
GATED = Policy(gate=Gate(soak_s=30, max_error_rate=0.1))
LENIENT = Policy(success_threshold=0.9, failure_threshold=0.1)
HOLDING = Policy(success_threshold=0.9, failure_threshold=0.2)


@pytest.mark.parametrize(
    ("states", "policy", "now", "expected"),
    [
        # an empty wave has nothing to wait for
        ([], Policy(), SINCE, Decision("pass")),
        # all done: pass, or soak first when a gate is set
        (["active", "active"], Policy(), SINCE + 1, Decision("pass")),
        (["active", "active"], GATED, SINCE + 1, Decision("soak", {"wave": 2, "seconds": 30})),
        # devices still updating (or not yet published to) are waited for
        (["active", "updating"], Policy(), SINCE + 1, Decision("wait")),
        (["active", "pending"], Policy(), SINCE + 1, Decision("wait")),
        # the timeout is strict: at exactly wave_timeout_s it still waits
        (["active", "updating"], Policy(), SINCE + 600, Decision("wait")),
        # all failed: roll back
        (
            ["failed", "failed"],
            Policy(),
            SINCE + 1,
            Decision(
                "wave_failed",
                {
                    "wave": 2,
                    "active": 0,
                    "failed": 2,
                    "pending": 0,
                    "reason": "wave 2: 2 of 2 device(s) failed",
                },
            ),
        ),
        # past the failure threshold already: no waiting for the rest
        (
            ["failed", "updating", "updating"],
            Policy(),
            SINCE + 1,
            Decision(
                "wave_failed",
                {
                    "wave": 2,
                    "active": 0,
                    "failed": 1,
                    "pending": 2,
                    "reason": "wave 2: 1 of 3 device(s) failed",
                },
            ),
        ),
        # without auto_rollback a failed wave is held for the operator
        (
            ["failed", "failed"],
            Policy(auto_rollback=False),
            SINCE + 1,
            Decision(
                "wave_held",
                {
                    "wave": 2,
                    "active": 0,
                    "failed": 2,
                    "pending": 0,
                    "reason": "wave 2: 2 of 2 device(s) failed (auto_rollback is off)",
                },
            ),
        ),
        # thresholds are fractions of the wave: 10% failed is not above 10%, 90% active is enough
        (["active"] * 9 + ["failed"], LENIENT, SINCE + 1, Decision("pass")),
        (["active"] * 8 + ["failed", "updating"], LENIENT, SINCE + 1, Decision("wait")),
        (
            ["active"] * 8 + ["failed"] * 2,
            LENIENT,
            SINCE + 1,
            Decision(
                "wave_failed",
                {
                    "wave": 2,
                    "active": 8,
                    "failed": 2,
                    "pending": 0,
                    "reason": "wave 2: 2 of 10 device(s) failed",
                },
            ),
        ),
        # between the thresholds: held
        (
            ["active"] * 8 + ["failed"] * 2,
            HOLDING,
            SINCE + 1,
            Decision(
                "wave_held",
                {
                    "wave": 2,
                    "active": 8,
                    "failed": 2,
                    "pending": 0,
                    "reason": "wave 2 below the success threshold",
                },
            ),
        ),
    ],
)
def test_judge_wave(states: list[str], policy: Policy, now: float, expected: Decision) -> None:
    assert judge_wave(2, states, policy, SINCE, now) == expected


def test_judge_wave_past_the_timeout_counts_silent_devices_as_failed() -> None:
    d = judge_wave(2, ["active", "updating"], Policy(), SINCE, SINCE + 600.5)
    assert d.action == "wave_failed"
    assert {k: d.detail[k] for k in ("active", "failed", "pending")} == {
        "active": 1,
        "failed": 0,
        "pending": 1,
    }
    # the same silence, within thresholds that tolerate it, passes
    lenient = Policy(success_threshold=0.5, failure_threshold=0.4)
    assert judge_wave(2, ["active"] * 3 + ["updating"], lenient, SINCE, SINCE + 601) == Decision("pass")


# -- the health gate: soak time, baseline, verdict ------------------------------------------------------


@pytest.mark.parametrize(
    ("soak_s", "now", "expected"),
    [
        (60, SINCE, False),
        (60, SINCE + 59.9, False),
        (60, SINCE + 60, True),
        (60, SINCE + 500, True),
        (0, SINCE, True),
    ],
)
def test_soak_elapsed(soak_s: float, now: float, expected: bool) -> None:
    assert soak_elapsed(Gate(soak_s=soak_s, max_p99_ms=100), SINCE, now) is expected


@pytest.mark.parametrize(
    ("soak_s", "expected"),
    [(60, (880.0, 1000.0)), (0, (998.0, 1000.0)), (0.25, (998.0, 1000.0))],
)
def test_baseline_window_is_two_soaks_before_publication(
    soak_s: float, expected: tuple[float, float]
) -> None:
    assert baseline_window(Gate(soak_s=soak_s), 1000.0) == expected


RELATIVE = Gate(soak_s=60, max_p99_ratio=2.0, min_requests=20)


@pytest.mark.parametrize(
    ("windows", "now", "expected"),
    [
        # enough requests on the old image: publish at once
        ([Window(20, 0, 5.0)], SINCE, True),
        ([Window(10, 0, 5.0), Window(10, 1, 7.0)], SINCE, True),
        # not enough yet: wait, at most one soak period
        ([Window(19, 0, 5.0)], SINCE + 59, False),
        ([], SINCE + 59, False),
        # a soak period waited: go on without a baseline (relative bounds are then skipped)
        ([], SINCE + 60, True),
        ([Window(19, 0, 5.0)], SINCE + 61, True),
    ],
)
def test_baseline_ready(windows: list[Window], now: float, expected: bool) -> None:
    assert baseline_ready(RELATIVE, windows, SINCE, now) is expected


@pytest.mark.parametrize(
    ("gate", "running", "expected"),
    [
        # a first deployment: no device runs an image, so no baseline can ever come; publish at once
        (RELATIVE, [False, False], False),
        # one device runs an image: wait for its baseline
        (RELATIVE, [False, True], True),
        # never reported: it may run one, so wait (at most one soak period, as before)
        (RELATIVE, [True], True),
        # absolute bounds only, or no gate: nothing to wait for
        (Gate(soak_s=60, max_p99_ms=50.0), [True], False),
        (Gate(), [True], False),
    ],
)
def test_awaits_baseline_only_where_one_can_exist(gate: Gate, running: list[bool], expected: bool) -> None:
    assert awaits_baseline(gate, running) is expected


GATE = Gate(soak_s=60, max_error_rate=0.05, max_p99_ratio=2.0, min_requests=20)
WITH_GATE = Policy(gate=GATE)
GOOD_BEFORE = [Window(100, 1, 20.0)]


def _failed(reason: str) -> dict[str, Any]:
    return {"reason": f"wave 3: health gate failed: {reason}"}


@pytest.mark.parametrize(
    ("baseline", "current", "policy", "action", "detail", "violations"),
    [
        # within bounds
        (GOOD_BEFORE, [Window(100, 2, 30.0)], WITH_GATE, "pass", {}, []),
        # error rate: at the bound passes, above it fails
        (GOOD_BEFORE, [Window(100, 5, 20.0)], WITH_GATE, "pass", {}, []),
        (
            GOOD_BEFORE,
            [Window(100, 6, 20.0)],
            WITH_GATE,
            "wave_failed",
            _failed("error rate 0.0600 > max_error_rate 0.05"),
            ["error rate 0.0600 > max_error_rate 0.05"],
        ),
        # p99 regression against the same devices' baseline: at the ratio passes, above it fails
        (GOOD_BEFORE, [Window(100, 0, 40.0)], WITH_GATE, "pass", {}, []),
        (
            GOOD_BEFORE,
            [Window(60, 0, 50.0), Window(40, 0, 50.0)],
            WITH_GATE,
            "wave_failed",
            _failed("p99 50.00 ms is 2.5x the baseline 20.00 ms > max_p99_ratio 2.0"),
            ["p99 50.00 ms is 2.5x the baseline 20.00 ms > max_p99_ratio 2.0"],
        ),
        # both at once: one reason naming both
        (
            GOOD_BEFORE,
            [Window(100, 10, 50.0)],
            WITH_GATE,
            "wave_failed",
            _failed(
                "error rate 0.1000 > max_error_rate 0.05; "
                "p99 50.00 ms is 2.5x the baseline 20.00 ms > max_p99_ratio 2.0"
            ),
            [
                "error rate 0.1000 > max_error_rate 0.05",
                "p99 50.00 ms is 2.5x the baseline 20.00 ms > max_p99_ratio 2.0",
            ],
        ),
        # baseline missing or too thin: the ratio is not judged, absolute bounds still are
        ([], [Window(100, 0, 500.0)], WITH_GATE, "pass", {}, []),
        ([Window(19, 0, 1.0)], [Window(100, 0, 500.0)], WITH_GATE, "pass", {}, []),
        (
            [],
            [Window(100, 6, 500.0)],
            WITH_GATE,
            "wave_failed",
            _failed("error rate 0.0600 > max_error_rate 0.05"),
            ["error rate 0.0600 > max_error_rate 0.05"],
        ),
        # not enough samples on the new image: no_data decides, whatever the numbers
        (
            GOOD_BEFORE,
            [Window(19, 19, 500.0)],
            WITH_GATE,
            "pass",
            {},
            ["only 19 requests on the new image (min_requests 20)"],
        ),
        (
            GOOD_BEFORE,
            [Window(19, 0, 20.0)],
            Policy(gate=Gate(soak_s=60, max_error_rate=0.05, min_requests=20, no_data="fail")),
            "wave_failed",
            _failed("only 19 requests on the new image (min_requests 20)"),
            ["only 19 requests on the new image (min_requests 20)"],
        ),
        # every device of the wave failed or fell silent: no heartbeats on the new image at all
        (
            GOOD_BEFORE,
            [],
            Policy(gate=Gate(soak_s=60, max_error_rate=0.05, no_data="fail")),
            "wave_failed",
            _failed("only 0 requests on the new image (min_requests 20)"),
            ["only 0 requests on the new image (min_requests 20)"],
        ),
        # without auto_rollback a failed gate holds the rollout for the operator
        (
            GOOD_BEFORE,
            [Window(100, 6, 20.0)],
            Policy(gate=GATE, auto_rollback=False),
            "wave_held",
            _failed("error rate 0.0600 > max_error_rate 0.05 (auto_rollback is off)"),
            ["error rate 0.0600 > max_error_rate 0.05"],
        ),
    ],
)
def test_judge_soak(
    baseline: list[Window],
    current: list[Window],
    policy: Policy,
    action: str,
    detail: dict[str, Any],
    violations: list[str],
) -> None:
    d = judge_soak(3, policy, baseline, current)
    assert (d.action, dict(d.detail)) == (action, detail)
    assert d.facts["violations"] == violations


def test_judge_soak_facts_say_what_was_judged() -> None:
    d = judge_soak(3, WITH_GATE, [Window(100, 1, 20.0)], [Window(50, 1, 30.0), Window(50, 1, 40.0)])
    assert d == Decision(
        "pass",
        facts={
            "baseline": {"requests": 100, "error_rate": 0.01, "p99_ms": 20.0},
            "current": {"requests": 100, "error_rate": 0.02, "p99_ms": 35.0},
            "violations": [],
        },
    )
    d = judge_soak(3, WITH_GATE, [], [Window(100, 0, 10.0)])
    assert (
        d.facts["note"] == "no baseline: the same devices served 0 requests before; relative bounds skipped"
    )
    d = judge_soak(3, WITH_GATE, GOOD_BEFORE, [Window(5, 0, 10.0)])
    assert d.facts["no_data"] is True


def test_first_image_is_judged_on_absolute_bounds_only() -> None:
    # Devices with no previous image (compared empty): a p99 far above anything before is no
    # violation of the ratio, the note says why, and the absolute error-rate bound still holds.
    d = judge_soak(3, WITH_GATE, GOOD_BEFORE, [Window(100, 0, 500.0)], compared=[])
    assert d.action == "pass" and d.facts["violations"] == []
    assert d.facts["note"] == "first image on these devices: no baseline exists; relative bounds skipped"
    d = judge_soak(3, WITH_GATE, [], [Window(100, 6, 5.0)], compared=[])
    assert d.action == "wave_failed"
    assert d.facts["violations"] == ["error rate 0.0600 > max_error_rate 0.05"]


def test_a_mixed_wave_compares_only_the_devices_that_had_an_image() -> None:
    # the fresh device is slow (500 ms), the updated one as fast as before: the ratio holds
    fresh, updated = Window(100, 0, 500.0), Window(100, 0, 20.0)
    d = judge_soak(3, WITH_GATE, GOOD_BEFORE, [fresh, updated], compared=[updated])
    assert d.action == "pass" and d.facts["violations"] == []
    # the updated device regressed: it fails on its own numbers
    slow = Window(100, 0, 50.0)
    d = judge_soak(3, WITH_GATE, GOOD_BEFORE, [Window(100, 0, 1.0), slow], compared=[slow])
    assert d.facts["violations"] == ["p99 50.00 ms is 2.5x the baseline 20.00 ms > max_p99_ratio 2.0"]


# -- devices: a status report and the time in, an outcome out -------------------------------------------

DEP, GEN, SHA = "dep-1", 1000, "ab" * 32
TIMEOUT = "no status for this deployment within 600s"


def _st(deployment_id: str = DEP, generation: int = GEN, **kw: Any) -> dict[str, Any]:
    return {"deployment_id": deployment_id, "generation": generation, **kw}


@pytest.mark.parametrize(
    ("status", "published_at", "now", "expected"),
    [
        (None, SINCE, SINCE + 600, ("pending", None)),
        (None, SINCE, SINCE + 600.5, ("failed", {"code": "timeout", "message": TIMEOUT})),
        # still downloading past the timeout is as good as silent
        (_st(state="downloading"), SINCE, SINCE + 601, ("failed", {"code": "timeout", "message": TIMEOUT})),
        # an answer beats the timeout
        (_st(state="active"), SINCE, SINCE + 5000, ("active", None)),
        (
            _st(state="failed", error={"code": "digest_mismatch"}),
            SINCE,
            SINCE + 1,
            ("failed", {"code": "digest_mismatch"}),
        ),
        (
            _st(generation=GEN + 1, state="active"),
            SINCE,
            SINCE + 1,
            ("failed", {"code": "superseded", "message": f"the device took generation {GEN + 1} instead"}),
        ),
        (
            _st(
                "older", GEN - 1, state="active", rejected={"message_sha256": SHA, "code": "manifest_expired"}
            ),
            SINCE,
            SINCE + 1,
            ("failed", {"code": "manifest_expired", "message": None, "hint": None}),
        ),
        # never published (no time to count from): never times out
        (None, None, SINCE + 10_000, ("pending", None)),
    ],
)
def test_update_outcome(
    status: dict[str, Any] | None, published_at: float | None, now: float, expected: tuple[str, Any]
) -> None:
    assert update_outcome(status, DEP, GEN, SHA, published_at, now, Policy()) == expected


def test_update_outcome_timeout_message_names_the_policy_s_timeout() -> None:
    out = update_outcome(None, DEP, GEN, SHA, SINCE, SINCE + 1, Policy(wave_timeout_s=0.5))
    assert out == ("failed", {"code": "timeout", "message": "no status for this deployment within 0.5s"})


RB_ID, RB_GEN = "dep-1-rb", GEN + 1


@pytest.mark.parametrize(
    ("status", "now", "expected"),
    [
        (_st(RB_ID, RB_GEN, state="active"), SINCE + 1, ("reverted", None)),
        (
            _st(RB_ID, RB_GEN, state="failed", error={"code": "disk_full"}),
            SINCE + 1,
            ("revert_failed", {"code": "disk_full"}),
        ),
        (_st(RB_ID, RB_GEN, state="rolled_back"), SINCE + 1, ("revert_failed", {"code": "rolled_back"})),
        (_st(RB_ID, RB_GEN, state="installing"), SINCE + 1, ("pending", None)),
        # the device still reports the deployment being rolled back: not an answer to the rollback
        (_st(DEP, GEN, state="active"), SINCE + 1, ("pending", None)),
        (None, SINCE + 600, ("pending", None)),
        (None, SINCE + 601, ("revert_failed", {"code": "timeout", "message": "no status for the rollback"})),
    ],
)
def test_revert_outcome(status: dict[str, Any] | None, now: float, expected: tuple[str, Any]) -> None:
    assert revert_outcome(status, RB_ID, RB_GEN, SINCE, now, Policy()) == expected


# -- the summary ---------------------------------------------------------------------------------------


def test_summarize_counts_members_and_waves() -> None:
    dep = {"id": DEP, "state": R, "reason": None, "wave": 1, "phase": "waiting", "target": {"fleet": "a"},
           "policy": {}, "created_at": 1.0, "updated_at": 2.0, "extra": "not shown"}  # fmt: skip
    members = [
        {"device_id": "d1", "wave": 1, "state": "active", "generation": 7, "error": None, "previous": {}},
        {"device_id": "d2", "wave": 2, "state": "pending", "generation": None, "error": None, "previous": {}},
        {"device_id": "d3", "wave": 3, "state": "pending", "generation": None, "error": None, "previous": {}},
    ]
    out = summarize(dep, members, "iris-svc:2", ("iris",))
    assert out["image"] == "iris-svc:2"
    assert out["models"] == ["iris"]
    assert (out["wave"], out["waves"], out["devices"]) == (1, 3, 3)
    assert out["counts"] == {"active": 1, "pending": 2}
    assert out["members"][0] == {
        "device_id": "d1",
        "wave": 1,
        "state": "active",
        "generation": 7,
        "error": None,
    }
    assert "extra" not in out
    empty = summarize(dep, [], "iris-svc:2", ())
    assert (empty["waves"], empty["devices"], empty["counts"], empty["members"]) == (0, 0, {}, [])
