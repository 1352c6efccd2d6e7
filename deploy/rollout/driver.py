"""The rollout driver: applies the policy (:mod:`deploy.rollout.policy`) to one deployment, one
``step`` at a time, from what the registry holds and what the devices' retained status documents and
heartbeats say; it signs and publishes the manifests, records what happened, and waits between steps.
Nothing is kept in the driver's memory that a restarted driver could not rebuild, so a control plane
killed in the middle of a rollout resumes it where it stood.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.artifacts import ArtifactStore
from deploy.registry import Image, LeaseLost, Registry
from deploy.rollout.policy import (
    COMMANDS,
    TERMINAL,
    Decision,
    Policy,
    Window,
    awaits_baseline,
    baseline_ready,
    baseline_window,
    judge_soak,
    judge_wave,
    next_state,
    revert_outcome,
    soak_elapsed,
    summarize,
    transition,
    update_outcome,
)
from edge_core import manifest as mf
from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.log import get_logger

log = get_logger("rollout")


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
        # manifests a driver recorded and died (or lost the broker) before the broker took them
        self._flush(dep_id)
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
        except LeaseLost as exc:
            # another replica took the deployment over while this one stalled: it drives now
            log.warning("rollout.lease_lost", deployment=dep_id, owner=self.owner, error=str(exc))
            return self.reg.deployment(dep_id)

    def _transition(self, dep: Mapping[str, Any], event: str, detail: Mapping[str, Any]) -> str:
        new, fields = transition(dep["state"], dep["phase"], event, detail.get("reason"), self.clock())
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
                outcome, error = update_outcome(
                    status, dep["id"], m["generation"], m["manifest_sha256"], m["published_at"], now, policy
                )
                if outcome != "pending":
                    self.reg.update_member(
                        dep["id"], m["device_id"], state=outcome, error=error, finished_at=now
                    )
                    self.reg.event(dep["id"], f"device_{outcome}", {"device": m["device_id"], "error": error})
                    m["state"], m["error"] = outcome, error
            elif m["state"] == "reverting":
                state, error = revert_outcome(
                    status, dep["id"] + "-rb", m["revert_generation"], m["finished_at"], now, policy
                )
                if state != "pending":
                    # a reverted device keeps the error that made it fail, if it failed
                    fields = {"state": state} if state == "reverted" else {"state": state, "error": error}
                    self.reg.update_member(dep["id"], m["device_id"], **fields)
                    self.reg.event(dep["id"], f"device_{state}", {"device": m["device_id"], "error": error})
                    m["state"] = state

    def _publish(
        self, dep: Mapping[str, Any], group: list[dict[str, Any]], policy: Policy, image: Image
    ) -> None:
        """One wave's manifests: generations issued, manifests signed and recorded with the members'
        new state in one transaction (the outbox, migration 0002), then published together.

        Recording before publishing is what makes a crash harmless either way: killed before the
        commit, nothing was issued and the next driver starts the wave afresh; killed after it, the
        next driver finds the envelopes in the outbox and publishes those same bytes (_flush), which
        the agent takes as one message. Never a second generation for one step, never a step
        recorded whose manifest did not reach the broker."""
        if not group:
            return
        now = self.clock()
        with self.reg.tx():
            self.reg.hold_lease(dep["id"], self.owner)
            gens = self.reg.next_generations([m["device_id"] for m in group])
            for m in group:
                device_id = m["device_id"]
                previous = (self.fleet.report(device_id) or {}).get("active")
                gen = gens[device_id]
                envelope = self.manifest(
                    device_id, image, dep["id"], dep["id"], gen, dep["sections"], policy.manifest_ttl_s
                )
                fields = {"state": "updating", "generation": gen, "previous": previous, "published_at": now,
                          "manifest_sha256": hashlib.sha256(envelope).hexdigest()}  # fmt: skip
                self.reg.update_member(dep["id"], device_id, outbox=envelope.decode(), **fields)
                m.update(fields)
        self._flush(dep["id"])

    def _flush(self, dep_id: str) -> None:
        """Publish what the outbox holds, then clear it: what a step recorded reaches the broker, even
        when the driver that recorded it died before publishing."""
        items = self.reg.outbox(dep_id)
        if items:
            self.fleet.publish_manifests(items)
            self.reg.clear_outbox(dep_id, items)

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
            if dep["phase"] != "baseline" and awaits_baseline(policy.gate, self._running(group)):
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
            decision = judge_wave(wave, [m["state"] for m in group], policy, dep["phase_since"], now)
            self._carry_out(dep, wave, decision, now)
            return
        if dep["phase"] == "soaking":
            # the heartbeats are read once there is a verdict to give, not at every step of the soak
            if not soak_elapsed(policy.gate, dep["phase_since"], now):
                return
            baseline, current, compared = self._gate_windows(
                dep, group, image, policy, dep["phase_since"], now
            )
            decision = judge_soak(wave, policy, baseline, current, compared)
            passed = decision.action == "pass"
            self.reg.event(
                dep["id"], "gate_passed" if passed else "gate_failed", {"wave": wave, **decision.facts}
            )
            self._carry_out(dep, wave, decision, now)

    def _carry_out(self, dep: Mapping[str, Any], wave: int, decision: Decision, now: float) -> None:
        if decision.action == "wait":
            return
        if decision.action == "soak":
            self.reg.update_deployment(dep["id"], phase="soaking", phase_since=now)
            self.reg.event(dep["id"], "soak_started", dict(decision.detail))
        elif decision.action == "pass":
            self.reg.event(dep["id"], "wave_passed", {"wave": wave})
            self.reg.update_deployment(dep["id"], phase="next", phase_since=self.clock())
        else:
            self._transition(dep, decision.action, decision.detail)

    def _running(self, group: list[dict[str, Any]]) -> list[bool]:
        """Whether each device serves an image now, from its last status (none yet: it may)."""
        reports = [self.fleet.report(m["device_id"]) for m in group]
        return [r is None or r.get("active") is not None for r in reports]

    def _baseline(self, ids: list[str], version: str, policy: Policy, until: float) -> list[Window]:
        """The devices' heartbeats on other images than ``version`` in the baseline window."""
        since, until = baseline_window(policy.gate, until)
        return _windows([r for r in self.reg.heartbeats(ids, since, until) if r["version"] != version])

    def _baseline_ready(
        self, dep: Mapping[str, Any], group: list[dict[str, Any]], policy: Policy, now: float
    ) -> bool:
        version = str(self.reg.image_by_id(dep["image_id"]).version)
        windows = self._baseline([m["device_id"] for m in group], version, policy, now)
        return baseline_ready(policy.gate, windows, dep["phase_since"], now)

    def _gate_windows(
        self,
        dep: Mapping[str, Any],
        group: list[dict[str, Any]],
        image: Image,
        policy: Policy,
        since: float,
        until: float,
    ) -> tuple[list[Window], list[Window], list[Window]]:
        """The wave's heartbeats before its publication (baseline), during the soak (current), and
        the part of those from devices that ran an image before (compared with the baseline)."""
        ids = [m["device_id"] for m in group if m["state"] == "active"]
        had_image = {m["device_id"] for m in group if m["state"] == "active" and m["previous"]}
        version = str(image.version)
        current = [r for r in self.reg.heartbeats(ids, since, until) if r["version"] == version]
        compared = [r for r in current if r["device_id"] in had_image]
        first_publish = min((m["published_at"] for m in group if m["published_at"]), default=since)
        return self._baseline(ids, version, policy, first_publish), _windows(current), _windows(compared)

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
        if reverts:
            # as in _publish: the reverts and their manifests recorded in one transaction, then sent
            with self.reg.tx():
                self.reg.hold_lease(dep["id"], self.owner)
                gens = self.reg.next_generations([m["device_id"] for m, _old in reverts])
                for m, old in reverts:
                    gen = gens[m["device_id"]]
                    envelope = self.manifest(m["device_id"], old, dep["id"] + "-rb", dep["id"], gen,
                                             dep["sections"], policy.manifest_ttl_s)  # fmt: skip
                    fields = {"state": "reverting", "revert_generation": gen, "finished_at": now}
                    self.reg.update_member(dep["id"], m["device_id"], outbox=envelope.decode(), **fields)
                    self.reg.event(dep["id"], "device_reverting", {"device": m["device_id"], "to": old.ref})
                    m["state"] = "reverting"
            self._flush(dep["id"])
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
    image = reg.image_by_id(dep["image_id"])
    return summarize(dep, members, image.ref, image.models)
