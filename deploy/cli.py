"""``edge-deploy``: the operator's and the pipeline's command line.

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or input.
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
from typing import Any

from agent import manifest as mf
from agent.errors import ManifestRefused
from agent.fetch import hash_file
from deploy import bundle, signer


def _duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 12h or 7d")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-deploy", description="Edge ML control plane")
    sub = p.add_subparsers(dest="group", required=True)

    keys = sub.add_parser("keys", help="manifest signing keys").add_subparsers(dest="cmd", required=True)
    kc = keys.add_parser("create", help="create an Ed25519 signing key pair")
    kc.add_argument("--out", type=Path, required=True, help="directory for NAME.key and NAME.pub")
    kc.add_argument("--name", default="signing")

    man = sub.add_parser("manifest", help="deployment manifests").add_subparsers(dest="cmd", required=True)
    mc = man.add_parser("create", help="write an (unsigned) manifest for one device and one bundle")
    mc.add_argument("--device", required=True)
    mc.add_argument("--bundle", type=Path, required=True)
    mc.add_argument(
        "--url", action="append", required=True, help="where the device downloads the bundle (repeatable)"
    )
    mc.add_argument("--generation", type=int)
    mc.add_argument("--deployment-id")
    mc.add_argument("--valid-for", type=_duration, default=timedelta(days=7))
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

    img = sub.add_parser("image", help="image bundles").add_subparsers(dest="cmd", required=True)
    ib = img.add_parser(
        "build",
        help="build an image bundle from ONNX models, an optional score.py, wheels and a smoke test",
        description="Build a reproducible image bundle (docs/bundle.md); print its path, sha256 and size.",
    )
    ib.add_argument("--name", required=True, help="image name (the manifest's image.name)")
    ib.add_argument("--version", required=True, help="image version (the manifest's image.version)")
    ib.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="an ONNX model, stored as models/NAME.onnx; NAME defaults to the file's stem (repeatable)",
    )
    ib.add_argument("--score", type=Path, metavar="FILE", help="the entry script, stored as score.py")
    ib.add_argument(
        "--include",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="another file at the bundle's root, e.g. a module score.py imports (repeatable)",
    )
    ib.add_argument("--wheel", type=Path, action="append", default=[], help="a pinned .whl (repeatable)")
    ib.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="(repeatable)")
    ib.add_argument("--sample-request", type=Path, metavar="FILE.json", help="the smoke test's request")
    ib.add_argument("--expected-response", type=Path, metavar="FILE.json", help="its expected response")
    ib.add_argument(
        "--rtol", type=float, help=f"relative tolerance for floats (default {bundle.DEFAULT_RTOL:g})"
    )
    ib.add_argument(
        "--atol", type=float, help=f"absolute tolerance for floats (default {bundle.DEFAULT_ATOL:g})"
    )
    ib.add_argument("--smoke-model", metavar="NAME", help="the model the smoke test is for (several models)")
    ib.add_argument("--out", type=Path, help="the bundle to write (default NAME-VERSION.tar)")
    ii = img.add_parser("inspect", help="print a bundle's bundle.json")
    ii.add_argument("bundle", type=Path)

    args = p.parse_args(argv)
    try:
        return _dispatch(args)
    except (FileNotFoundError, PermissionError, FileExistsError) as exc:
        print(f"edge-deploy: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"edge-deploy: {exc}", file=sys.stderr)
        return 2


def _image_build(args: argparse.Namespace) -> int:
    models = [bundle.parse_model_arg(m) for m in args.model]
    tags: dict[str, str] = {}
    for text in args.tag:
        key, value = bundle.parse_tag(text)
        if key in tags:
            # Refused rather than last-wins: the order of the flags must not change the image.
            raise bundle.BuildError(f"tag {key!r} is given twice")
        tags[key] = value
    smoke = None
    if (args.sample_request is None) != (args.expected_response is None):
        raise bundle.BuildError("--sample-request and --expected-response go together")
    if args.sample_request is not None:
        smoke = bundle.SmokeTest(
            request=bundle.load_json(args.sample_request, "sample request"),
            expected=bundle.load_json(args.expected_response, "expected response"),
            model=args.smoke_model,
            rtol=bundle.DEFAULT_RTOL if args.rtol is None else args.rtol,
            atol=bundle.DEFAULT_ATOL if args.atol is None else args.atol,
        )
    elif args.rtol is not None or args.atol is not None or args.smoke_model is not None:
        raise bundle.BuildError(
            "--rtol, --atol and --smoke-model need --sample-request and --expected-response"
        )
    built = bundle.build_image(
        args.out or Path(f"{args.name}-{args.version}.tar"),
        args.name,
        args.version,
        models,
        score=args.score,
        include=args.include,
        wheels=args.wheel,
        tags=tags,
        smoke_test=smoke,
    )
    print(json.dumps(built.as_dict()))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.group == "image":
        if args.cmd == "build":
            return _image_build(args)
        print(json.dumps(bundle.read_metadata(args.bundle), indent=2, sort_keys=True))
        return 0
    if args.group == "keys":
        key_path, pub_path, kid = signer.create_keypair(args.out, args.name)
        print(json.dumps({"private_key": str(key_path), "public_key": str(pub_path), "keyid": kid}))
        return 0
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
        print(json.dumps(doc, indent=2))
        return 0
    if args.cmd == "sign":
        text = sys.stdin.read() if args.manifest == "-" else Path(args.manifest).read_text()
        sys.stdout.buffer.write(signer.sign_manifest(json.loads(text), signer.load_private(args.key)) + b"\n")
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
        with OperatorClient(
            host, int(port), ca=args.ca, cert=args.cert, key=args.key, prefix=args.prefix
        ) as op:
            op.publish_manifest(args.device, args.envelope.read_bytes().strip())
        print(json.dumps({"published": True, "device": args.device}))
        return 0
    raise AssertionError(args)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
