"""The control plane end to end, through a real mosquitto broker (mutual TLS, per-device ACL), real
`edge-agent` processes, a real HTTP artifact endpoint and the `edge-deploy` command line:

register models, build images from them, deploy by tag in waves and see every device active; update
to v2 under a (passing) latency gate; a broken v3 whose smoke test fails on the devices stops at
the canary; a slow v4 that installs and passes its smoke test is stopped by the latency gate and
its canaries are rolled back; deployments are found by model and by image.

The tests share one fleet and one registry and run in this order: each starts from what the one
before it left (the images it registered, what the devices run)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from deploy import cli
from deploy.registry import Registry
from simulators import models
from simulators.broker import free_port
from simulators.bundle_server import BundleServer
from simulators.rig import Rig, wait_until

DEVICES = ["dev-1", "dev-2", "dev-3", "dev-4"]
#: soak 2 s per wave, then p99 on the new image against the same devices before (the ratio follows)
GATE = ["--json", "--gate-soak", "2", "--gate-min-requests", "5", "--gate-max-p99-ratio"]
X = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)

SCORE_PY = """
import json, os, time
import numpy as np
import onnxruntime as ort

def init():
    global sess
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx"), o,
                                providers=["CPUExecutionProvider"])

def run(raw):
    time.sleep(SLEEP)
    y = sess.run(None, {"x": np.asarray(json.loads(raw)["data"], dtype=np.float32)})[0]
    return {"y": (y + OFFSET).tolist()}
"""


class Plane:
    """The `edge-deploy` command line on one control-plane home, run in this process."""

    def __init__(self, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.home, self.capsys = home, capsys

    def __call__(self, *argv: str) -> tuple[int, Any, str]:
        self.capsys.readouterr()
        rc = cli.main(["--home", str(self.home), *argv])
        out, err = self.capsys.readouterr()
        try:
            doc = json.loads(out) if out.strip() else None
        except ValueError:
            doc = out
        return rc, doc, err

    def ok(self, *argv: str) -> Any:
        rc, doc, err = self(*argv)
        assert rc == 0, f"edge-deploy {' '.join(argv)} -> {rc}\n{err}\n{doc}"
        return doc


class Env:
    def __init__(self, rig: Rig, home: Path, src: Path) -> None:
        self.rig, self.home, self.src = rig, home, src

    def status(self, device: str) -> dict[str, Any]:
        doc = self.rig.op.report(device)
        assert doc is not None
        return doc

    def image_sha(self, ref: str) -> str:
        name, version = ref.split(":")
        reg = Registry(self.home / "registry.db")
        try:
            return reg.image(name, int(version)).sha256
        finally:
            reg.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("cp")
    home = work / "home"
    src = work / "src"
    src.mkdir()
    with Rig(work / "rig") as rig:
        (home / "keys").mkdir(parents=True)
        # the control plane signs with the key the devices trust
        for suffix in ("key", "pub"):
            (home / "keys" / f"signing.{suffix}").write_bytes(
                (rig.pubkey_path.parent / f"signing.{suffix}").read_bytes()
            )
        artifacts = BundleServer(home / "artifacts").start()
        cert = rig.broker.client_cert("operator")
        (home / "config.toml").write_text(
            f"""
[broker]
host = "{rig.broker.host}"
port = {rig.broker.operator_port}
ca = "{cert.ca_path}"
cert = "{cert.cert_path}"
key = "{cert.key_path}"
prefix = "{rig.broker.prefix}"

