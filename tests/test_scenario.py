"""The scenario runner: 20 simulated devices and one real agent process, three rollouts, and faults
on a timeline (a broker restart and a SIGKILL of the agent during a rollout, two devices cut off
for 2 s, a bundle the server corrupts). The report's invariants are the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"


def run(name: str, workdir: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "simulators.cli", "scenario", str(SCENARIOS / name), "--workdir", str(workdir),
         "--json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report: dict[str, Any] = json.loads(r.stdout)
    return report


def test_the_restart_and_corrupt_scenario_holds_every_invariant(tmp_path: Path) -> None:
    report = run("restart-and-corrupt.json", tmp_path / "run")
    assert report["invariants"] == {"held": True, "problems": []}
    assert report["devices"] == 21 and report["running"] == {"v2": 21}
    assert report["per_device"]["agent-00"] == "v2" and len(report["per_device"]) == 21
    states = [(d["image"], d["state"]) for d in report["deployments"]]
    assert states == [("v1", "succeeded"), ("v2", "succeeded"), ("v3", "rolled_back")]
    assert [w["devices"] for w in report["deployments"][0]["waves"]] == [2, 6, 13]
    assert [w["devices"] for w in report["deployments"][2]["waves"]] == [2]  # stopped at the canary
    assert [f["action"] for f in report["faults"]] == [
        "broker_restart", "kill_agent", "device_offline", "corrupt_bundle"
    ]  # fmt: skip
    assert report["mqtt"]["connections_lost"] >= 20  # every simulated device lost the broker once


def test_a_scenario_with_an_unknown_action_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"timeline": [{"action": "unplug_everything"}]}))
    r = subprocess.run([sys.executable, "-m", "simulators.cli", "scenario", str(bad)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "unknown action 'unplug_everything'" in r.stderr


def test_a_slow_model_is_stopped_by_the_latency_gate_in_simulation(tmp_path: Path) -> None:
    # simulated traffic gives the gates their evidence: v2 serves like v1 and passes; v3 installs
    # and passes its checks, but serves 30x slower, and is rolled back at its canary wave
    report = run("slow-model.json", tmp_path / "run")
    assert report["invariants"]["held"], report["invariants"]
    assert [(d["image"], d["state"]) for d in report["deployments"]] == [
        ("v1", "succeeded"), ("v2", "succeeded"), ("v3-slow", "rolled_back")
    ]  # fmt: skip
    slow = report["deployments"][2]
    assert "health gate failed: p99" in slow["reason"] and [w["devices"] for w in slow["waves"]] == [2]
    assert report["running"] == {"v2": 20} and report["scoring_requests"] > 500


def test_network_delay_and_loss_slow_and_cut_downloads_and_a_full_disk(tmp_path: Path) -> None:
    # three devices reach the broker through a relay that delays, then loses, everything; a slow
    # download finishes; a transfer cut halfway is resumed (Range) and verified; a device whose
    # disk is full refuses the bundle, and that rollout rolls back
    report = run("network-and-disk.json", tmp_path / "run")
    assert report["invariants"]["held"], report["invariants"]
    assert [(d["image"], d["state"]) for d in report["deployments"]] == [
        ("v1", "succeeded"), ("v2", "succeeded"), ("v3", "succeeded"), ("v4", "rolled_back")
    ]  # fmt: skip
    # sim-011 cannot fit the bundle; sim-010, whose clock runs 10 days ahead, finds the manifest expired
    assert report["deployments"][3]["reason"] == "wave 2: 2 of 9 device(s) failed"
    assert report["running"] == {"v3": 12}
    assert report["mqtt"]["connections_lost"] >= 3  # the three behind the lossy link reconnected
    assert report["mqtt"]["messages_sent"] > 12 * 4 * 5 and report["mqtt"]["bytes_received"] > 0


def test_captures_past_the_disk_budget_are_evicted_and_counted_never_lost(tmp_path: Path) -> None:
    # 4 devices capture every request at 400 requests/s into a 1 MiB buffer for 12 s: about five
    # times the budget; the oldest captures are evicted, each counted, and none is unaccounted for
    report = run("buffer-budget.json", tmp_path / "run")
    assert report["invariants"]["held"], report["invariants"]
    c = report["captures"]
    assert c["evicted"] > c["stored"] > 0 and c["unaccounted"] == 0
    assert c["put"] == c["stored"] + c["evicted"]
    assert c["largest_buffer_bytes"] <= c["budget_bytes"] == 1 << 20
