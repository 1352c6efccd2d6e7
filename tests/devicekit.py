"""One real device for a test module: a real agent over the real broker, and the bookkeeping of what
it should be running, so that every refusal can be checked against the image that kept serving."""

from __future__ import annotations

from typing import Any

from edge_core import manifest as mf
from edge_core.fsutil import hash_file
from simulators.rig import AgentProcess, Rig


class Device:
    """The module's one device and the bookkeeping of what it should be running."""

    def __init__(self, rig: Rig, agent: AgentProcess) -> None:
        self.rig = rig
        self.agent = agent
        self.id = agent.device_id
        self.generation = 0
        self.active_sha: str | None = None
        self.version = 0

    def next_gen(self) -> int:
        self.generation += 1
        return self.generation

    def deploy_good(self) -> dict[str, Any]:
        """Deploy a new good image and wait until it runs: the agent still accepts good manifests."""
        self.version += 1
        b = self.rig.build_bundle("iris", str(self.version))
        gen = self.next_gen()
        self.rig.deploy(self.id, self.rig.manifest(self.id, b, gen))
        status = self.rig.wait_active(self.id, gen)
        assert mf.schema_error(status, "status") is None, mf.schema_error(status, "status")
        self.active_sha = (
            hash_file(self.rig.server.root / b.name) if b.exists() else status["active"]["sha256"]
        )
        assert status["active"]["sha256"] == self.agent.current_image() == self.active_sha
        return status

    def assert_previous_still_active(self, status: dict[str, Any]) -> None:
        assert mf.schema_error(status, "status") is None, mf.schema_error(status, "status")
        assert self.active_sha is not None
        assert status["active"]["sha256"] == self.active_sha
        assert self.agent.current_image() == self.active_sha
        assert self.agent.running, self.agent.log_text()[-2000:]

    def refused(self, data: bytes, code: str) -> dict[str, Any]:
        """Publish raw bytes as the desired state; wait for the status to report this refusal."""
        before = self.rig.op.report(self.id) or {}
        prev_at = (before.get("rejected") or {}).get("at")
        self.rig.publish(self.id, data)
        status = self.rig.wait_status(
            self.id, lambda s: bool(s.get("rejected")) and s["rejected"]["at"] != prev_at, timeout=15
        )
        assert status["rejected"]["code"] == code, status["rejected"]
        assert status["rejected"]["message"] and status["rejected"]["hint"]
        # a refusal changes nothing: same deployment, same state, same image
        assert status["generation"] == before.get("generation")
        assert status["state"] == before.get("state")
        self.assert_previous_still_active(status)
        return status

    def failed(self, doc: dict[str, Any], code: str, state: str = "failed") -> dict[str, Any]:
        """Deploy a manifest that verifies but cannot be carried out; wait for the failed status."""
        self.rig.deploy(self.id, doc)
        status = self.rig.wait_status(
            self.id,
            lambda s: (
                s.get("generation") == doc["generation"] and s.get("state") in ("failed", "rolled_back")
            ),
            timeout=30,
        )
        assert (status["state"], status["error"]["code"]) == (state, code), status
        assert status["error"]["message"]
        self.assert_previous_still_active(status)
        return status