[artifacts]
public_url = "{artifacts.url}/"
"""
        )
        for d in DEVICES:
            rig.add_device(d, {"telemetry": {"interval": 0.3}, "runtime": {"workers": 1}}).start()
        for d in DEVICES:
            rig.wait_status(d, lambda s: s.get("state") == "idle", timeout=60)
        try:
            yield Env(rig, home, src)
        finally:
            artifacts.stop()


@pytest.fixture
def plane(env: Env, capsys: pytest.CaptureFixture[str]) -> Plane:
    return Plane(env.home, capsys)


def _score_files(env: Env, name: str, model: Path, *, sleep: float = 0.0, offset: float = 0.0) -> list[str]:
    """score.py with a sleep and an output offset, and a smoke test that expects the true answer."""
    score = env.src / f"{name}.py"
    score.write_text(SCORE_PY.replace("SLEEP", repr(sleep)).replace("OFFSET", repr(offset)))
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": X})[0]
    (env.src / f"{name}-req.json").write_text(json.dumps({"data": X.tolist()}))
    (env.src / f"{name}-resp.json").write_text(json.dumps({"y": want.tolist()}))
    return ["--score", str(score), "--sample-request", str(env.src / f"{name}-req.json"),
            "--expected-response", str(env.src / f"{name}-resp.json")]  # fmt: skip


class Load:
    """Paced scoring traffic on every device's /score, so heartbeats carry latencies for the gates."""

    def __init__(self, env: Env, devices: list[str]) -> None:
        self.urls = [env.status(d)["runtime"]["api"] for d in devices]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(u,), daemon=True) for u in self.urls]

    def _run(self, url: str) -> None:
        body = {"data": X.tolist()}
        with httpx.Client(base_url=url, timeout=10) as c:
            while not self.stop.is_set():
                # a failed request is counted by the agent itself, which is what the gate reads
                with contextlib.suppress(httpx.HTTPError):
                    c.post("/score", json=body)
                self.stop.wait(0.04)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _states(plane: Plane, dep_id: str) -> dict[str, str]:
    return {m["device_id"]: m["state"] for m in plane.ok("deploy", "show", dep_id, "--json")["members"]}


