"""``edge-deploy pki``: the fleet's certificate authority (deploy/ca.py has the layout)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from deploy import config, signer
from deploy.ca import Pki
from deploy.cli._common import EXIT_OK, home_of, out
from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.fsutil import atomic_write

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers


def add_parser(sub: Subparsers) -> None:
    pk = sub.add_parser("pki", help="the fleet's certificate authority").add_subparsers(
        dest="cmd", required=True
    )
    pi = pk.add_parser(
        "init",
        help="create the CA, the operator identity, the broker's certificate, an empty CRL and the "
        "manifest signing key under HOME (refuses to replace them without --force)",
    )
    pi.add_argument(
        "--broker-host",
        action="append",
        required=True,
        metavar="HOST",
        help="a name or address devices dial the broker by (repeatable; the first is the CN)",
    )
    pi.add_argument("--device-port", type=int, default=8883, help="the broker's device listener")
    pi.add_argument("--operator-port", type=int, default=8884, help="the broker's operator listener")
    pi.add_argument("--force", action="store_true", help="replace an existing CA (re-enroll every device)")
    pc = pk.add_parser(
        "claim",
        help="issue a fleet provisioning claim certificate (CN claim-NAME) into --out",
    )
    pc.add_argument("name", help="the claim's name; HOME/provisioning.toml's [claims.NAME] accepts it")
    pc.add_argument(
        "--out", type=Path, help="directory for claim.pem, claim.key, ca.pem (default ./claim-NAME)"
    )
    pc.add_argument("--force", action="store_true", help="write into an existing --out")


def _broker_section(host: str, device_port: int, operator_port: int) -> str:
    return (
        "\n[broker]\n"
        "# written by `edge-deploy pki init`: the operator listener and identity (docs/control-plane.md)\n"
        f'host = "{host}"\nport = {operator_port}\ndevice_port = {device_port}\n'
        'ca = "pki/ca.pem"\ncert = "pki/operator.pem"\nkey = "pki/operator.key"\n'
    )


def _claim(args: argparse.Namespace) -> int:
    ca = Pki.of_home(home_of(args))
    ca.require()
    dest: Path = args.out or Path(f"claim-{args.name}")
    if dest.exists() and not args.force:
        raise ControlPlaneError(
            ErrorCode.ALREADY_EXISTS, f"{dest} already exists", "pass --force, or another --out"
        )
    cn, cert, key = ca.issue_claim(args.name)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(dest / "claim.key", key, mode=0o600)
    atomic_write(dest / "claim.pem", cert, mode=0o644)
    atomic_write(dest / "ca.pem", ca.ca.read_bytes(), mode=0o644)
    out(args, {"claim": cn, "out": str(dest), "files": ["ca.pem", "claim.key", "claim.pem"]})
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.cmd == "claim":
        return _claim(args)
    home: Path = home_of(args)
    home.mkdir(parents=True, exist_ok=True)
    doc = Pki.of_home(home).init(args.broker_host, force=args.force)
    # The operator must reach the broker over loopback when it runs beside it; its certificate is
    # issued for the --broker-host names, so the operator dials the first of them.
    cfg_path = home / "config.toml"
    text = cfg_path.read_text() if cfg_path.is_file() else "# edge-deploy control plane (docs/config.md)\n"
    # A table, not the text: the file `edge-deploy init` writes names [broker] in a comment.
    if "broker" in tomllib.loads(text):
        doc["config"] = (
            f"{cfg_path}: [broker] kept; point ca, cert and key at pki/ (see docs/control-plane.md)"
        )
    else:
        cfg_path.write_text(text + _broker_section(args.broker_host[0], args.device_port, args.operator_port))
        doc["config"] = f"{cfg_path}: [broker] written"
    key = config.load(home).signing_key
    if not key.is_file():
        key_path, pub_path, kid = signer.create_keypair(key.parent, key.stem)
        doc |= {"signing_key": str(key_path), "signing_pub": str(pub_path), "keyid": kid}
    out(args, doc)
    return EXIT_OK
