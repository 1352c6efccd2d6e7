"""The agent as a systemd service: the unit and its drop-in as systemd itself reads them, the notify
protocol against a real datagram socket, and real agent processes speaking it (READY online and
offline, STATUS, the watchdog and its starvation by a hung main loop, STOPPING and a graceful stop
with a request in flight)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.ops import runinfo, sdnotify
from deploy.bundle import build_image
from simulators import models
from simulators.rig import AgentProcess, Rig

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"
DROPIN = ROOT / "systemd" / "accelerator.conf"
EXEC_START = "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml"
#: Exposure scores (0 safe .. 10 unsafe) the sandbox must stay under: the unit scores 1.7 and with
#: the accelerator drop-in 1.9 on systemd 252. Dropping a hardening line raises it past the bound.
MAX_EXPOSURE = 2.0
MAX_EXPOSURE_ACCELERATOR = 2.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd; dev.sh installs it)",
)


# --- the unit, as systemd reads it ------------------------------------------------------------------


def unit_copy(tmp_path: Path, *, accelerator: bool = False) -> Path:
    """The unit with ExecStart on an executable that exists here: `verify` checks that it does,
    and the agent's venv is not at /opt on a test machine. Everything else is the file as shipped."""
    text = UNIT.read_text()
    assert EXEC_START in text.splitlines(), "ExecStart changed: update EXEC_START, install.sh and the docs"
    d = tmp_path / "units"
    d.mkdir()
    unit = d / "edge-agent.service"
    unit.write_text(
        text.replace(
            "ExecStart=/opt/edge-agent/venv/bin/edge-agent", f"ExecStart={sys.executable} -m agent.ops.cli"
        )
    )
    if accelerator:
        # `verify` and `security` read drop-ins from <unit>.d/ beside the unit file they are given.
        (d / "edge-agent.service.d").mkdir()
        shutil.copy(DROPIN, d / "edge-agent.service.d" / "accelerator.conf")
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )


def security(unit: Path) -> tuple[float, dict[str, bool]]:
    text = analyze("security", "--offline=yes", str(unit))
    assert text.returncode == 0, text.stderr
    m = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", text.stdout)
    assert m, text.stdout
    js = analyze("security", "--offline=yes", "--json=short", str(unit))
    assert js.returncode == 0, js.stderr
    return float(m.group(1)), {item["json_field"]: item["set"] for item in json.loads(js.stdout)}


def assert_verifies(unit: Path) -> None:
    r = analyze("verify", "--man=no", str(unit))
    # verify exits 0 even for unknown keys or bad values (it only warns): any line about our files
    # is a failure.
    ours = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if "edge-agent" in line or str(unit.parent) in line
    ]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@needs_analyze
def test_the_unit_verifies(tmp_path: Path) -> None:
    assert_verifies(unit_copy(tmp_path))


@needs_analyze
def test_the_unit_is_sandboxed(tmp_path: Path) -> None:
    exposure, checks = security(unit_copy(tmp_path))
    assert exposure < MAX_EXPOSURE, f"exposure {exposure}: a hardening line went missing"
    hardened = """UserOrDynamicUser NoNewPrivileges ProtectSystem ProtectHome PrivateTmp PrivateDevices
        CapabilityBoundingSet_CAP_SYS_ADMIN AmbientCapabilities RestrictAddressFamilies_AF_PACKET
        RestrictAddressFamilies_AF_NETLINK RestrictNamespaces_user SystemCallArchitectures NotifyAccess
        ProtectKernelModules ProtectKernelTunables RestrictSUIDSGID"""
    for field in hardened.split():
        assert checks[field] is True, field
    # Deliberately off: onnxruntime, cffi and ctypes need W+X mappings (see the unit's comment).
    assert checks["MemoryDenyWriteExecute"] is False


@needs_analyze
def test_the_accelerator_drop_in_verifies_and_applies(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path, accelerator=True)
    assert_verifies(unit)
    exposure, checks = security(unit)
    # PrivateDevices off proves the drop-in was read; the device ACL keeps the rest closed.
    assert checks["PrivateDevices"] is False
    assert exposure < MAX_EXPOSURE_ACCELERATOR, exposure


def test_the_unit_says_what_the_service_needs() -> None:
    settings = [line for line in UNIT.read_text().splitlines() if line and not line.startswith("#")]
    wanted = """Type=notify NotifyAccess=main WatchdogSec=30 Restart=always KillMode=mixed User=edge-agent
        Group=edge-agent StateDirectory=edge-agent ConfigurationDirectory=edge-agent PrivateDevices=true
        CapabilityBoundingSet= SystemCallFilter=@system-service UMask=0027"""
    for want in wanted.split():
        assert want in settings, want
    assert not any(s.startswith("MemoryDenyWriteExecute") for s in settings)
    start = next(s for s in settings if s.startswith("TimeoutStartSec="))
    from agent.config import ServiceConfig

    assert float(start.split("=")[1]) > ServiceConfig().ready_timeout