def test_register_deploy_update_and_automatic_rollbacks(env: Env, plane: Plane) -> None:
    m1 = models.mlp(env.src / "m1.onnx", seed=1)
    m2 = models.mlp(env.src / "m2.onnx", seed=2)
    r1 = plane.ok("model", "register", "mlp", str(m1), "--tag", "task=demo", "--json")
    r2 = plane.ok(
        "model", "register", "mlp", str(m2), "--tag", "task=demo", "--property", "auc=0.91", "--json"
    )
    assert (r1["version"], r2["version"]) == (1, 2)
    assert r2["properties"] == {"auc": "0.91"} and r2["inputs"][0]["name"] == "x"
    assert [m["ref"] for m in plane.ok("model", "list", "--tag", "task=demo", "--json")] == ["mlp:1", "mlp:2"]

    i1 = plane.ok(
        "image", "build", "--name", "clf", "--model", "mlp=mlp:1", *_score_files(env, "v1", m1), "--json"
    )
    assert i1["ref"] == "clf:1" and i1["models"] == ["mlp:1"]

    devices = {d["id"]: d for d in plane.ok("device", "list", "--json")}
    assert set(DEVICES) <= set(devices) and all(devices[d]["online"] for d in DEVICES)
    for d in DEVICES:
        plane.ok("device", "tag", d, "fleet=edge", "--json")
    plane.ok("device", "tag", "dev-4", "site=lab", "--json")

    # --dry-run: the plan, with nothing created, signed or published
    before = plane.ok("deploy", "list", "--json")
    plan = plane.ok(
        "deploy", "create", "clf:1", "--tag-query", "fleet=edge", "--canary", "1", "--dry-run", "--json"
    )
    assert plan["dry_run"] is True and [len(w["devices"]) for w in plan["waves"]] == [1, 2, 1], plan
    assert sorted(m["device"] for m in plan["manifests"]) == sorted(DEVICES)
    assert plane.ok("deploy", "list", "--json") == before
    assert all(env.rig.agents[d].current_image() is None for d in DEVICES)

    # v1 by tag, in waves of 1, 2, 1
    v1 = plane.ok("deploy", "create", "clf:1", "--tag-query", "fleet=edge", "--canary", "1", "--json")
    assert v1["state"] == "succeeded" and v1["waves"] == 3, v1
    sha1 = env.image_sha("clf:1")
    for d in DEVICES:
        assert env.rig.agents[d].current_image() == sha1
        assert env.status(d)["state"] == "active" and env.status(d)["deployment_id"] == v1["id"]

    # v2 under a latency gate it passes (the same score.py, other weights)
    i2 = plane.ok(
        "image", "build", "--name", "clf", "--model", "mlp=mlp:2", *_score_files(env, "v2", m2), "--json"
    )
    sha2 = env.image_sha(i2["ref"])
    with Load(env, DEVICES):
        v2 = plane.ok("deploy", "create", "clf:2", "--tag-query", "fleet=edge", "--canary", "2", *GATE, "20")
    assert v2["state"] == "succeeded", v2
    assert [e["kind"] for e in v2["events"]].count("gate_passed") == 2  # waves of 2 and 2
    assert all(env.rig.agents[d].current_image() == sha2 for d in DEVICES)

    # v3: installs, but its smoke test fails on the device: stopped at the canary
    plane.ok("image", "build", "--name", "clf", "--model", "mlp=mlp:2",
             *_score_files(env, "v3", m2, offset=1.0), "--json")  # fmt: skip
    rc, v3, err = plane("deploy", "create", "clf:3", "--tag-query", "fleet=edge", "--canary", "1", "--json")
    assert rc == 1 and v3["state"] == "rolled_back", (v3, err)
    canary = next(m for m in v3["members"] if m["wave"] == 1)
    assert canary["state"] == "reverted", canary  # the agent kept v2; v2 is its desired state again
    assert "smoke_test_failed" in json.dumps(v3["events"])
    assert [m["state"] for m in v3["members"] if m["wave"] > 1] == ["pending"] * 3  # never published
    assert all(env.rig.agents[d].current_image() == sha2 for d in DEVICES)

    # v4: installs and passes its smoke test, but serves slowly: the latency gate rolls it back
    plane.ok("image", "build", "--name", "clf", "--model", "mlp=mlp:2",
             *_score_files(env, "v4", m2, sleep=0.25), "--json")  # fmt: skip
    with Load(env, DEVICES):
        rc, v4, err = plane(
            "deploy", "create", "clf:4", "--tag-query", "fleet=edge", "--canary", "2", *GATE, "5"
        )
    assert rc == 1 and v4["state"] == "rolled_back", (v4, err)
    failed_gate = [e for e in v4["events"] if e["kind"] == "gate_failed"]
    assert len(failed_gate) == 1 and "p99" in failed_gate[0]["detail"]["violations"][0], v4["events"]
    waves = {m["device_id"]: m for m in v4["members"]}
    canaries = [d for d, m in waves.items() if m["wave"] == 1]
    assert len(canaries) == 2 and all(waves[d]["state"] == "reverted" for d in canaries), v4["members"]
    assert all(m["state"] == "pending" for m in waves.values() if m["wave"] > 1)
    for d in DEVICES:
        assert env.rig.agents[d].current_image() == sha2, d
        assert env.status(d)["active"]["sha256"] == sha2
    # the rollback is a new generation naming the old image
    assert all(env.status(d)["deployment_id"] == v4["id"] + "-rb" for d in canaries)

    # search by model and by image
    by_model = {d["id"] for d in plane.ok("deploy", "list", "--model", "mlp:2", "--json")}
    assert by_model == {v2["id"], v3["id"], v4["id"]}
    assert [d["id"] for d in plane.ok("deploy", "list", "--model", "mlp:1", "--json")] == [v1["id"]]
    assert [d["id"] for d in plane.ok("deploy", "list", "--image", "clf:4", "--json")] == [v4["id"]]
    assert {d["id"] for d in plane.ok("deploy", "list", "--state", "rolled_back", "--json")} == {
        v3["id"],
        v4["id"],
    }
    assert [d["id"] for d in plane.ok("deploy", "list", "--image", "clf", "--json")] == [
        v1["id"], v2["id"], v3["id"], v4["id"]
    ]  # fmt: skip
    shown = plane.ok("image", "show", "clf:2", "--json")
    assert shown["deployments"] == [v2["id"]] and shown["models"] == ["mlp:2"]


