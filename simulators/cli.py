"""``edge-sim``: run real agents against a real broker on this machine.

``edge-sim demo`` is the whole path in one command, on embedded defaults: a local mosquitto with
mutual TLS, a control plane (SQLite registry, local artifact store served over HTTP), a fresh
signing key, and N real ``edge-agent`` processes. It trains two Iris classifiers (scikit-learn,
converted with skl2onnx), registers them as two versions of one model, builds an image from each,
rolls the first out by tag (canary first) and scores it on every device, shows a tampered manifest
being refused while the image keeps serving, rolls the second out behind an error-rate gate under
continuous load, and rolls it back. Then it monitors and collects: an image whose score.py logs its
inputs and outputs with Azure ML's ``azureml.ai.monitoring.Collector`` goes out with the request,
response and model input/output collections enabled, and the demo counts the collected records
per collection as they arrive in each device's blob storage (a local directory by default).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent import __version__
from deploy import config
from deploy.plane import ControlPlane
from deploy.registry import Image
from deploy.rollout import Gate, Policy
from edge_core import extras
from edge_core import manifest as mf
from simulators.bundle_server import BundleServer
from simulators.rig import Rig, to_toml


def _say(msg: str) -> None:
    print(msg, flush=True)


def _short(digest: str) -> str:
    return digest[:12]


def _control_plane(rig: Rig, home: Path) -> tuple[ControlPlane, BundleServer]:
    """A control-plane home on embedded defaults: the rig's broker (as the operator), its signing key,
    a local artifact store served over HTTP as `edge-deploy serve` would."""
    (home / "keys").mkdir(parents=True)
    for suffix in ("key", "pub"):
        shutil.copyfile(rig.pubkey_path.with_suffix("." + suffix), home / "keys" / f"signing.{suffix}")
    server = BundleServer(home / "artifacts").start()
    cert = rig.broker.client_cert("operator")
    (home / "config.toml").write_text(
        to_toml({
            "broker": {"host": rig.broker.host, "port": rig.broker.operator_port, "ca": str(cert.ca_path),
                       "cert": str(cert.cert_path), "key": str(cert.key_path), "prefix": rig.broker.prefix},
            "artifacts": {"public_url": server.url + "/"},
        })
    )  # fmt: skip
    return ControlPlane(config.load(home)), server


def _iris_images(cp: ControlPlane, workdir: Path) -> tuple[list[Image], dict[str, Any]]:
    """Train two real classifiers on the Iris data set shipped with scikit-learn, convert them to
    ONNX, register both as versions of one model and build an image from each, with a smoke test
    computed by onnxruntime."""
    import onnxruntime as ort

    from deploy.bundle import SmokeTest
    from simulators.models import iris

    data = iris(workdir / "models")
    rows = data["test_rows"]
    images = []
    for name in ("logreg", "forest"):
        path = data["paths"][name]
        model = cp.register_model(
            "iris", path, {"algorithm": name}, {"accuracy": f"{data['accuracy'][name]:.3f}"}
        )
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        label, probs = sess.run(None, {"X": rows[:1]})
        request = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": rows[0].tolist()}]}
        expected = {"outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": label.tolist()},
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 3], "data": probs.ravel().tolist()},
        ]}  # fmt: skip
        images.append(
            cp.build_image("iris-classifier", [("iris", "iris", model.version)], tags={"algorithm": name},
                           smoke_test=SmokeTest(request, expected))
        )  # fmt: skip
    return images, data


#: The monitored image's score.py: Azure ML's contract (init/run) and its data collector, as a user
#: writes them for an Azure ML online endpoint. No Azure package is installed: the agent provides the
#: SDK. No inference_schema decorators, so it runs where that package is not installed.
MONITORED_SCORE_PY = """\
import json
import os

import numpy as np
import onnxruntime as ort
from azureml.ai.monitoring import Collector

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def init():
    global session, inputs_collector, outputs_collector
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "iris.onnx")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inputs_collector = Collector(name="model_inputs", on_error=lambda e: print("collect failed:", e))
    outputs_collector = Collector(name="model_outputs", on_error=lambda e: print("collect failed:", e))


