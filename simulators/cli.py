"""``edge-sim``: run real agents against a real broker on this machine.

``edge-sim demo`` is the whole backbone in one command, on embedded defaults: a local mosquitto with
mutual TLS, a local bundle server, a fresh signing key, and N real ``edge-agent`` processes. It
deploys a signed image, shows a tampered manifest being refused while the image keeps running,
updates to a second image, and rolls back to the first.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from agent import manifest as mf
from simulators.rig import Rig


def _say(msg: str) -> None:
    print(msg, flush=True)


def _short(digest: str) -> str:
    return digest[:12]


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

        v1 = rig.build_bundle("demo-model", "1", {"model.onnx": b"\x08\x07" + b"demo model v1 " * 4096})
        v2 = rig.build_bundle("demo-model", "2", {"model.onnx": b"\x08\x07" + b"demo model v2 " * 8192})

        def deploy_all(bundle: Path, generation: int, label: str) -> None:
            t0 = time.monotonic()
            for d in ids:
                rig.deploy(d, rig.manifest(d, bundle, generation))
            for d in ids:
                s = rig.wait_active(d, generation, timeout=60)
                a = s["active"]
                _say(f"  {d} runs image {a['name']}:{a['version']} (sha256 {_short(a['sha256'])}), verified")
            _say(f"  {label}: {len(ids)} device(s) active in {time.monotonic() - t0:.2f}s")

        _say("\n1. deploy demo-model:1")
        deploy_all(v1, 1, "deployed")

        _say("\n2. an attacker swaps the download URL inside a signed manifest")
        env: dict[str, Any] = json.loads(rig.sign(rig.manifest(ids[0], v2, 2)))
        doc = json.loads(base64.b64decode(env["payload"]))
        doc["image"]["urls"] = ["http://203.0.113.1/evil.tar"]
        env["payload"] = base64.b64encode(mf.canonical_json(doc)).decode()
        rig.publish(ids[0], mf.canonical_json(env))
        s = rig.wait_status(ids[0], lambda s: bool(s.get("rejected")), timeout=30)
        _say(f"  {ids[0]} refused it: {s['rejected']['code']}: {s['rejected']['message']}")
        _say(f"  {ids[0]} still runs {s['active']['name']}:{s['active']['version']} (state {s['state']})")

        _say("\n3. update to demo-model:2")
        deploy_all(v2, 3, "updated")

        _say(
            "\n4. roll back: a new generation naming demo-model:1 (still in each device's store, no download)"
        )
        deploy_all(v1, 4, "rolled back")

        for d in ids:
            agent = rig.agents[d]
            on_disk = agent.current_image()
            reported = (rig.op.report(d) or {}).get("active", {}).get("sha256")
            if on_disk != reported:
                _say(f"MISMATCH on {d}: disk {on_disk} vs status {reported}")
                return 1
        _say(f"\nevery device's status matches the image on its disk. State and logs: {workdir}")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


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
