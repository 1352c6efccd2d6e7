"""``edge-deploy provision``: answer claim certificates' requests for an identity (deploy/provision.py)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from deploy.cli._common import EXIT_OK, open_plane
from deploy.provision import ProvisioningService

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers


def add_parser(sub: Subparsers) -> None:
    pv = sub.add_parser(
        "provision", help="fleet provisioning: sign the CSRs of devices that hold a claim certificate"
    ).add_subparsers(dest="cmd", required=True)
    ps = pv.add_parser(
        "serve",
        help="answer provisioning requests on the broker's operator listener, by the policy in "
        "HOME/provisioning.toml (docs/control-plane.md)",
    )
    ps.add_argument(
        "--once", action="store_true", help="answer what arrives within --wait seconds, then exit"
    )
    ps.add_argument("--wait", type=float, default=5.0, help="seconds --once waits (default 5)")


def run(args: argparse.Namespace) -> int:
    with open_plane(args) as cp:
        svc = ProvisioningService(cp.cfg, cp.registry)
        svc.start(cp.cfg.broker.connect_timeout)
        print(json.dumps({"provisioning": f"{cp.cfg.broker.prefix}/provisioning/+/request"}), flush=True)
        try:
            if args.once:
                svc.step(args.wait)
            else:
                while True:
                    svc.step(1.0)
        finally:
            svc.stop()
    return EXIT_OK
