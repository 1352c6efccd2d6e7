"""Staged fleet rollouts: waves, thresholds, model-level health gates, automatic rollback.

The rollout policy is pure (plan_waves, device_outcome, wave_verdict, gate_verdict: data in,
verdict out); :class:`Driver` applies it to one deployment, one ``step`` at a time, from what the
registry holds and what the devices' retained status documents and heartbeats say. Nothing is kept
in the driver's memory that a restarted driver could not rebuild, so a control plane killed in the
middle of a rollout resumes it where it stood.

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

import hashlib
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.artifacts import ArtifactStore
from deploy.registry import Image, Registry
from edge_core import manifest as mf
from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.log import get_logger

log = get_logger("rollout")

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


# -- the policy (pure) ---------------------------------------------------------------------------------


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
    baseline: Sequence[Window], current: Sequence[Window], gate: Gate
) -> tuple[bool, dict[str, Any]]:
    """Whether the new image serves within the gate's bounds; the numbers it judged by."""
    b_req, b_rate, b_p99 = _aggregate(baseline)
    c_req, c_rate, c_p99 = _aggregate(current)
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
    have_baseline = b_req >= gate.min_requests
    if (
        have_baseline
        and gate.max_error_rate_increase is not None
        and c_rate - b_rate > gate.max_error_rate_increase
    ):
        v.append(
            f"error rate rose {c_rate - b_rate:+.4f} > max_error_rate_increase {gate.max_error_rate_increase}"
        )
    if c_p99 is not None:
        if gate.max_p99_ms is not None and c_p99 > gate.max_p99_ms:
            v.append(f"p99 {c_p99:.2f} ms > max_p99_ms {gate.max_p99_ms}")
        if have_baseline and b_p99 and gate.max_p99_ratio is not None and c_p99 / b_p99 > gate.max_p99_ratio:
            v.append(
                f"p99 {c_p99:.2f} ms is {c_p99 / b_p99:.1f}x the baseline {b_p99:.2f} ms "
                f"> max_p99_ratio {gate.max_p99_ratio}"
            )
    if gate.relative and not have_baseline:
        facts["note"] = (
            f"no baseline: the same devices served {b_req} requests before; relative bounds skipped"
        )
    return not v, facts


# -- the driver ----------------------------------------------------------------------------------------


class Fleet(Protocol):
    """What the driver needs of the broker (deploy/publisher.py: OperatorClient)."""

    def report(self, device_id: str, kind: str = "status") -> dict[str, Any] | None: ...

    def publish_manifests(self, items: list[tuple[str, bytes]], timeout: float = 30.0) -> None: ...


def _windows(rows: Sequence[Mapping[str, Any]]) -> list[Window]:
    return [Window(r["requests"], r["errors"], r["p99_ms"]) for r in rows]


