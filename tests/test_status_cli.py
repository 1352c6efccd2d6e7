"""``edge-agent status`` against a real agent process (simulators/rig.py: mosquitto with mutual TLS, a
bundle server, signed manifests), and against state directories made with the agent's own classes
for the cases a live agent cannot be put in on demand (a reused pid, a wedged agent)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.ops import runinfo, status
from agent.telemetry.buffer import RecordClass
from agent.update.state import StateDB
from edge_core.clock import now_iso
from edge_core.errors import StatusUnavailable
from simulators.rig import AgentProcess, Rig, to_toml, wait_until

DEV = "dev-status"


def cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        user=user,
        cwd=Path(__file__).resolve().parent.parent,
    )


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    r = cli("status", "--config", str(config), "--json")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


class Device:
    def __init__(self, rig: Rig, agent: AgentProcess) -> None:
        self.rig = rig
        self.agent = agent

    def wait_running(self) -> dict[str, Any]:
        """Poll until the status says the agent runs and its channel is connected; return it."""
        seen: list[Any] = [None]

        def running() -> bool:
            rc, doc = status_json(self.agent.config_path)
            seen[0] = (rc, doc)
            channel = ((doc["agent"].get("run") or {}).get("channel")) or {}
            return rc == 0 and channel.get("connected") is True

        assert wait_until(running, timeout=30, interval=0.2), f"{seen[0]}\n{self.agent.log_text()[-3000:]}"
        doc: dict[str, Any] = seen[0][1]
        return doc


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    with Rig(tmp_path_factory.mktemp("status")) as rig:
        agent = rig.add_device(DEV).start()
        b = rig.build_bundle("iris", "1")
        rig.deploy(DEV, rig.manifest(DEV, b, 1))
        rig.wait_active(DEV, 1)
        yield Device(rig, agent)


def test_running_agent_after_a_deployment(dev: Device) -> None:
    doc = dev.wait_running()
    agent = doc["agent"]
    assert agent["running"] is True and agent["reason"] is None
    run = agent["run"]
    assert dev.agent.proc is not None and run["pid"] == dev.agent.proc.pid
    assert run["channel"]["transport"] == "mqtt"
    assert run["channel"]["endpoint"] == f"{dev.rig.broker.host}:{dev.rig.broker.port}"
    assert run["api"], run
    active = doc["active"]
    assert (active["name"], active["version"], active["generation"], active["deployment_id"]) == (
        "iris",
        "1",
        1,
        "dep-1",
    )
    assert active["sha256"] == dev.agent.current_image() and active["since"]
    assert doc["deployment"]["state"] == "active" and doc["deployment"]["error"] is None
    assert doc["rejected"] is None
    assert set(doc["buffer"]["classes"]) == {str(c) for c in RecordClass}

    human = cli("status", "--config", str(dev.agent.config_path))
    assert human.returncode == 0, human.stderr
    rows = dict(line.split(None, 1) for line in human.stdout.splitlines())
    assert rows["agent"].startswith(f"running, pid {run['pid']}")
    assert rows["image"].startswith("iris:1, generation 1, deployment dep-1, since ")
    assert rows["channel"] == f"mqtt {run['channel']['endpoint']}, connected"
    assert rows["deployment"].startswith("generation 1 (dep-1, iris:1): active at ")
    # the values start in one column
    starts = {len(line) - len(line.split(None, 1)[1]) for line in human.stdout.splitlines()}
    assert len(starts) == 1


def test_a_refusal_and_a_failed_deployment_are_shown(dev: Device) -> None:
    dev.rig.publish(DEV, b"not a manifest")
    dev.rig.wait_status(DEV, lambda s: (s.get("rejected") or {}).get("code") == "manifest_malformed")
    _, doc = status_json(dev.agent.config_path)
    assert doc["rejected"]["code"] == "manifest_malformed" and doc["rejected"]["hint"]

    b = dev.rig.build_bundle("iris", "2")
    dev.rig.deploy(DEV, dev.rig.manifest(DEV, b, 2, image={"sha256": "0" * 64}))
    dev.rig.wait_status(DEV, lambda s: s.get("generation") == 2 and s.get("state") == "failed")
    rc, doc = status_json(dev.agent.config_path)
    assert rc == 0
    dep = doc["deployment"]
    assert (dep["generation"], dep["state"], dep["error"]["code"]) == (2, "failed", "digest_mismatch")
    assert dep["error"]["message"] and dep["image"] == {"name": "iris", "version": "2"}
    assert doc["rejected"] is None  # a verified manifest clears the pending refusal
    assert (doc["active"]["generation"], doc["active"]["version"]) == (1, "1")  # still serving gen 1
    human = cli("status", "--config", str(dev.agent.config_path)).stdout
    assert "\nerror       digest_mismatch: " in human


def test_killed_then_stopped_agent_exits_3_and_still_shows_the_image(dev: Device) -> None:
    pid = dev.agent.proc.pid if dev.agent.proc else 0
    dev.agent.kill()  # run.json stays behind, naming a dead pid
    rc, doc = status_json(dev.agent.config_path)
    assert rc == 3
    assert doc["agent"]["running"] is False
    assert doc["agent"]["reason"] == f"stale run.json: pid {pid} is not running"
    assert (doc["active"]["name"], doc["active"]["generation"]) == ("iris", 1)

    dev.agent.start()
    dev.wait_running()
    assert dev.agent.stop() == 0
    rc, doc = status_json(dev.agent.config_path)
    assert rc == 3 and doc["agent"]["reason"].startswith("no run.json")
    assert (doc["active"]["name"], doc["active"]["version"], doc["active"]["generation"]) == ("iris", "1", 1)
    human = cli("status", "--config", str(dev.agent.config_path))
    assert human.returncode == 3 and "\nagent       not running (no run.json" in human.stdout
    # reading a stopped agent's files leaves nothing behind that the agent would trip over
    assert sorted(p.name for p in dev.agent.state_dir.glob("*.db*")) == ["agent.db", "telemetry.db"]


# --- without a live agent ---------------------------------------------------------------------------


def write_config(tmp: Path, state_dir: Path) -> Path:
    (tmp / "signing.pub").write_text("only its existence is validated here")
    path = tmp / "agent.toml"
    path.write_text(
        to_toml({"device_id": "dev-1", "state_dir": str(state_dir), "trust": {"keys": ["signing.pub"]}})
    )
    path.chmod(0o644)
    return path


def test_missing_state_dir_exits_2_naming_it(tmp_path: Path) -> None:
    r = cli("status", "--config", str(write_config(tmp_path, tmp_path / "nowhere")))
    assert r.returncode == 2
    assert f"state directory {tmp_path / 'nowhere'} does not exist" in r.stderr and "hint: " in r.stderr
    r = cli("status", "--config", str(write_config(tmp_path, tmp_path / "nowhere")), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["code"] == "state_unreadable"


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path)
    path.write_text(path.read_text().replace('device_id = "dev-1"', "device_id = 3"))
    r = cli("status", "--config", str(path))
    assert r.returncode == 2 and "invalid configuration: device_id" in r.stderr


def _can_run_as(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return cli("--version", user=user).returncode == 0
    except (KeyError, OSError):
        return False


def test_unreadable_state_dir_says_whom_to_run_as(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(tempfile.mkdtemp(prefix="status-perm-"))  # not under tmp_path: "nobody" must reach it
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o700)
        config = write_config(base, state)
        if os.geteuid() != 0:
            state.chmod(0)
            r = cli("status", "--config", str(config))
            assert r.returncode == 2, r.stdout + r.stderr
            assert f"cannot read state directory {state} as " in r.stderr
        elif _can_run_as("nobody"):
            # root reads everything: ask as another user, as an operator without sudo would
            r = cli("status", "--config", str(config), user="nobody")
            assert r.returncode == 2, r.stdout + r.stderr
            assert f"cannot read state directory {state} as nobody: Permission denied" in r.stderr
            assert f"run it as root, who owns {state}: sudo -u root edge-agent status" in r.stderr
        else:
            # root, and no other user can run this checkout's Python: make the directory another
            # user's and have listing it refused, as the kernel would refuse that user's reader
            os.chown(state, 65534, 65534)
            owner = (
                pwd.getpwuid(65534).pw_name if 65534 in {p.pw_uid for p in pwd.getpwall()} else "uid 65534"
            )
            real = os.listdir

            def refuse(path: Any) -> list[str]:
                if Path(path) == state:
                    raise PermissionError(13, "Permission denied")
                return real(path)

            monkeypatch.setattr(os, "listdir", refuse)
            with pytest.raises(StatusUnavailable) as ei:
                status.read_status(state)
            assert ei.value.message == f"cannot read state directory {state} as root: Permission denied"
            assert ei.value.hint.startswith(
                f"run it as {owner}, who owns {state}: sudo -u {owner} edge-agent"
            )
    finally:
        (base / "state").chmod(stat.S_IRWXU)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state directory as the agent leaves it: one accepted deployment, a refusal, no image."""
    sd = tmp_path / "state"
    db = StateDB(sd / "agent.db")
    payload = json.dumps({"image": {"name": "iris", "version": "7", "sha256": "a" * 64}}).encode()
    db.insert(7, "dep-7", "b" * 64, payload, "k", "downloading")
    db.set_meta("rejected", {"code": "manifest_replay", "message": "m", "hint": "h", "at": now_iso()})
    db.set_meta("sync.intent.capture", {"name": "d/capture/x.jsonl.gz", "first": 1, "last": 9, "count": 9})
    db.close()
    return sd


