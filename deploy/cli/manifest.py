"""``edge-deploy manifest``: one device's manifest by hand, without the registry.

Create, sign, verify (as the device would) and publish; the registry's deployments do all of this
themselves. ``new_manifest`` is also the simulators' way to make a manifest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy import bundle, collection, signer
from edge_core import manifest as mf
from edge_core import strictjson
from edge_core.errors import ControlPlaneError, ErrorCode, ManifestRefused
from edge_core.fsutil import hash_file

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers


def new_manifest(
    device_id: str,
    bundle: Path,
    urls: list[str],
    *,
    name: str,
    version: str,
    generation: int | None = None,
    deployment_id: str | None = None,
    valid_for: timedelta = timedelta(days=7),
    now: datetime | None = None,
) -> dict[str, Any]:
    """A manifest for one device naming one bundle file. The generation defaults to the current time
    in milliseconds: it only grows, without a registry to count it."""
    now = now or datetime.now(UTC)
    return {
        "schema_version": 1,
        "device_id": device_id,
        "deployment_id": deployment_id or f"dep-{uuid.uuid4().hex[:12]}",
        "generation": generation if generation is not None else int(time.time() * 1000),
        "issued_at": mf.format_time(now),
        "expires_at": mf.format_time(now + valid_for),
        "image": {
            "name": name,
            "version": version,
            "sha256": hash_file(bundle),
            "size": bundle.stat().st_size,
            "urls": urls,
        },
    }


def _duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 12h or 7d")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def add_parser(sub: Subparsers) -> None:
    man = sub.add_parser("manifest", help="deployment manifests by hand").add_subparsers(
        dest="cmd", required=True
    )
    mc = man.add_parser("create", help="write an (unsigned) manifest for one device and one bundle")
    mc.add_argument("--device", required=True)
    mc.add_argument("--bundle", type=Path, required=True)
    mc.add_argument(
        "--url", action="append", required=True, help="where the device downloads the bundle (repeatable)"
    )
    mc.add_argument("--generation", type=int)
    mc.add_argument("--deployment-id")
    mc.add_argument("--valid-for", type=_duration, default=timedelta(days=7))
    mc.add_argument(
        "--data-collection",
        type=Path,
        metavar="FILE.yaml|json",
        help="Azure ML's data_collector (a deployment YAML or its data_collector block)",
    )
    ms = man.add_parser("sign", help="sign a manifest (JSON file or - for stdin) into an envelope")
    ms.add_argument("manifest")
    ms.add_argument("--key", type=Path, required=True)
    mv = man.add_parser("verify", help="verify a signed envelope as a device would")
    mv.add_argument("envelope", type=Path)
    mv.add_argument("--pubkey", type=Path, action="append", required=True)
    mv.add_argument("--device", required=True)
    mv.add_argument("--last-generation", type=int, default=0)
    mp = man.add_parser("publish", help="publish a signed envelope as a device's retained desired state")
    mp.add_argument("envelope", type=Path)
    mp.add_argument("--device", required=True)
    mp.add_argument("--broker", required=True, help="HOST:PORT")
    mp.add_argument("--ca", type=Path)
    mp.add_argument("--cert", type=Path)
    mp.add_argument("--key", type=Path)
    mp.add_argument("--prefix", default="edge")


def run(args: argparse.Namespace) -> int:
    if args.cmd == "create":
        meta = bundle.read_metadata(args.bundle)
        doc = new_manifest(
            args.device,
            args.bundle,
            args.url,
            name=meta["name"],
            version=str(meta["version"]),
            generation=args.generation,
            deployment_id=args.deployment_id,
            valid_for=args.valid_for,
        )
        if args.data_collection is not None:
            doc["data_collection"] = collection.load(args.data_collection)
        print(json.dumps(doc, indent=2))
        return 0
    if args.cmd == "sign":
        text = sys.stdin.read() if args.manifest == "-" else Path(args.manifest).read_text()
        sys.stdout.buffer.write(signer.sign_manifest(_strict(text), signer.load_private(args.key)) + b"\n")
        return 0
    if args.cmd == "verify":
        trusted = {}
        for path in args.pubkey:
            k = mf.load_public_key(path.read_bytes())
            trusted[mf.key_id(k)] = k
        try:
            m = mf.verify(
                args.envelope.read_bytes().strip(),
                trusted,
                device_id=args.device,
                now=datetime.now(UTC),
                last_generation=args.last_generation,
            )
        except ManifestRefused as exc:
            print(json.dumps({"ok": False, **exc.as_dict()}))
            return 1
        print(json.dumps({"ok": True, "keyid": m.keyid, "manifest": json.loads(m.payload)}, indent=2))
        return 0
    if args.cmd == "publish":
        from deploy.publisher import OperatorClient

        host, _, port = args.broker.rpartition(":")
        envelope = args.envelope.read_bytes().strip()
        op = OperatorClient(host, int(port), ca=args.ca, cert=args.cert, key=args.key, prefix=args.prefix)
        try:
            op.connect(10.0)
        except (OSError, TimeoutError) as exc:
            raise ControlPlaneError(
                ErrorCode.BROKER_UNREACHABLE,
                f"cannot reach the broker at {args.broker}: {exc}",
                "check --broker, --ca/--cert/--key and that the broker runs",
            ) from None
        try:
            op.publish_manifest(args.device, envelope, timeout=10.0)
        except TimeoutError as exc:
            raise ControlPlaneError(
                ErrorCode.BROKER_UNREACHABLE, str(exc), "check the broker and the network"
            ) from None
        finally:
            op.close()
        print(json.dumps({"published": True, "device": args.device}))
        return 0
    raise AssertionError(args)  # pragma: no cover


def _strict(text: str) -> Any:
    """The manifest to sign, read as the agent will read it (edge_core.strictjson): a document the
    device would refuse (a key twice, NaN) is refused here, before anything is signed."""
    try:
        return strictjson.loads(text)
    except strictjson.StrictJSONError as exc:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT, f"the manifest is not strict JSON: {exc}", "fix the manifest file"
        ) from None
