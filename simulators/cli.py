"""``edge-sim``: run real agents against a real broker on this machine.

``edge-sim demo`` is the whole path in one command, on embedded defaults: a local mosquitto with
mutual TLS, a local bundle server, a fresh signing key, and N real ``edge-agent`` processes. It
trains two Iris classifiers (scikit-learn, converted with skl2onnx), builds an image from each,
deploys the first and scores it on every device, shows a tampered manifest being refused while the
image keeps serving, updates to the second under continuous load, and rolls back to the first.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent import manifest as mf
from simulators.rig import Rig


def _say(msg: str) -> None:
    print(msg, flush=True)


def _short(digest: str) -> str:
    return digest[:12]


def _iris_images(rig: Rig) -> tuple[Path, Path, dict[str, Any]]:
    """Train two real classifiers on the Iris data set shipped with scikit-learn, convert them to
    ONNX and build one image from each, with a smoke test computed by onnxruntime."""
    import onnxruntime as ort

    from deploy.bundle import SmokeTest, build_image
    from simulators.models import iris

    data = iris(rig.workdir / "models")
    rows = data["test_rows"]
    out = []
    for version, name in (("1", "logreg"), ("2", "forest")):
        path = data["paths"][name]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        label, probs = sess.run(None, {"X": rows[:1]})
        request = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": rows[0].tolist()}]}
        expected = {"outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": label.tolist()},
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 3], "data": probs.ravel().tolist()},
        ]}  # fmt: skip
        b = rig.bundles_dir / f"iris-classifier-{version}.tar"
        build_image(
            b,
            "iris-classifier",
            version,
            {"iris": path},
            tags={"algorithm": name},
            smoke_test=SmokeTest(request, expected),
        )
        out.append(b)
    return out[0], out[1], data


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
        _say(f"broker   mqtts://{rig.broker.host}:{rig.broker.port} (mutual TLS, per-device ACL)")
        _say(f"bundles  {rig.server.url_for('')}")
        _say(f"signing  key {mf.key_id(rig.key.public_key())[:16]} (Ed25519)")
        for d in ids:
            rig.add_device(d).start()
        _say(f"agents   {', '.join(ids)} started")

        v1, v2, data = _iris_images(rig)
        acc = ", ".join(f"{k} {v:.0%}" for k, v in data["accuracy"].items())
        _say(f"images   iris-classifier:1 (logistic regression), :2 (random forest); test accuracy {acc}")

        def deploy_all(bundle: Path, generation: int, label: str) -> None:
            t0 = time.monotonic()
            for d in ids:
                rig.deploy(d, rig.manifest(d, bundle, generation))
            for d in ids:
                s = rig.wait_active(d, generation, timeout=60)
                a = s["active"]
                prov = s["runtime"]["image"]["models"]["iris"]["provider"]
                _say(
                    f"  {d} runs image {a['name']}:{a['version']} (sha256 {_short(a['sha256'])}), verified, "
                    f"smoke-tested, on {prov}"
                )
            _say(f"  {label}: {len(ids)} device(s) active in {time.monotonic() - t0:.2f}s")

        _say("\n1. deploy iris-classifier:1 and score it on every device")
        deploy_all(v1, 1, "deployed")
        _score_all(rig, ids, data)

        _say("\n2. an attacker swaps the download URL inside a signed manifest")
        env: dict[str, Any] = json.loads(rig.sign(rig.manifest(ids[0], v2, 2)))
        doc = json.loads(base64.b64decode(env["payload"]))
        doc["image"]["urls"] = ["http://203.0.113.1/evil.tar"]
        env["payload"] = base64.b64encode(mf.canonical_json(doc)).decode()
        rig.publish(ids[0], mf.canonical_json(env))
        s = rig.wait_status(ids[0], lambda s: bool(s.get("rejected")), timeout=30)
        _say(f"  {ids[0]} refused it: {s['rejected']['code']}: {s['rejected']['message']}")
        _say(f"  {ids[0]} still runs {s['active']['name']}:{s['active']['version']} (state {s['state']})")

        _say(f"\n3. update to iris-classifier:2 while a client scores {ids[0]} continuously")
        stop = threading.Event()
        counts: dict[str, int] = {}
        api = (rig.op.report(ids[0]) or {})["runtime"]["api"]
        loader = threading.Thread(target=_load, args=(api, stop, counts, data["test_rows"][0].tolist()))
        loader.start()
        deploy_all(v2, 3, "updated")
        time.sleep(0.2)
        stop.set()
        loader.join()
        _say(f"  {ids[0]} answered {sum(counts.values())} requests during the update: {counts}")
        _score_all(rig, ids, data)

        _say("\n4. roll back: a new generation naming iris-classifier:1 (still stored: no download)")
        deploy_all(v1, 4, "rolled back")

        for d in ids:
            agent = rig.agents[d]
            on_disk = agent.current_image()
            reported = (rig.op.report(d) or {}).get("active", {}).get("sha256")
            if on_disk != reported:
                _say(f"MISMATCH on {d}: disk {on_disk} vs status {reported}")
                return 1
        failed = sum(v for k, v in counts.items() if not k.startswith("v"))
        _say(
            f"\nevery device's status matches the image on its disk; {failed} failed requests. "
            f"State and logs: {workdir}"
        )
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-sim", description="Run real edge agents against a local broker")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser(
        "demo", help="deploy, refuse a tampered manifest, update and roll back, on N local devices"
    )
    d.add_argument("--devices", type=int, default=3)
    d.add_argument("--workdir", type=Path, default=Path("demo-run"))
    d.add_argument("--keep", action="store_true", help="keep the work directory (state, logs) afterwards")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.workdir.absolute(), args.devices, args.keep)
    return 2


if __name__ == "__main__":
    sys.exit(main())
