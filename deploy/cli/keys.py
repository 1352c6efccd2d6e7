"""``edge-deploy keys``: the manifest signing keys."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from deploy import config, signer
from deploy.cli._common import EXIT_OK

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers


def add_parser(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="manifest signing keys").add_subparsers(dest="cmd", required=True)
    kc = keys.add_parser("create", help="create an Ed25519 signing key pair")
    kc.add_argument("--out", type=Path, help="directory for NAME.key and NAME.pub (default: HOME/keys)")
    kc.add_argument("--name", default="signing")


def run(args: argparse.Namespace) -> int:
    out = args.out or (config.load(args.home).signing_key.parent)
    key_path, pub_path, kid = signer.create_keypair(out, args.name)
    print(json.dumps({"private_key": str(key_path), "public_key": str(pub_path), "keyid": kid}))
    return EXIT_OK
