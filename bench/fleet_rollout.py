"""Rollout of one image to N simulated devices through the real control plane and a real broker.

    .venv/bin/python bench/fleet_rollout.py --devices 1000 [--canary 10 --growth 3 --soak 2 --rate 2]

Starts mosquitto (mutual TLS, the project ACL), the control plane's artifact endpoint and, as a
process of its own, `edge-sim fleet` with N simulated devices (simulators/fleet.py: the agent's
deployer, store, fetcher and MQTT channel on one selector loop, light inference, scoring traffic
with heartbeats). When every device has reported, it installs a first image everywhere, then rolls
a second one out in waves behind a health gate (error rate, and p99 against the same devices on
the first image), and prints the time from `create_deployment` to the last device `active`, the
time per wave, memory (RSS) of the fleet, the control plane and the broker, and CPU seconds. The
baseline in the same run is the broker's own floor: one QoS 1 publish per device, acknowledged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from resource import RUSAGE_SELF, getrusage

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy import config, signer
from deploy.plane import ControlPlane
from deploy.rollout import Gate, Policy
from simulators.broker import Mosquitto
from simulators.bundle_server import BundleServer
from simulators.models import mlp
from simulators.rig import to_toml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--canary", type=int, default=10)
    p.add_argument("--growth", type=float, default=3.0)
    p.add_argument("--soak", type=float, default=2.0, help="health-gate soak per wave, seconds")
    p.add_argument("--rate", type=float, default=2.0, help="scoring requests/s per device (heartbeats 1/s)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    home = work / "home"
    proc = psutil.Process()
    # A production broker persists on an interval, not on every change: with 1,000 clients, saving
    # the whole database after each message (the tests' setting) costs about 12 ms a message.
    broker = Mosquitto(work / "broker", autosave_changes=0).start()
    server = BundleServer(home / "artifacts", keep_requests=0).start()
    _, pub, _ = signer.create_keypair(home / "keys")
    cert = broker.client_cert("operator")
    (home / "config.toml").write_text(
        to_toml({
            "broker": {"host": broker.host, "port": broker.operator_port, "ca": str(cert.ca_path),
                       "cert": str(cert.cert_path), "key": str(cert.key_path), "prefix": broker.prefix,
                       "connect_timeout": 120.0},
            "artifacts": {"public_url": server.url + "/"},
        })
    )  # fmt: skip
    t0 = time.monotonic()
    # The fleet is a process of its own (edge-sim fleet), as devices are not the control plane.
    fleet = subprocess.Popen(
        [sys.executable, "-m", "simulators.cli", "fleet", "--devices", str(args.devices),
         "--broker", f"{broker.host}:{broker.port}", "--broker-dir", str(broker.workdir),
         "--prefix", broker.prefix, "--trust", str(pub), "--workdir", str(work / "devices"),
         "--tag", "fleet=bench", "--rate", str(args.rate)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert fleet.stdout is not None
    ready = json.loads(fleet.stdout.readline())
    cp = ControlPlane(config.load(home))
    out: dict[str, object] = {"devices": args.devices}
    try:
        while len([d for d in cp.devices() if d["status"]]) < args.devices:
            time.sleep(0.5)
            if time.monotonic() - t0 > 600:
                raise SystemExit("the fleet did not come up in 10 minutes")
        out["fleet_connected_s"] = ready["seconds"]
        out["fleet_reported_s"] = round(time.monotonic() - t0, 2)
        for d in cp.registry.devices():
            cp.registry.tag_device(d["id"], {"fleet": "bench"})
        src = home / "m.onnx"
        mlp(src, sizes=(64, 256, 10))
        model = cp.register_model("m", src, {}, {})
        first = cp.build_image("bench", [("m", "m", model.version)])
        image = cp.build_image("bench", [("m", "m", model.version)], tags={"v": "2"})
        # the first image, without gates: the devices then serve, and their heartbeats are the
        # baseline the measured rollout's gates compare with
        t1 = time.monotonic()
        dep0 = cp.driver().run(
            cp.create_deployment(
                first, [], {"fleet": "bench"}, Policy(canary=args.canary, growth=args.growth)
            ),
            poll_s=0.1,
        )
        out["first_install_s"] = round(time.monotonic() - t1, 2)
        assert dep0["state"] == "succeeded", dep0

        # baseline: the broker's floor, one retained QoS 1 publish per device
        op = cp.fleet
        tb = time.monotonic()
        for i in range(args.devices):
            op._client.publish(f"{broker.prefix}/devices/sim-{i:04d}/bench", b"x" * 200, qos=1)
        deadline = time.monotonic() + 60
        while op._client._out_messages and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        out["baseline_publish_all_s"] = round(time.monotonic() - tb, 3)

        fproc = psutil.Process(fleet.pid)
        cpu0, fcpu0 = proc.cpu_times(), fproc.cpu_times()
        gate = Gate(soak_s=args.soak, max_error_rate=0.05, max_p99_ratio=3.0, min_requests=10)
        policy = Policy(canary=args.canary, growth=args.growth, wave_timeout_s=120, gate=gate)
        tr = time.monotonic()
        dep_id = cp.create_deployment(image, [], {"fleet": "bench"}, policy)
        dep = cp.driver().run(dep_id, poll_s=0.1)
        took = time.monotonic() - tr
        cpu1, fcpu1 = proc.cpu_times(), fproc.cpu_times()
        events = cp.registry.events(dep_id)
        starts = {e["detail"]["wave"]: e["ts"] for e in events if e["kind"] == "wave_started"}
        passed = {e["detail"]["wave"]: e["ts"] for e in events if e["kind"] == "wave_passed"}
        sizes = [len(e["detail"]["devices"]) for e in events if e["kind"] == "wave_started"]
        gates = [e["detail"] for e in events if e["kind"] in ("gate_passed", "gate_failed")]
        out["gate_requests_judged"] = [(g["baseline"]["requests"], g["current"]["requests"]) for g in gates]
        out["gate_p99_ms"] = [(g["baseline"]["p99_ms"], g["current"]["p99_ms"]) for g in gates]
        out.update(
            state=dep["state"],
            rollout_s=round(took, 2),
            waves=sizes,
            wave_s=[round(passed[w] - starts[w], 2) for w in sorted(starts) if w in passed],
            soak_per_wave_s=args.soak,
            cpu_s_control_plane=round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
            cpu_s_fleet=round((fcpu1.user + fcpu1.system) - (fcpu0.user + fcpu0.system), 2),
            peak_rss_mib_control_plane=round(getrusage(RUSAGE_SELF).ru_maxrss / 1024),
            rss_mib_fleet=round(fproc.memory_info().rss / 2**20),
            threads_fleet=fproc.num_threads(),
            broker_rss_mib=round(psutil.Process(broker.pid).memory_info().rss / 2**20) if broker.pid else 0,
            cores=os.cpu_count(),
        )  # fmt: skip
        fleet.send_signal(signal.SIGTERM)
        report = json.loads(fleet.stdout.readline())
        out["devices_running_the_image_on_disk"] = report["running"].get(image.sha256, 0)
    finally:
        cp.close()
        if fleet.poll() is None:
            fleet.send_signal(signal.SIGTERM)
        fleet.wait(60)
        server.stop()
        broker.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:40} {v}")
    return 0 if out.get("state") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