def run(raw_data):
    rows = json.loads(raw_data)["data"]
    context = inputs_collector.collect([dict(zip(FEATURES, r)) for r in rows])
    label, probabilities = session.run(None, {"X": np.asarray(rows, dtype=np.float32)})
    outputs_collector.collect(
        [{"label": int(k), "probability": float(p.max())} for k, p in zip(label, probabilities)], context
    )
    return {"label": label.tolist(), "probabilities": probabilities.tolist()}
"""
COLLECTIONS = ("model_inputs", "model_outputs", "request", "response")
REQUESTS_PER_DEVICE = 10


def _monitored_image(cp: ControlPlane, workdir: Path, data: dict[str, Any]) -> Image:
    """iris:1 behind the score.py above, with a smoke test computed by onnxruntime."""
    import onnxruntime as ort

    from deploy.bundle import SmokeTest

    script = workdir / "score.py"
    script.write_text(MONITORED_SCORE_PY)
    row = data["test_rows"][:1]
    sess = ort.InferenceSession(str(data["paths"]["logreg"]), providers=["CPUExecutionProvider"])
    label, probs = sess.run(None, {"X": row})
    smoke = SmokeTest({"data": row.tolist()}, {"label": label.tolist(), "probabilities": probs.tolist()})
    return cp.build_image("iris-monitored", [("iris", "iris", 1)], score=script, smoke_test=smoke)


def _collected(outboxes: list[Path], prefix: str) -> tuple[dict[str, int], Path | None]:
    """Records per collection in the devices' blob storage (Azure ML's layout), and one blob."""
    counts: dict[str, int] = {}
    one = None
    for box in outboxes:
        for path in sorted((box / prefix).glob("*/*/*/*/*/*.jsonl")):
            name = path.relative_to(box / prefix).parts[0]
            counts[name] = counts.get(name, 0) + path.read_bytes().count(b"\n")
            one = one or (path if name == "model_inputs" else None)
    return counts, one


def _monitor(rig: Rig, cp: ControlPlane, ids: list[str], dep_id: str, data: dict[str, Any]) -> bool:
    """Score every device, then watch the collected records arrive in their blob storage."""
    import httpx

    rows = data["test_rows"]
    for d in ids:
        api = (rig.op.report(d) or {})["runtime"]["api"]
        with httpx.Client(base_url=api, timeout=10) as c:
            for i in range(REQUESTS_PER_DEVICE):
                body = {"data": [[round(float(v), 2) for v in rows[i % len(rows)]]]}
                c.post("/score", json=body, headers={"x-request-id": f"{d}-req-{i}"}).raise_for_status()
    want = REQUESTS_PER_DEVICE * len(ids)
    _say(f"  POST /score x {REQUESTS_PER_DEVICE} on each device (x-request-id DEVICE-req-N)")
    prefix = f"modelDataCollector/iris-monitored/{dep_id}"
    outboxes = [rig.agents[d].state_dir / "outbox" for d in ids]
    _say(f"  blob storage: each device's {outboxes[0].relative_to(rig.agents[ids[0]].dir)}/{prefix}/")
    last: dict[str, int] | None = None
    deadline = time.monotonic() + 30
    while True:
        counts, one = _collected(outboxes, prefix)
        if counts != last:
            _say("  collected: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in COLLECTIONS))
            last = counts
        done = all(counts.get(c, 0) >= want for c in COLLECTIONS)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if one is not None:
        record = json.loads(one.read_bytes().splitlines()[0])
        _say(f"  one record, from {one.relative_to(rig.workdir)}:")
        for line in json.dumps(record, indent=2).splitlines():
            _say(f"    {line}")
    return done


def _score_all(rig: Rig, ids: list[str], data: dict[str, Any]) -> None:
    import httpx

    rows = data["test_rows"]
    for d in ids:
        api = (rig.op.report(d) or {})["runtime"]["api"]
        r = httpx.post(f"{api}/score", json={"data": rows.tolist()}, timeout=10)
        labels = r.json()["label"]
        names = [data["classes"][k] for k in labels]
        right = sum(int(a == b) for a, b in zip(labels, data["test_labels"], strict=True))
        _say(f"  {d} POST /score -> {names} ({right}/{len(labels)} right)")


def _load(api: str, stop: threading.Event, counts: dict[str, int], row: list[float]) -> None:
    import httpx

    body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": row}]}
    with httpx.Client(base_url=api, timeout=10) as c:
        while not stop.is_set():
            try:
                r = c.post("/v2/models/iris/infer", json=body)
                key = f"v{r.json()['model_version']}" if r.status_code == 200 else f"http {r.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1


def demo(workdir: Path, devices: int, keep: bool) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    ids = [f"dev-{i:03d}" for i in range(1, devices + 1)]
    with Rig(workdir) as rig:
        cp, artifacts = _control_plane(rig, workdir / "control-plane")
        try:
            code = _demo(rig, cp, ids, workdir)
        finally:
            cp.close()
            artifacts.stop()
    # Only now: the agents, the broker and the artifact server have stopped writing into it.
    if keep:
        _say(f"State, logs and collected data: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _demo(rig: Rig, cp: ControlPlane, ids: list[str], workdir: Path) -> int:
    _say(f"broker   {rig.broker.url} for devices (mutual TLS, client id = certificate CN, per-device ACL), "
         f"{rig.broker.operator_url} for the operator")  # fmt: skip
    _say(f"registry {cp.cfg.registry_path}; artifacts served at {cp.cfg.public_url}")
    _say(f"signing  key {mf.key_id(rig.key.public_key())[:16]} (Ed25519)")
    for d in ids:
        # Uploads every half second (the default waits up to 5 minutes to fill a batch): step 5 shows
        # the collected records arriving in blob storage, the devices' <state>/outbox by default.
        rig.add_device(d, {"sync": {"interval": 0.5, "max_batch_age": 0.5}}).start()
    for d in ids:
        rig.wait_status(d, lambda s: s.get("state") == "idle", timeout=60)
    _say(f"agents   {', '.join(ids)} started")

    (v1, v2), data = _iris_images(cp, workdir)
    acc = ", ".join(f"{k} {v:.0%}" for k, v in data["accuracy"].items())
    _say(f"models   iris:1 (logistic regression), iris:2 (random forest); test accuracy {acc}")
    _say(f"images   {v1.ref} <- iris:1, {v2.ref} <- iris:2 (smoke tests inside)")
    for dev in cp.devices():
        cp.registry.tag_device(dev["id"], {"fleet": "demo"})

    driver = cp.driver()

    def rollout(dep_id: str, label: str) -> None:
        t0 = time.monotonic()
        dep = driver.run(dep_id, poll_s=0.05)
        for d in ids:
            st = rig.op.report(d) or {}
            a = st["active"]
            prov = st["runtime"]["image"]["models"]["iris"]["provider"]
            _say(
                f"  {d} runs image {a['name']}:{a['version']} (sha256 {_short(a['sha256'])}), verified, "
                f"smoke-tested, on {prov}"
            )
        waves = "+".join(str(n) for n in _wave_sizes(cp, dep_id))
        took = time.monotonic() - t0
        _say(f"  {label}: {dep['state']}, {len(ids)} device(s) in waves of {waves}, {took:.2f}s")

    _say("\n1. deploy iris-classifier:1 to the devices tagged fleet=demo, canary first, and score it")
    rollout(cp.create_deployment(v1, [], {"fleet": "demo"}, Policy(canary=1)), "deployed")
    _score_all(rig, ids, data)

    _say("\n2. an attacker swaps the download URL inside a signed manifest")
    bundle_path = cp.export_image(v2, workdir / "v2.tar")
    env: dict[str, Any] = json.loads(rig.sign(rig.manifest(ids[0], bundle_path, int(time.time() * 1000))))
    doc = json.loads(base64.b64decode(env["payload"]))
    doc["image"]["urls"] = ["http://203.0.113.1/evil.tar"]
    env["payload"] = base64.b64encode(mf.canonical_json(doc)).decode()
    rig.publish(ids[0], mf.canonical_json(env))
    s = rig.wait_status(ids[0], lambda s: bool(s.get("rejected")), timeout=30)
    _say(f"  {ids[0]} refused it: {s['rejected']['code']}: {s['rejected']['message']}")
    _say(f"  {ids[0]} still runs {s['active']['name']}:{s['active']['version']} (state {s['state']})")

    _say(f"\n3. update to iris-classifier:2 behind an error-rate gate while a client scores {ids[-1]}")
    stop = threading.Event()
    counts: dict[str, int] = {}
    api = (rig.op.report(ids[-1]) or {})["runtime"]["api"]
    loader = threading.Thread(target=_load, args=(api, stop, counts, data["test_rows"][0].tolist()))
    loader.start()
    gate = Gate(soak_s=1.0, max_error_rate=0.01, min_requests=1)
    update = cp.create_deployment(v2, [], {"fleet": "demo"}, Policy(canary=1, gate=gate))
    rollout(update, "updated")
    time.sleep(0.2)
    stop.set()
    loader.join()
    _say(f"  {ids[-1]} answered {sum(counts.values())} requests during the update: {counts}")
    _score_all(rig, ids, data)

    _say("\n4. roll back: a new generation naming iris-classifier:1 (still stored: no download)")
    cp.command(update, "rollback")
    rollout(update, "rolled back")

    _say(
        "\n5. monitor and collect: iris-monitored:1, a score.py that logs with Azure ML's "
        "azureml.ai.monitoring.Collector,"
    )
    _say(f"   deployed with the collections {', '.join(COLLECTIONS)} enabled (rolling_rate Hour)")
    monitored = _monitored_image(cp, workdir, data)
    sections = {
        "data_collection": {
            "collections": {c: {"enabled": True} for c in COLLECTIONS},
            "rolling_rate": "Hour",
        }
    }
    watched = cp.create_deployment(monitored, [], {"fleet": "demo"}, Policy(canary=1), sections)
    rollout(watched, "deployed")
    collected = _monitor(rig, cp, ids, watched, data)

    for d in ids:
        on_disk = rig.agents[d].current_image()
        reported = (rig.op.report(d) or {}).get("active", {}).get("sha256")
        if on_disk != reported:
            _say(f"MISMATCH on {d}: disk {on_disk} vs status {reported}")
            return 1
    _say("\ndeployments (edge-deploy deploy list):")
    for dep in cp.registry.deployments():
        s = cp.summary(dep["id"])
        _say(f"  {s['id']}  {s['image']:<18} {s['state']:<12} models {','.join(s['models'])}  {s['counts']}")
    failed = sum(v for k, v in counts.items() if not k.startswith("v"))
    if not collected:
        _say("MISSING collected records: not every request's records reached blob storage in 30 s")
    _say(f"\nevery device's status matches the image on its disk; {failed} failed requests.")
    return 1 if failed or not collected else 0


def _wave_sizes(cp: ControlPlane, dep_id: str) -> list[int]:
    sizes: dict[int, int] = {}
    for m in cp.registry.members(dep_id):
        sizes[m["wave"]] = sizes.get(m["wave"], 0) + 1
    return [sizes[w] for w in sorted(sizes)]


def main(argv: list[str] | None = None) -> int:
    extras.require("control-plane", "edge-sim")  # on a device (the base install): say what to add
    p = argparse.ArgumentParser(prog="edge-sim", description="Run real edge agents against a local broker")
    p.add_argument("--version", action="version", version=f"edge-sim {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser(
        "demo", help="deploy, refuse a tampered manifest, update and roll back, on N local devices"
    )
    d.add_argument("--devices", type=int, default=3)
    d.add_argument("--workdir", type=Path, default=Path("demo-run"))
    d.add_argument("--keep", action="store_true", help="keep the work directory (state, logs) afterwards")
    f = sub.add_parser(
        "fleet", help="run N simulated devices (the agent's own code, light inference) until SIGTERM"
    )
    f.add_argument("--devices", type=int, required=True)
    f.add_argument("--broker", required=True, metavar="HOST:PORT")
    f.add_argument(
        "--broker-dir",
        type=Path,
        required=True,
        help="the broker's work directory (its CA issues the devices' certificates)",
    )
    f.add_argument("--prefix", default="edge")
    f.add_argument(
        "--trust",
        type=Path,
        action="append",
        required=True,
        help="a manifest signing public key (repeatable)",
    )
    f.add_argument("--workdir", type=Path, required=True)
    f.add_argument("--id-prefix", default="sim")
    f.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--rate", type=float, default=0.0, help="scoring requests/s per device (0: no traffic)")
    f.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats, with --rate")
    h = sub.add_parser(
        "hub", help='simulate Azure IoT Hub for real agents (transport = "iothub") until SIGTERM'
    )
    h.add_argument("--device", action="append", required=True, metavar="ID", help="a device (repeatable)")
    h.add_argument("--x509", action="store_true", help="X.509 device certificates instead of SAS keys")
    h.add_argument("--workdir", type=Path, default=Path("hub-run"))
    h.add_argument(
        "--bridge",
        metavar="HOST:PORT",
        help="the operator listener of the control plane's broker, to deploy through",
    )
    h.add_argument("--bridge-dir", type=Path, help="that broker's work directory (its operator CA)")
    sc = sub.add_parser("scenario", help="run a scripted scenario (fleet, rollouts, faults) and report")
    sc.add_argument("file", type=Path, help="the scenario (JSON; see simulators/scenario.py)")
    sc.add_argument("--workdir", type=Path, default=Path("scenario-run"))
    sc.add_argument("--json", action="store_true", help="the report as JSON")
    args = p.parse_args(argv)
    if args.cmd == "scenario":
        return _scenario(args)
    if args.cmd == "demo":
        return demo(args.workdir.absolute(), args.devices, args.keep)
    if args.cmd == "fleet":
        return _fleet(args)
    if args.cmd == "hub":
        return _hub(args)
    return 2


def _hub(args: argparse.Namespace) -> int:
    """One JSON line per device (its address and credentials, for the agent's [iothub] section),
    then serve until SIGTERM or SIGINT."""
    from simulators.broker import Mosquitto
    from simulators.iothub import IotHubSim

    bridge = None
    if args.bridge:
        if args.bridge_dir is None:
            print("edge-sim: --bridge needs --bridge-dir (the broker's CA issues our operator certificate)",
                  file=sys.stderr)  # fmt: skip
            return 2
        host, _, port = args.bridge.rpartition(":")
        bridge = Mosquitto(args.bridge_dir, host=host, operator_port=int(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with IotHubSim(args.workdir.absolute(), bridge=bridge) as hub:
        for device_id in args.device:
            dev = hub.add_device(device_id, x509=args.x509)
            section = dev.agent_section(hub.ca_path)
            print(json.dumps({"device_id": device_id, "address": f"{dev.address}:8883", "iothub": section}),
                  flush=True)  # fmt: skip
        stop.wait()
    return 0


def _scenario(args: argparse.Namespace) -> int:
    from simulators import scenario

    try:
        spec = scenario.load(args.file)
    except scenario.ScenarioError as exc:
        print(f"edge-sim: {exc}", file=sys.stderr)
        return 2
    workdir = args.workdir.absolute()
    if workdir.exists():
        shutil.rmtree(workdir)
    report = scenario.Scenario(spec, workdir).run()
    print(json.dumps(report, indent=2) if args.json else scenario.render(report))
    return 0 if report["invariants"]["held"] else 1


def _fleet(args: argparse.Namespace) -> int:
    """The fleet as a process of its own: prints one JSON line when every device is connected and one
    with its report when SIGTERM stops it."""
    import signal

    from simulators.broker import Mosquitto
    from simulators.fleet import DeviceSpec, Fleet, Traffic

    host, _, port = args.broker.rpartition(":")
    broker = Mosquitto(args.broker_dir, host=host, port=int(port), prefix=args.prefix)
    trusted = {}
    for path in args.trust:
        k = mf.load_public_key(path.read_bytes())
        trusted[mf.key_id(k)] = k
    tags = dict(t.split("=", 1) for t in args.tag)
    specs = [DeviceSpec(f"{args.id_prefix}-{i:04d}", tags) for i in range(args.devices)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t0 = time.monotonic()
    traffic = Traffic(rate=args.rate, interval=args.heartbeat) if args.rate > 0 else None
    fleet = Fleet(args.workdir, broker, trusted, specs, traffic=traffic).start()
    try:
        while not stop.is_set() and not all(d.channel.connected for d in fleet.devices.values()):
            stop.wait(0.2)
        print(
            json.dumps({"ready": len(fleet.devices), "seconds": round(time.monotonic() - t0, 2)}), flush=True
        )
        stop.wait()
        report = fleet.report()
    finally:
        fleet.stop()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