def test_bad_input_is_refused_with_a_code_and_nothing_changes(env: Env, plane: Plane, tmp_path: Path) -> None:
    def refused(code: str, *argv: str, rc: int = 2) -> str:
        got, _doc, err = plane(*argv)
        assert got == rc and code in err, (argv, got, err)
        return err

    refused("model_not_found", "image", "build", "--name", "x", "--model", "nosuch:3")
    refused("image_not_found", "deploy", "create", "nosuch:1", "--device", "dev-1")
    refused("device_not_found", "device", "tag", "dev-404", "a=b")
    refused("device_not_found", "deploy", "create", "clf", "--device", "dev-404")
    refused("no_matching_devices", "deploy", "create", "clf", "--tag-query", "fleet=mars")
    refused("invalid_argument", "deploy", "create", "clf", "--tag-query", "fleet")
    refused("deployment_not_found", "deploy", "pause", "dep-nosuch")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    refused("model_invalid", "model", "register", "bad", str(bad))
    refused("file_unreadable", "model", "register", "bad", str(tmp_path / "missing.onnx"))
    refused("file_unreadable", "model", "register", "bad", str(tmp_path))
    assert plane.ok("model", "list", "--name", "bad", "--json") == []
    err = refused("in_use", "model", "delete", "mlp:2")
    assert "clf:2" in err and "clf:4" in err
    refused("in_use", "image", "delete", "clf:2")
    refused("invalid_argument", "model", "delete", "mlp")  # deleting needs an exact version
    refused("invalid_argument", "deploy", "create", "clf", "--device", "dev-1", "--gate-max-p99-ratio", "2")

    # a broker that is not there: exit 4, and the registry is untouched
    away = tmp_path / "away"
    away.mkdir()
    (away / "config.toml").write_text(f"[broker]\nport = {free_port('127.0.0.1')}\nconnect_timeout = 1.0\n")
    rc, _doc, err = Plane(away, plane.capsys)("device", "list")
    assert rc == 4 and "broker_unreachable" in err, err


def test_one_rollout_per_device_and_a_device_that_never_answers(env: Env, plane: Plane) -> None:
    latest = plane.ok("image", "list", "--name", "clf", "--json")[1]["ref"]  # clf:2, what every device runs
    first = plane.ok("deploy", "create", latest, "--device", "dev-4", "--no-wait", "--json")
    assert first["state"] == "running"
    rc, _doc, err = plane("deploy", "create", latest, "--tag-query", "site=lab")
    assert rc == 2 and "device_busy" in err and first["id"] in err
    aborted = plane("deploy", "abort", first["id"], "--json")
    assert aborted[0] == 0 and aborted[1]["state"] == "aborted"

    agent = env.rig.agents["dev-4"]
    agent.stop()
    try:
        rc, dep, err = plane(
            "deploy", "create", "clf:1", "--device", "dev-4", "--wave-timeout", "2", "--json"
        )
        assert rc == 1 and dep["state"] == "rolled_back", (dep, err)
        member = dep["members"][0]
        assert member["state"] == "revert_failed" and member["error"]["code"] == "timeout", member
        assert "timeout" in json.dumps([e for e in dep["events"] if e["kind"] == "device_failed"])
    finally:
        agent.start()
    # back online, the device finds its previous image retained for it, not the rolled-back one
    sha2 = env.image_sha(latest)
    env.rig.wait_status(
        "dev-4", lambda s: s.get("deployment_id") == dep["id"] + "-rb" and s["state"] == "active"
    )
    assert wait_until(lambda: agent.current_image() == sha2, 10)