def run_doc(pid: int, **over: Any) -> dict[str, Any]:
    doc = {
        "pid": pid,
        "version": "0.1.0",
        "started_at": now_iso(),
        "updated_at": now_iso(),
        "ready": True,
        "status": "no image to serve yet; control channel h:1 connected",
        "channel": {"transport": "mqtt", "endpoint": "h:1", "connected": True, "last_error": None},
        "api": "http://127.0.0.1:8080",
    }
    return {**doc, **over}


def test_run_json_present_stale_or_wedged(state_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}
    doc = status.read_status(state_dir)
    assert doc["agent"] == {"running": False, "reason": "no run.json: the agent is not running", "run": None}
    assert doc["deployment"]["state"] == "downloading" and doc["deployment"]["generation"] == 7
    assert doc["rejected"]["code"] == "manifest_replay"
    assert doc["sync"]["pending"]["capture"]["last"] == 9
    assert doc["active"] is None and doc["buffer"] is None

    # this test's own process stands in for a live agent
    runinfo.write(state_dir, run_doc(os.getpid()))
    assert status.read_status(state_dir)["agent"]["running"] is True
    later = time.time() + status.STALE_AFTER_S + 1
    wedged = status.read_agent(state_dir, now=later)
    assert wedged["running"] is False and "has not updated it for" in wedged["reason"]

    # a pid now used by a process started after run.json was written is not the agent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runinfo.write(state_dir, run_doc(child.pid, started_at="2000-01-01T00:00:00Z"))
        reused = status.read_agent(state_dir)
        assert reused["running"] is False and "started after" in reused["reason"]
    finally:
        child.kill()
        child.wait()
    runinfo.write(state_dir, run_doc(child.pid))
    gone = status.read_status(state_dir)
    assert gone["agent"]["reason"] == f"stale run.json: pid {child.pid} is not running"
    assert status.exit_code(gone) == 3
    text = status.format_human(gone)
    assert "\nrejected    manifest_replay: m (at " in text
    assert "uploading" in text and "(last seen)" in text

    (state_dir / runinfo.FILENAME).unlink()
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before  # read, never written