class Driver:
    """Moves deployments forward. Several drivers (processes) may run: a lease in the registry lets one
    of them drive a deployment at a time."""

    LEASE_S = 30.0

    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        key: Ed25519PrivateKey,
        artifacts: ArtifactStore,
        *,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        ingest: Callable[[], None] | None = None,
    ) -> None:
        self.reg = registry
        self.fleet = fleet
        self.key = key
        self.artifacts = artifacts
        self.clock = clock
        self.owner = owner or f"driver-{uuid.uuid4().hex[:8]}"
        #: called before every step: moves the devices' latest reports into the registry
        self.ingest = ingest

    # -- manifests ---------------------------------------------------------------------------------

    def manifest(
        self,
        device_id: str,
        image: Image,
        dep_id: str,
        rollout_id: str,
        generation: int,
        sections: Mapping[str, Any],
        ttl_s: float,
    ) -> bytes:
        now = datetime.now(UTC)
        doc: dict[str, Any] = {
            "schema_version": 1,
            "device_id": device_id,
            "deployment_id": dep_id,
            "rollout_id": rollout_id,
            "generation": generation,
            "issued_at": mf.format_time(now),
            "expires_at": mf.format_time(now + timedelta(seconds=ttl_s)),
            "image": {
                "name": image.name,
                "version": str(image.version),
                "sha256": image.sha256,
                "size": image.size,
                "urls": [self.artifacts.download_url(image.artifact)],
            },
            **{k: v for k, v in sections.items() if k in ("runtime", "data_collection") and v},
        }
        return mf.sign(doc, self.key)

    # -- one step ----------------------------------------------------------------------------------

    def step(self, dep_id: str) -> dict[str, Any]:
        """Look at the devices, act once, return the deployment as it now stands."""
        dep = self.reg.deployment(dep_id)
        if dep["state"] in TERMINAL and dep["command"] != "rollback":
            return dep
        policy = Policy.from_dict(dep["policy"])
        members = self.reg.members(dep_id)
        self._observe(dep, members, policy)
        command = self.reg.take_command(dep_id)
        if command:
            self._transition(dep, command, {"by": "operator"})
            dep = self.reg.deployment(dep_id)
            members = self.reg.members(dep_id)
        if dep["state"] == "running":
            self._advance(dep, members, policy)
        elif dep["state"] == "rolling_back":
            self._roll_back(dep, members, policy)
        return self.reg.deployment(dep_id)

    def step_or_wait(self, dep_id: str) -> dict[str, Any]:
        """``step``, but a broker that is away is waited for, not an error: the operator's connection
        reconnects by itself, what was published is recorded, and the next step goes on from there."""
        try:
            return self.step(dep_id)
        except (TimeoutError, OSError) as exc:
            log.warning("rollout.broker_unavailable", deployment=dep_id, error=str(exc))
            return self.reg.deployment(dep_id)

    def _transition(self, dep: Mapping[str, Any], event: str, detail: Mapping[str, Any]) -> str:
        new = next_state(dep["state"], event)
        fields: dict[str, Any] = {"state": new, "reason": detail.get("reason")}
        if event == "resume":
            # The wave's clock starts again: time spent paused is not the devices' fault. A held wave
            # resumed is one the operator accepted.
            fields["phase_since"] = self.clock()
            if dep["phase"] == "held":
                fields["phase"] = "next"
        elif event == "wave_held":
            fields["phase"] = "held"
        elif new != "paused":
            fields.update(phase=None, phase_since=self.clock())
        self.reg.update_deployment(dep["id"], **fields)
        self.reg.event(dep["id"], event, {"from": dep["state"], "to": new, **detail})
        log.info("rollout.transition", deployment=dep["id"], transition=event, to=new)
        return new

    def _observe(self, dep: Mapping[str, Any], members: list[dict[str, Any]], policy: Policy) -> None:
        with self.reg.tx():  # one commit for all the outcomes a step sees, not one per device
            self._observe_members(dep, members, policy)

    def _observe_members(self, dep: Mapping[str, Any], members: list[dict[str, Any]], policy: Policy) -> None:
        now = self.clock()
        for m in members:
            status = self.fleet.report(m["device_id"])
            if m["state"] == "updating":
                outcome, error = device_outcome(status, dep["id"], m["generation"], m["manifest_sha256"])
                if outcome == "pending" and now - (m["published_at"] or now) > policy.wave_timeout_s:
                    outcome, error = (
                        "failed",
                        {
                            "code": "timeout",
                            "message": f"no status for this deployment within {policy.wave_timeout_s:g}s",
                        },
                    )
                if outcome != "pending":
                    self.reg.update_member(
                        dep["id"], m["device_id"], state=outcome, error=error, finished_at=now
                    )
                    self.reg.event(dep["id"], f"device_{outcome}", {"device": m["device_id"], "error": error})
                    m["state"], m["error"] = outcome, error
            elif m["state"] == "reverting":
                outcome, error = device_outcome(status, dep["id"] + "-rb", m["revert_generation"])
                if outcome == "pending" and now - (m["finished_at"] or now) > policy.wave_timeout_s:
                    outcome, error = "failed", {"code": "timeout", "message": "no status for the rollback"}
                if outcome != "pending":
                    state = "reverted" if outcome == "active" else "revert_failed"
                    # a reverted device keeps the error that made it fail, if it failed
                    fields = {"state": state} if outcome == "active" else {"state": state, "error": error}
                    self.reg.update_member(dep["id"], m["device_id"], **fields)
                    self.reg.event(dep["id"], f"device_{state}", {"device": m["device_id"], "error": error})
                    m["state"] = state

    def _publish(
        self, dep: Mapping[str, Any], group: list[dict[str, Any]], policy: Policy, image: Image
    ) -> None:
        """One wave's manifests: signed, published together, then recorded in one transaction."""
        out = []
        gens = self.reg.next_generations([m["device_id"] for m in group])
        for m in group:
            device_id = m["device_id"]
            previous = (self.fleet.report(device_id) or {}).get("active")
            gen = gens[device_id]
            envelope = self.manifest(
                device_id, image, dep["id"], dep["id"], gen, dep["sections"], policy.manifest_ttl_s
            )
            out.append((m, gen, previous, envelope))
        self.fleet.publish_manifests([(m["device_id"], env) for m, _g, _p, env in out])
        now = self.clock()
        with self.reg.tx():
            for m, gen, previous, envelope in out:
                sha = hashlib.sha256(envelope).hexdigest()
                fields = {"state": "updating", "generation": gen, "previous": previous, "published_at": now,
                          "manifest_sha256": sha}  # fmt: skip
                self.reg.update_member(dep["id"], m["device_id"], **fields)
                m.update(fields)

    def _advance(self, dep: Mapping[str, Any], members: list[dict[str, Any]], policy: Policy) -> None:
        image = self.reg.image_by_id(dep["image_id"])
        wave = dep["wave"]
        now = self.clock()
        if wave == 0 or dep["phase"] in ("next", "baseline"):
            nxt = wave + 1
            group = [m for m in members if m["wave"] == nxt]
            if not group:
                self._transition(dep, "wave_passed_last", {"waves": wave})
                return
            if policy.gate.enabled and policy.gate.relative and dep["phase"] != "baseline":
                # Evidence of how these devices serve now, before they change.
                self.reg.update_deployment(dep["id"], phase="baseline", phase_since=now)
                return
            if dep["phase"] == "baseline" and not self._baseline_ready(dep, group, policy, now):
                return
            # a step cut short by a broker outage may have published some already
            self._publish(dep, [m for m in group if m["state"] == "pending"], policy, image)
            self.reg.update_deployment(dep["id"], wave=nxt, phase="waiting", phase_since=now)
            self.reg.event(
                dep["id"], "wave_started", {"wave": nxt, "devices": [m["device_id"] for m in group]}
            )
            return
        group = [m for m in members if m["wave"] == wave]
        if dep["phase"] == "waiting":
            outcomes = [m["state"] if m["state"] in ("active", "failed") else "pending" for m in group]
            timed_out = now - dep["phase_since"] > policy.wave_timeout_s
            verdict = wave_verdict(outcomes, policy, timed_out)
            if verdict == "wait":
                return
            counts = {o: outcomes.count(o) for o in ("active", "failed", "pending")}
            if verdict == "fail":
                reason = f"wave {wave}: {counts['failed']} of {len(group)} device(s) failed"
                self._fail(dep, policy, reason, {"wave": wave, **counts})
                return
            if verdict == "hold":
                self._transition(
                    dep,
                    "wave_held",
                    {"wave": wave, **counts, "reason": f"wave {wave} below the success threshold"},
                )
                return
            if policy.gate.enabled:
                self.reg.update_deployment(dep["id"], phase="soaking", phase_since=now)
                self.reg.event(dep["id"], "soak_started", {"wave": wave, "seconds": policy.gate.soak_s})
                return
            self._wave_passed(dep, wave)
            return
        if dep["phase"] == "soaking":
            if now - dep["phase_since"] < policy.gate.soak_s:
                return
            ok, facts = self._gate(dep, group, image, policy, dep["phase_since"], now)
            self.reg.event(dep["id"], "gate_passed" if ok else "gate_failed", {"wave": wave, **facts})
            if not ok:
                self._fail(dep, policy, f"wave {wave}: health gate failed: {'; '.join(facts['violations'])}")
                return
            self._wave_passed(dep, wave)

    def _wave_passed(self, dep: Mapping[str, Any], wave: int) -> None:
        self.reg.event(dep["id"], "wave_passed", {"wave": wave})
        self.reg.update_deployment(dep["id"], phase="next", phase_since=self.clock())

    def _fail(
        self, dep: Mapping[str, Any], policy: Policy, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        if policy.auto_rollback:
            self._transition(dep, "wave_failed", {**(detail or {}), "reason": reason})
        else:
            self._transition(
                dep, "wave_held", {**(detail or {}), "reason": reason + " (auto_rollback is off)"}
            )

    def _baseline(self, ids: list[str], version: str, policy: Policy, until: float) -> list[dict[str, Any]]:
        """The devices' heartbeats on other images than ``version`` in the baseline window: the two
        soak periods before ``until`` (the wave's publication). One definition for the wait before
        publishing and for the gate's verdict."""
        window = 2 * max(policy.gate.soak_s, 1.0)
        return [r for r in self.reg.heartbeats(ids, until - window, until) if r["version"] != version]

    def _baseline_ready(
        self, dep: Mapping[str, Any], group: list[dict[str, Any]], policy: Policy, now: float
    ) -> bool:
        version = str(self.reg.image_by_id(dep["image_id"]).version)
        rows = self._baseline([m["device_id"] for m in group], version, policy, now)
        return bool(
            sum(r["requests"] for r in rows) >= policy.gate.min_requests
            or now - dep["phase_since"] >= policy.gate.soak_s
        )

    def _gate(
        self,
        dep: Mapping[str, Any],
        group: list[dict[str, Any]],
        image: Image,
        policy: Policy,
        since: float,
        until: float,
    ) -> tuple[bool, dict[str, Any]]:
        ids = [m["device_id"] for m in group if m["state"] == "active"]
        version = str(image.version)
        current = [r for r in self.reg.heartbeats(ids, since, until) if r["version"] == version]
        first_publish = min((m["published_at"] for m in group if m["published_at"]), default=since)
        baseline = self._baseline(ids, version, policy, first_publish)
        return gate_verdict(_windows(baseline), _windows(current), policy.gate)

    def _roll_back(self, dep: Mapping[str, Any], members: list[dict[str, Any]], policy: Policy) -> None:
        now = self.clock()
        # Every device this deployment published to gets its previous image as desired state: an
        # updating one stops its download, and one that failed or never answered finds the old image
        # (not the rolled-back one) retained for it when it comes back.
        todo = [m for m in members if m["state"] in ("active", "updating", "failed")]
        reverts = []
        for m in todo:
            prev = m["previous"] or {}
            old = self.reg.image_by_sha(prev.get("sha256", "")) if prev else None
            if old is None:
                err = {"code": "no_previous_image", "message": "no previous image that this registry knows"}
                self.reg.update_member(dep["id"], m["device_id"], state="revert_failed", error=err)
                self.reg.event(dep["id"], "device_revert_failed", {"device": m["device_id"], "error": err})
                m["state"] = "revert_failed"
            else:
                reverts.append((m, old))
        gens = self.reg.next_generations([m["device_id"] for m, _old in reverts])
        envelopes = [
            (m["device_id"], self.manifest(m["device_id"], old, dep["id"] + "-rb", dep["id"],
                                           gens[m["device_id"]], dep["sections"], policy.manifest_ttl_s))
            for m, old in reverts
        ]  # fmt: skip
        if envelopes:
            self.fleet.publish_manifests(envelopes)
        with self.reg.tx():
            for m, old in reverts:
                self.reg.update_member(dep["id"], m["device_id"], state="reverting",
                                       revert_generation=gens[m["device_id"]], finished_at=now)  # fmt: skip
                self.reg.event(dep["id"], "device_reverting", {"device": m["device_id"], "to": old.ref})
                m["state"] = "reverting"
        if not any(m["state"] == "reverting" for m in members):
            self._transition(dep, "reverted", {"reason": dep.get("reason")})

    # -- driving -----------------------------------------------------------------------------------

    def run(
        self,
        dep_id: str,
        *,
        poll_s: float = 0.2,
        until_paused: bool = True,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Step until the deployment is finished (or paused, with ``until_paused``). Returns it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                if self.ingest is not None:
                    self.ingest()
                if not self.reg.take_lease(dep_id, self.owner, self.LEASE_S):
                    dep = self.reg.deployment(dep_id)  # another driver has it: watch only
                else:
                    dep = self.step_or_wait(dep_id)
                if on_step is not None:
                    on_step(dep)
                if dep["state"] in TERMINAL and not dep["command"]:
                    return dep
                if until_paused and dep["state"] == "paused" and not dep["command"]:
                    return dep
                if deadline is not None and time.monotonic() > deadline:
                    return dep
                time.sleep(poll_s)
        finally:
            self.reg.release_lease(dep_id, self.owner)


def command(reg: Registry, dep_id: str, cmd: str) -> dict[str, Any]:
    """Record an operator's command; the driver carries it out at its next step. Refused at once if
    the deployment's state does not allow it."""
    if cmd not in COMMANDS:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT, f"unknown command {cmd!r}", f"use one of {COMMANDS}"
        )
    dep = reg.deployment(dep_id)
    next_state(dep["state"], cmd)  # refuses what the table does not allow
    if cmd == "rollback":
        newer = reg.newer_deployments(dep_id)
        if newer:
            raise ControlPlaneError(
                ErrorCode.DEPLOYMENT_STATE_CONFLICT,
                f"deployment(s) {', '.join(sorted(newer))} updated devices of {dep_id} after it: rolling "
                f"{dep_id} back would undo them",
                "roll back the newest one, or deploy the image you want with `edge-deploy deploy create`",
            )
    reg.update_deployment(dep_id, command=cmd)
    reg.event(dep_id, "command", {"command": cmd})
    return reg.deployment(dep_id)


def summary(reg: Registry, dep_id: str) -> dict[str, Any]:
    """A deployment with its devices' progress, for `deploy show` and progress bars."""
    dep = reg.deployment(dep_id)
    members = reg.members(dep_id)
    counts: dict[str, int] = {}
    for m in members:
        counts[m["state"]] = counts.get(m["state"], 0) + 1
    image = reg.image_by_id(dep["image_id"])
    return {
        "id": dep["id"],
        "image": image.ref,
        "models": list(image.models),
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
