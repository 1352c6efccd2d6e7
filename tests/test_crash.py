"""Crash safety: the agent is SIGKILLed in every state of the deployer (and inside activation and
install), restarted, and must converge: the new image active, or the old one active with a clear
status; never a half-installed image, never a status that lies about what is active."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.update.deployer import MAX_RECOVERIES, TERMINAL, TRANSITIONS
from deploy import bundle
from edge_core.faults import CRASH_ENV, FAIL_ENV
from edge_core.fsutil import hash_file
from simulators.bundle_server import Fault
from simulators.rig import AgentProcess, Rig, wait_until

# Every state the table can reach, plus the points between the steps of install and activation.
# (failed and rolled_back, which only a failure reaches, have their own test below)
STATE_POINTS = sorted(
    {f"state:{s}" for s in {*(k[0] for k in TRANSITIONS), *TRANSITIONS.values()}}
    - {"state:failed", "state:rolled_back"}
)
INNER_POINTS = [
    "installing.before_rename",
    "installing.after_rename",
    "activating.before_switch",
    "activating.after_switch",
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig(tmp_path_factory.mktemp("crash")) as r:
        yield r


def image_is_complete(agent: AgentProcess, digest: str, bundle_path: Path) -> bool:
    """Every file that bundle.json lists is there with its sha256: not half-installed."""
    root = agent.state_dir / "store" / "images" / digest
    meta = (
        bundle.read_metadata(bundle_path)
        if bundle_path.exists()
        else json.loads((root / "bundle.json").read_text())
    )
    return all(hash_file(root / name) == f["sha256"] for name, f in meta["files"].items())


def start_v1(rig: Rig, device: str) -> tuple[AgentProcess, str, Path]:
    agent = rig.add_device(device).start()
    b1 = rig.build_bundle(
        f"{device}-img", "1", {"model.onnx": b"one" * 1000, "score.py": b"def run(x): return x\n"}
    )
    doc = rig.manifest(device, b1, 1)
    rig.deploy(device, doc)
    rig.wait_active(device, 1)
    return agent, doc["image"]["sha256"], b1


def check_converged(
    rig: Rig, agent: AgentProcess, device: str, old: str, new: str, bundles: dict[str, Path]
) -> dict[str, Any]:
    status = rig.wait_status(
        device, lambda s: s.get("generation") == 2 and s.get("state") in {str(t) for t in TERMINAL}
    )
    on_disk = agent.current_image()
    assert on_disk is not None and on_disk in (old, new)
    assert image_is_complete(agent, on_disk, bundles[on_disk])
    assert status["active"]["sha256"] == on_disk  # the status tells the truth about what runs
    assert_nothing_left_behind(agent)
    return status


def assert_nothing_left_behind(agent: AgentProcess, keep_images: int = 2) -> None:
    """No crash leftover outlives the restart and the deployment's end: no partial download, no
    staging directory, no image beyond keep_images (the cleanup runs just after the status)."""
    store = agent.state_dir / "store"

    def clean() -> bool:
        return (
            not list((store / "downloads").glob("*.partial"))
            and not list((store / "staging").iterdir())
            and len(list((store / "images").iterdir())) <= keep_images
        )

    assert wait_until(clean, timeout=10), sorted(
        p.name for p in store.rglob("*") if p.parent.name in ("downloads", "staging", "images")
    )


def test_a_kill_between_active_and_the_cleanup_leaves_nothing_beyond_keep_images(rig: Rig) -> None:
    device = "crash-cleanup"
    agent, _, _ = start_v1(rig, device)
    b2 = rig.build_bundle(f"{device}-img", "2")
    rig.deploy(device, rig.manifest(device, b2, 2))
    rig.wait_active(device, 2)
    agent.stop()
    agent.start(env={CRASH_ENV: "state:active"})
    b3 = rig.build_bundle(f"{device}-img", "3")
    doc = rig.manifest(device, b3, 3)
    rig.deploy(device, doc)
    assert agent.wait(timeout=30) == -9, agent.log_text()[-2000:]
    images = agent.state_dir / "store" / "images"
    assert len(list(images.iterdir())) == 3  # killed before the cleanup: one image too many
    agent.start()
    rig.wait_active(device, 3)
    assert_nothing_left_behind(agent)
    assert sorted(p.name for p in images.iterdir()) == sorted(
        [doc["image"]["sha256"], rig.manifest(device, b2, 2)["image"]["sha256"]]
    )


@pytest.mark.parametrize("point", STATE_POINTS + INNER_POINTS)
def test_sigkill_then_restart_converges(rig: Rig, point: str) -> None:
    device = "crash-" + point.replace(":", "-").replace(".", "-").replace("_", "-")
    agent, old, b1 = start_v1(rig, device)
    agent.stop()
    agent.start(env={CRASH_ENV: point})
    rig.op.wait_for(device, lambda o: o.get("online") is True, kind="online")

    b2 = rig.build_bundle(
        f"{device}-img", "2", {"model.onnx": b"two" * 1000, "score.py": b"def run(x): return 2\n"}
    )
    doc = rig.manifest(device, b2, 2)
    new = doc["image"]["sha256"]
    rig.deploy(device, doc)
    assert agent.wait(timeout=30) == -9, agent.log_text()[-2000:]
    # the instant after the kill: whatever is current is complete
    on_disk = agent.current_image()
    assert on_disk is not None and on_disk in (old, new)
    assert image_is_complete(agent, on_disk, {old: b1, new: b2}[on_disk])

    agent.start()
    status = check_converged(rig, agent, device, old, new, {old: b1, new: b2})
    assert (status["state"], agent.current_image()) == ("active", new), status


@pytest.mark.parametrize("point", ["state:failed", "state:rolled_back"])
def test_sigkill_in_failure_states(rig: Rig, point: str) -> None:
    device = "crashfail-" + point.split(":")[1].replace("_", "-")
    agent, old, b1 = start_v1(rig, device)
    agent.stop()
    # rolled_back is reached when activation fails after the switch (a disk error, injected here)
    agent.start(
        env={CRASH_ENV: point, FAIL_ENV: "activating.after_switch"}
        if "rolled" in point
        else {CRASH_ENV: point}
    )
    b2 = rig.build_bundle(f"{device}-img", "2")
    doc = rig.manifest(device, b2, 2)
    if point == "state:failed":
        rig.server.set_fault(b2.name, Fault(corrupt=True))
    rig.deploy(device, doc)
    try:
        code = agent.wait(timeout=30)
    finally:
        rig.server.set_fault(b2.name, None)
    assert code == -9, agent.log_text()[-2000:]
    agent.start()
    status = check_converged(
        rig, agent, device, old, doc["image"]["sha256"], {old: b1, doc["image"]["sha256"]: b2}
    )
    assert status["state"] in ("failed", "rolled_back")
    assert agent.current_image() == old and status["active"]["sha256"] == old
    assert status["error"]["code"]


def test_kill_mid_download_resumes_with_range(rig: Rig) -> None:
    device = "crash-mid-download"
    agent, _, _ = start_v1(rig, device)
    payload = bytes(range(256)) * 8192  # 2 MiB
    b2 = rig.build_bundle(f"{device}-img", "2", {"model.onnx": payload})
    doc = rig.manifest(device, b2, 2)
    rig.server.set_fault(b2.name, Fault(rate_bytes_per_s=512 * 1024))
    rig.deploy(device, doc)
    partial = agent.state_dir / "store" / "downloads" / f"{doc['image']['sha256']}.partial"
    assert wait_until(lambda: partial.exists() and partial.stat().st_size > 256 * 1024, timeout=20)
    agent.kill()
    have = partial.stat().st_size
    assert 0 < have < doc["image"]["size"]
    rig.server.set_fault(b2.name, None)
    agent.start()
    rig.wait_active(device, 2)
    gets = [r for r in rig.server.requests if r.name == b2.name and r.method == "GET"]
    assert gets[-1].range is not None and gets[-1].status == 206
    assert int(gets[-1].range.split("=")[1].rstrip("-")) >= have - 256 * 1024  # resumed near the kill point
    assert agent.current_image() == doc["image"]["sha256"]


def test_crash_loop_fails_the_deployment_keeping_the_old_image(rig: Rig) -> None:
    """A deployment the agent dies in again and again is failed, not retried forever."""
    device = "crash-loop"
    agent, old, _ = start_v1(rig, device)
    agent.stop()
    b2 = rig.build_bundle(f"{device}-img", "2")
    doc = rig.manifest(device, b2, 2)
    agent.start(env={CRASH_ENV: "installing.before_rename"})
    rig.deploy(device, doc)
    for _ in range(MAX_RECOVERIES + 1):  # the first run, then MAX_RECOVERIES resumptions, all die
        assert agent.wait(timeout=30) == -9
        agent.start(env={CRASH_ENV: "installing.before_rename"})
    status = rig.wait_status(device, lambda s: s.get("generation") == 2 and s.get("state") == "failed")
    assert status["error"]["code"] == "interrupted"
    assert status["active"]["sha256"] == old == agent.current_image()
    assert agent.running


def test_clean_stops_mid_download_resume_and_do_not_count_as_crashes(rig: Rig) -> None:
    """systemd stopping the agent (SIGTERM) during a long download is not a crash: it resumes every
    time, however often it happens."""
    device = "clean-stop"
    agent, _, _ = start_v1(rig, device)
    b2 = rig.build_bundle(f"{device}-img", "2", {"model.onnx": bytes(range(256)) * 8192})
    doc = rig.manifest(device, b2, 2)
    rig.server.set_fault(b2.name, Fault(rate_bytes_per_s=256 * 1024))
    partial = agent.state_dir / "store" / "downloads" / f"{doc['image']['sha256']}.partial"
    rig.deploy(device, doc)
    try:
        for _ in range(MAX_RECOVERIES + 2):
            size = partial.stat().st_size if partial.exists() else 0
            assert wait_until(
                lambda s=size: partial.exists() and partial.stat().st_size > s + 64 * 1024, timeout=20
            )
            assert agent.stop() == 0, agent.log_text()[-2000:]
            agent.start()
    finally:
        rig.server.set_fault(b2.name, None)
    status = rig.wait_active(device, 2, timeout=60)
    assert status["active"]["sha256"] == doc["image"]["sha256"] == agent.current_image()
    ranges = [r.range for r in rig.server.requests if r.name == b2.name and r.method == "GET"]
    assert sum(1 for r in ranges if r) >= MAX_RECOVERIES + 2  # every restart resumed
