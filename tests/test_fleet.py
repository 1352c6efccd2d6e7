"""The fleet simulator: 20 simulated devices (the agent's own deployer, store, fetcher and MQTT
channel, on one selector loop) against a real mosquitto with mutual TLS, driven by the real control
plane. A rollout to all of them; a broker restart in the middle of the next one; a bundle that the
server corrupts, stopped at the canary and rolled back. After each, every device's status says
what its disk runs, and no device is left half-installed."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deploy import config
from deploy.plane import ControlPlane
from deploy.rollout import Policy
from edge_core import manifest as mf
from simulators.broker import Mosquitto
from simulators.bundle_server import BundleServer, Fault
from simulators.fleet import DeviceSpec, Fleet
from simulators.models import mlp
from simulators.rig import to_toml

N = 20


class Env:
    def __init__(self, cp: ControlPlane, fleet: Fleet, broker: Mosquitto, server: BundleServer) -> None:
        self.cp, self.fleet, self.broker, self.server = cp, fleet, broker, server


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from deploy import signer

    work = tmp_path_factory.mktemp("fleet")
    home = work / "home"
    broker = Mosquitto(work / "broker").start()
    server = BundleServer(home / "artifacts").start()
    _, pub, _ = signer.create_keypair(home / "keys")
    cert = broker.client_cert("operator")
    (home / "config.toml").write_text(
        to_toml({
            "broker": {"host": broker.host, "port": broker.operator_port, "ca": str(cert.ca_path),
                       "cert": str(cert.cert_path), "key": str(cert.key_path), "prefix": broker.prefix},
            "artifacts": {"public_url": server.url + "/"},
        })
    )  # fmt: skip
    key = mf.load_public_key(pub.read_bytes())
    specs = [
        DeviceSpec(f"sim-{i:03d}", {"fleet": "sim", "ring": "canary" if i < 2 else "main"}) for i in range(N)
    ]
    fleet = Fleet(work / "devices", broker, {mf.key_id(key): key}, specs).start()
    cp = ControlPlane(config.load(home))
    try:
        deadline = time.monotonic() + 60
        while len([d for d in cp.devices() if d["status"]]) < N and time.monotonic() < deadline:
            time.sleep(0.5)
        for d in cp.registry.devices():
            cp.registry.tag_device(d["id"], {"fleet": "sim"})
        yield Env(cp, fleet, broker, server)
    finally:
        cp.close()
        fleet.stop()
        server.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _image(env: Env, n: int) -> Any:
    src = env.cp.cfg.home / f"m{n}.onnx"
    mlp(src, sizes=(8, 16, 4), seed=n)
    model = env.cp.register_model("m", src, {}, {})
    return env.cp.build_image("sim-img", [("m", "m", model.version)])


def _invariants(env: Env) -> dict[str, str]:
    """Every device's status says what its disk runs; no staging directory is left behind."""
    running = {}
    for dev_id, dev in env.fleet.devices.items():
        status = env.cp.fleet.report(dev_id) or {}
        on_disk = dev.on_disk()
        assert (status.get("active") or {}).get("sha256") == on_disk, (dev_id, status)
        assert status.get("state") in ("active", "failed", "rolled_back"), (dev_id, status)
        store = dev.dir / "store"
        leftovers = [p.name for p in (store / "staging").iterdir()] + [p.name for p in store.glob(".*")]
        assert not leftovers, (dev_id, leftovers)
        running[dev_id] = on_disk or ""
    return running


def test_a_fleet_rolls_out_survives_a_broker_restart_and_refuses_a_corrupt_bundle(env: Env) -> None:
    v1, v2, v3 = _image(env, 1), _image(env, 2), _image(env, 3)
    driver = env.cp.driver()

    dep = driver.run(
        env.cp.create_deployment(v1, [], {"fleet": "sim"}, Policy(canary=2, growth=3)), poll_s=0.1
    )
    assert dep["state"] == "succeeded", env.cp.summary(dep["id"])
    assert set(_invariants(env).values()) == {v1.sha256}

    # the broker restarts while v2 rolls out: the rollout only waits
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(0.3)
        env.broker.restart()
        restarted.set()

    t = threading.Thread(target=restart)
    t.start()
    dep2 = driver.run(
        env.cp.create_deployment(v2, [], {"fleet": "sim"}, Policy(canary=2, growth=3)), poll_s=0.1
    )
    t.join()
    assert restarted.is_set() and env.fleet.loop.connections_lost >= N
    assert dep2["state"] == "succeeded", env.cp.summary(dep2["id"])
    assert set(_invariants(env).values()) == {v2.sha256}

    # the server corrupts v3's bundle: the canaries refuse it, the rollout stops there
    env.server.set_fault(v3.artifact, Fault(corrupt=True))
    dep3 = driver.run(
        env.cp.create_deployment(v3, [], {"fleet": "sim"}, Policy(canary=2, growth=3)), poll_s=0.1
    )
    s = env.cp.summary(dep3["id"])
    assert dep3["state"] == "rolled_back", s
    assert [m["state"] for m in s["members"] if m["wave"] == 1] == ["reverted", "reverted"]
    assert all(m["error"]["code"] == "digest_mismatch" for m in s["members"] if m["wave"] == 1)
    assert {m["state"] for m in s["members"] if m["wave"] > 1} == {"pending"}
    assert set(_invariants(env).values()) == {v2.sha256}
