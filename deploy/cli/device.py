"""``edge-deploy device``: the fleet, as its devices report it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy import config, enroll
from deploy.ca import Pki
from deploy.cli._common import EXIT_OK, listing, open_plane, out
from deploy.registry import parse_tags

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers

DEVICE_COLUMNS = ["id", "online", "tags", "state", "image", "generation", "last_seen"]


def add_parser(sub: Subparsers) -> None:
    dev = sub.add_parser("device", help="the fleet, as its devices report it").add_subparsers(
        dest="cmd", required=True
    )
    dl = listing(dev.add_parser("list", help="devices, refreshed from their retained reports on the broker"))
    dl.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    dl.add_argument("--offline", action="store_true", help="from the registry only, without the broker")
    listing(dev.add_parser("show", help="one device")).add_argument("device")
    dt = listing(dev.add_parser("tag", help="set (KEY=VALUE) or remove (--remove KEY) a device's tags"))
    dt.add_argument("device")
    dt.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    dt.add_argument("--remove", action="append", default=[], metavar="KEY")
    de = listing(
        dev.add_parser(
            "enroll",
            help="issue DEVICE's certificate (or sign its --csr) and write its install bundle: "
            "certs, the signing public key and agent.toml, with the install.sh command line",
        )
    )
    de.add_argument("device")
    de.add_argument("--csr", type=Path, help="sign this CSR (CN must be DEVICE): the key stays on the device")
    de.add_argument("--out", type=Path, help="a directory, or a .tar file (default: ./DEVICE-bundle)")
    de.add_argument(
        "--broker", metavar="HOST:PORT", help="what the device dials (default: [broker] host:device_port)"
    )
    de.add_argument("--force", action="store_true", help="replace an existing bundle")
    listing(
        dev.add_parser(
            "revoke",
            help="revoke every certificate issued to DEVICE (adds them to the CRL; restart mosquitto)",
        )
    ).add_argument("device")


def _device_row(d: dict[str, Any]) -> dict[str, Any]:
    st, act = d["status"] or {}, d["active"] or {}
    return {
        **d,
        "state": st.get("state"),
        "generation": st.get("generation"),
        "image": f"{act['name']}:{act['version']}" if act else None,
    }


def run(args: argparse.Namespace) -> int:
    if args.cmd in ("enroll", "revoke"):
        # Certificates only: no registry and no broker, so a device can be enrolled before either.
        cfg = config.load(args.home)
        if args.cmd == "enroll":
            out(
                args,
                enroll.enroll(
                    cfg, args.device, csr=args.csr, out=args.out, broker=args.broker, force=args.force
                ),
            )
        else:
            serials = Pki.of_home(cfg.home).revoke(args.device)
            out(
                args,
                {
                    "device": args.device,
                    "revoked_serials": serials,
                    "crl": str(Pki.of_home(cfg.home).crl),
                    "note": "mosquitto reads the CRL at start only: restart the broker to refuse it",
                },
            )
        return EXIT_OK
    with open_plane(args) as cp:
        reg, c = cp.registry, args.cmd
        if c == "list":
            rows = [_device_row(d) for d in cp.devices(parse_tags(args.tag), refresh=not args.offline)]
            out(args, rows, columns=DEVICE_COLUMNS)
        elif c == "show":
            _ = cp.fleet
            d = reg.device(args.device)
            out(args, {**d, "deployments": [x["id"] for x in reg.deployments(device=args.device)]})
        else:
            out(args, reg.tag_device(args.device, parse_tags(args.tags), args.remove))
        return EXIT_OK