# --- the notify protocol, against a real socket ---------------------------------------------------


class NotifySocket:
    """What systemd's end of $NOTIFY_SOCKET sees: each datagram as a dict of its assignments."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.name = f"@edge-agent-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + self.name[1:])
            self._dir: str | None = None
        else:
            # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
            self._dir = tempfile.mkdtemp(prefix="sdn-")
            self.name = os.path.join(self._dir, "notify")
            self.sock.bind(self.name)
        self.seen: list[dict[str, str]] = []

    def recv(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        msg = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
        self.seen.append(msg)
        return msg

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str = ""
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None and predicate(msg):
                return msg
        raise AssertionError(f"no notification {what} within {timeout} s; seen: {self.seen[-10:]}")

    def drain(self) -> list[dict[str, str]]:
        out = []
        while (msg := self.recv(0.001)) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=request.param == "abstract")
    yield s
    s.close()


def test_ready_and_status_arrive_in_one_datagram(listener: NotifySocket) -> None:
    n = sdnotify.Notifier(listener.name)
    assert n.enabled
    assert n.notify(READY=1, STATUS="serving iris:2 (generation 7)")
    assert listener.recv(5) == {"READY": "1", "STATUS": "serving iris:2 (generation 7)"}
    assert n.notify(WATCHDOG=1) and listener.recv(5) == {"WATCHDOG": "1"}
    assert n.stopping() and listener.recv(5) == {"STOPPING": "1"}
    assert n.extend_timeout(1.5) and listener.recv(5) == {"EXTEND_TIMEOUT_USEC": "1500000"}
    n.close()


def test_a_value_cannot_smuggle_an_assignment(listener: NotifySocket) -> None:
    n = sdnotify.Notifier(listener.name)
    n.notify(STATUS="offline: broker said\nREADY=1\nMAINPID=1")
    assert listener.recv(5) == {"STATUS": "offline: broker said READY=1 MAINPID=1"}
    n.notify(STATUS="x" * 10_000)
    assert len(listener.recv(5)["STATUS"]) == sdnotify.MAX_VALUE_CHARS  # type: ignore[index]


def test_from_env_reads_and_unsets_the_variables(listener: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "1000000", "OTHER": "kept"}
    n = sdnotify.Notifier.from_env(env, unset=True)
    assert env == {"OTHER": "kept"}  # score.py workers must not inherit them
    assert n.watchdog_interval == 0.5 and n.notify(WATCHDOG=1)
    assert listener.recv(5) == {"WATCHDOG": "1"}


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = sdnotify.Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval is None
    assert n.notify(READY=1) is False and n.notify(WATCHDOG=1) is False and n.stopping() is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # another process's
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us(
    env: dict[str, str], interval: float | None
) -> None:
    assert sdnotify.watchdog_interval(env) == interval


def test_send_failures_never_raise_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    d = tempfile.mkdtemp(prefix="sdn-")
    try:
        n = sdnotify.Notifier(os.path.join(d, "nobody-listens"))
        with caplog.at_level("WARNING", logger="edge.sdnotify"):
            assert n.notify(WATCHDOG=1) is False
            assert n.notify(WATCHDOG=1) is False
        assert [r.getMessage() for r in caplog.records].count("sdnotify.send_failed") == 1
    finally:
        shutil.rmtree(d)


def test_unsupported_addresses_are_refused_not_guessed() -> None:
    assert sdnotify.socket_address("relative/path") is None
    assert sdnotify.socket_address("vsock:2:1234") is None
    n = sdnotify.Notifier("relative/path")
    assert not n.enabled and n.notify(READY=1) is False


def test_a_manager_that_stops_reading_does_not_block_the_caller(listener: NotifySocket) -> None:
    n = sdnotify.Notifier(listener.name)
    # Nobody reads: the queue fills, and then a send times out instead of blocking the main loop.
    for _ in range(100_000):
        if not n.notify(WATCHDOG=1):
            break
    else:
        pytest.fail("the receive queue never filled")
    assert listener.drain()  # and the socket works again once it is read
    assert n.notify(WATCHDOG=1)


# --- real agents ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig(tmp_path_factory.mktemp("systemd")) as r:
        yield r


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    s = NotifySocket()
    yield s
    s.close()


def start_agent(
    rig: Rig, device_id: str, notify: NotifySocket, overrides: dict[str, Any] | None = None, **env: str
) -> AgentProcess:
    agent = rig.add_device(device_id, overrides)
    return agent.start({"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000", **env})


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


def test_ready_status_watchdog_and_stopping(rig: Rig, notify: NotifySocket) -> None:
    dev = "dev-sd-online"
    agent = start_agent(rig, dev, notify)
    endpoint = f"{rig.broker.host}:{rig.broker.port}"
    ready = notify.wait_for(lambda m: "READY" in m, 30, "READY=1")
    assert ready["STATUS"] == f"no image to serve yet; control channel {endpoint} connected", ready
    assert any(m.get("STATUS", "").startswith("starting") for m in notify.seen[:-1]), notify.seen
    rig.op.wait_for(dev, lambda d: d.get("online") is True, timeout=15, kind="online")

    b = rig.build_bundle("iris", "1")
    rig.deploy(dev, rig.manifest(dev, b, 1))
    rig.wait_active(dev, 1)
    notify.wait_for(
        lambda m: m.get("STATUS") == f"serving iris:1 (generation 1); control channel {endpoint} connected",
        15, "STATUS serving iris:1",
    )  # fmt: skip
    pings = [m for m in notify.seen if m.get("WATCHDOG") == "1"]
    while len(pings) < 3:
        pings.append(notify.wait_for(lambda m: m.get("WATCHDOG") == "1", 10, "WATCHDOG=1"))

    # run.json is written right after the STATUS is sent, in the same tick
    doc = wait_until(
        lambda: (d := runinfo.read(agent.state_dir)) and d["status"].startswith("serving iris:1") and d,
        10, "run.json serving iris:1",
    )  # fmt: skip
    assert agent.proc is not None
    assert doc["pid"] == agent.proc.pid and doc["ready"] is True
    assert doc["status"] == f"serving iris:1 (generation 1); control channel {endpoint} connected"
    assert doc["channel"] == {
        "transport": "mqtt",
        "endpoint": endpoint,
        "connected": True,
        "last_error": None,
    }
    assert doc["api"].startswith("http://127.0.0.1:")
    assert {"version", "started_at", "updated_at"} <= doc.keys()
    assert f'"endpoint": "{endpoint}"' in agent.log_text()  # agent.starting names the channel's endpoint

    agent.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait_for(lambda m: "STOPPING" in m, 15, "STOPPING=1")
    assert stopping["STATUS"].startswith("stopping (SIGTERM)")
    assert agent.wait(30) == 0, agent.log_text()[-3000:]
    online = rig.op.wait_for(dev, lambda d: d.get("online") is False, timeout=15, kind="online")
    assert online["reason"] == "shutdown"
    assert runinfo.read(agent.state_dir) is None  # removed at a clean exit


def test_ready_comes_offline_after_ready_timeout(rig: Rig, notify: NotifySocket) -> None:
    dead = socket.socket()  # bound and never listening: every connection attempt is refused
    dead.bind(("127.0.0.1", 0))
    try:
        port = dead.getsockname()[1]
        agent = start_agent(
            rig, "dev-sd-offline", notify, {"mqtt": {"port": port}, "service": {"ready_timeout": 1.0}}
        )
        ready = notify.wait_for(lambda m: "READY" in m, 30, "READY=1 offline")
        assert ready["STATUS"].startswith(
            f"no image to serve yet; control channel 127.0.0.1:{port} offline: "
        )
        assert ready["STATUS"].endswith(", retrying")
        # READY=1 with a STATUS that says offline, and the device keeps serving its API.
        doc = wait_until(lambda: (d := runinfo.read(agent.state_dir)) and d["ready"] and d, 10, "run.json")
        assert doc["channel"]["connected"] is False and doc["status"] == ready["STATUS"]
        assert httpx.get(doc["api"] + "/v2/health/live", timeout=10).status_code == 200
        assert agent.running
        assert agent.stop() == 0
    finally:
        dead.close()


def test_a_hung_main_loop_stops_the_watchdog_pings(rig: Rig, notify: NotifySocket) -> None:
    # No core file from the SIGABRT below (the agent inherits this limit).
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
    try:
        # The 4th tick hangs: the first three ping, whenever the connection comes.
        agent = start_agent(rig, "dev-sd-hung", notify, EDGE_FAULT_HANG_AT="main.tick@4")
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, core)
    try:
        notify.wait_for(lambda m: m.get("WATCHDOG") == "1", 30, "a first WATCHDOG=1")
        wait_until(lambda: '"fault.hang"' in agent.log_text(), 30, "the hang")
        notify.drain()  # pings sent before the hang began
        # Systemd would now see no ping for WatchdogSec. Here: a window of six ping intervals.
        deadline = time.monotonic() + 3.0
        while (left := deadline - time.monotonic()) > 0:
            msg = notify.recv(left)
            assert msg is None or "WATCHDOG" not in msg, msg
        assert agent.running  # hung, not dead: only the watchdog can tell
        # What systemd's watchdog then does: SIGABRT. The journal gets every thread's stack.
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGABRT)
        assert agent.wait(30) == -signal.SIGABRT
        assert "in _block_forever" in agent.log_text()
    finally:
        agent.kill()


def test_a_dead_background_thread_stops_the_agent(rig: Rig, notify: NotifySocket) -> None:
    """A background thread that dies leaves a process that looks alive and lacks a capability: the
    daemon's supervisor sees it on its next tick, logs the stack, says STOPPING and exits 1, so that
    systemd restarts the agent whole."""
    agent = start_agent(
        rig, "dev-sd-thread", notify, {"telemetry": {"interval": 0.2}}, EDGE_FAULT_FAIL_AT="telemetry.loop"
    )
    try:
        assert agent.wait(30) == 1, agent.log_text()[-3000:]
        lines = [json.loads(line) for line in agent.log_text().splitlines() if line.startswith("{")]
        crashed = next(x for x in lines if x.get("event") == "thread.crashed")
        assert crashed["thread"] == "telemetry" and "injected I/O error at telemetry.loop" in crashed["error"]
        assert "faults.py" in crashed["traceback"]
        died = next(x for x in lines if x.get("event") == "agent.thread_died")
        assert died["threads"] == ["telemetry"]
        stopping = notify.wait_for(lambda m: m.get("STOPPING") == "1", 10, "STOPPING=1")
        assert "the telemetry thread died" in stopping["STATUS"]
    finally:
        agent.kill()


def test_a_hung_scoring_api_stops_the_watchdog_pings(rig: Rig, notify: NotifySocket) -> None:
    """The main loop is fine, but the API's event loop is blocked: the device no longer serves, and
    that too must end in a restart."""
    agent = start_agent(
        rig,
        "dev-sd-api-hung",
        notify,
        {"service": {"api_stall_timeout": 1.0}},
        EDGE_FAULT_HANG_AT="api.request",
    )
    try:
        notify.wait_for(lambda m: m.get("WATCHDOG") == "1", 30, "a first WATCHDOG=1")
        doc = wait_until(lambda: (d := runinfo.read(agent.state_dir)) and d.get("api") and d, 10, "run.json")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(doc["api"] + "/v2/health/live", timeout=0.5)  # this request blocks the loop
        wait_until(lambda: '"fault.hang"' in agent.log_text(), 30, "the hang")
        unhealthy = notify.wait_for(
            lambda m: m.get("STATUS", "").startswith("unhealthy: the scoring API's event loop"),
            15,
            "unhealthy",
        )
        assert "WATCHDOG" not in unhealthy
        deadline = time.monotonic() + 3.0
        while (left := deadline - time.monotonic()) > 0:
            msg = notify.recv(left)
            assert msg is None or "WATCHDOG" not in msg, msg
        assert agent.running
    finally:
        agent.kill()


SLOW_SCORE_PY = """
import json, os, time