class Serve:
    """`edge-deploy serve` as a real process: the artifact endpoint and the driver of live rollouts."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = env.home / "serve.log"

    def start(self) -> Serve:
        port = free_port("127.0.0.1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.cli", "--home", str(self.env.home), "serve",
                 "--listen", f"127.0.0.1:{port}"],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def _wait_state(plane: Plane, dep_id: str, pred: Any, timeout: float = 60.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = plane.ok("deploy", "show", dep_id, "--json")
        return bool(pred(last))

    assert wait_until(check, timeout, interval=0.2), last
    return last


def test_serve_drives_rollouts_through_pause_resume_a_crash_and_an_operator_rollback(
    env: Env, plane: Plane
) -> None:
    sha = {ref: env.image_sha(ref) for ref in ("clf:1", "clf:2")}
    assert all(env.rig.agents[d].current_image() == sha["clf:2"] for d in DEVICES)
    serve = Serve(env).start()
    try:
        # an absolute gate: each wave serves 3 s before the next one starts
        dep = plane.ok("deploy", "create", "clf:1", "--tag-query", "fleet=edge", "--canary", "1", "--no-wait",
                       "--gate-soak", "3", "--gate-max-error-rate", "0.5", "--json")  # fmt: skip
        dep_id = dep["id"]
        _wait_state(plane, dep_id, lambda d: d["wave"] == 1 and d["counts"].get("active") == 1)
        paused = plane.ok("deploy", "pause", dep_id, "--no-wait", "--json")
        assert paused["state"] == "running"  # recorded; serve carries it out
        _wait_state(plane, dep_id, lambda d: d["state"] == "paused")

        # the control plane dies while the rollout is paused; a new one takes it over
        serve.kill()
        time.sleep(4)  # longer than the soak: paused, nothing moved
        assert plane.ok("deploy", "show", dep_id, "--json")["wave"] == 1
        serve.start()
        plane.ok("deploy", "resume", dep_id, "--no-wait", "--json")
        done = _wait_state(plane, dep_id, lambda d: d["state"] in ("succeeded", "rolled_back"), timeout=90)
        assert done["state"] == "succeeded" and done["waves"] == 3, done
        assert all(env.rig.agents[d].current_image() == sha["clf:1"] for d in DEVICES)

        # rolling back an older deployment would undo this one: refused
        older = plane.ok("deploy", "list", "--image", "clf:2", "--state", "succeeded", "--json")[0]["id"]
        rc, _doc, err = plane("deploy", "rollback", older)
        assert rc == 2 and "deployment_state_conflict" in err and dep_id in err
        # rolling back the newest one puts every device back on what it ran before
        rc, back, err = plane("deploy", "rollback", dep_id, "--json")
        assert rc == 0 and back["state"] == "rolled_back", (back, err)
        assert {m["state"] for m in back["members"]} == {"reverted"}
        for d in DEVICES:
            assert env.rig.agents[d].current_image() == sha["clf:2"], d
    finally:
        serve.kill()


def test_a_broker_outage_in_the_middle_of_a_rollout_only_delays_it(env: Env, plane: Plane) -> None:
    sha1 = env.image_sha("clf:1")
    outage = {"done": False}

    def cut_the_broker() -> None:
        reg = Registry(env.home / "registry.db")
        try:
            # once the canary is active (the rollout is soaking wave 1), the broker goes away for 3 s
            def canary_active() -> bool:
                deps = reg.deployments(image=("clf", 1), state="running")
                return bool(deps) and any(m["state"] == "active" for m in reg.members(deps[-1]["id"]))

            if wait_until(canary_active, 60):
                env.rig.broker.stop()
                time.sleep(3)
                env.rig.broker.start()
                outage["done"] = True
        finally:
            reg.close()

    t = threading.Thread(target=cut_the_broker)
    t.start()
    rc, dep, err = plane("deploy", "create", "clf:1", "--tag-query", "fleet=edge", "--canary", "1",
                         "--gate-soak", "2", "--gate-max-error-rate", "0.5", "--json")  # fmt: skip
    t.join()
    assert outage["done"]
    assert rc == 0 and dep["state"] == "succeeded", (dep, err)
    for d in DEVICES:
        assert env.rig.agents[d].current_image() == sha1, d

    # on a terminal, following a rollout shows one progress line; as JSON on stdout, the result
    master, slave = os.openpty()
    r = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "--home", str(env.home), "deploy", "watch", dep["id"], "--json"],
        stdout=subprocess.PIPE, stderr=slave, timeout=60,
    )  # fmt: skip
    os.close(slave)
    line = os.read(master, 65536).decode()
    os.close(master)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"
    assert f"{dep['id']} succeeded" in line and "wave 3/3 [########################] active 4" in line, line