def init():
    pass

def run(raw_data):
    req = json.loads(raw_data)
    open(req["marker"], "w").close()  # the test's signal that the request is in flight
    time.sleep(req["sleep"])
    return {"slept": req["sleep"]}
"""


def test_sigterm_lets_the_request_in_flight_finish(rig: Rig, notify: NotifySocket, tmp_path: Path) -> None:
    dev = "dev-sd-graceful"
    agent = start_agent(rig, dev, notify)
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text(SLOW_SCORE_PY)
    b = rig.bundles_dir / "slow-1.tar"
    build_image(b, "slow", "1", {"mlp": models.mlp(src / "mlp.onnx", seed=1)}, score=src / "score.py")
    rig.deploy(dev, rig.manifest(dev, b, 1))
    status = rig.wait_active(dev, 1, timeout=90)
    marker = tmp_path / "in-flight"
    result: dict[str, Any] = {}

    def request() -> None:
        try:
            r = httpx.post(
                status["runtime"]["api"] + "/score", json={"marker": str(marker), "sleep": 3}, timeout=60
            )
            result["status"], result["body"] = r.status_code, r.json()
        except Exception as exc:  # the assertion below reports it
            result["error"] = repr(exc)

    t = threading.Thread(target=request)
    t.start()
    try:
        wait_until(marker.exists, 30, "the request reached score.py")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: "STOPPING" in m, 15, "STOPPING=1")
        # A second SIGTERM and a Ctrl-C during the shutdown do not cut it short.
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.send_signal(signal.SIGINT)
    finally:
        t.join(60)
    assert result == {"status": 200, "body": {"slept": 3}}, result
    assert agent.wait(30) == 0, agent.log_text()[-3000:]
    assert '"agent.already_stopping"' in agent.log_text()
