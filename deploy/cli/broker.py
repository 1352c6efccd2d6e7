"""``edge-deploy broker``: the broker's configuration for this fleet (deploy/brokerconf.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from deploy import brokerconf, config
from deploy.ca import Pki
from deploy.cli._common import EXIT_OK, home_of, out

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers


def add_parser(sub: Subparsers) -> None:
    br = sub.add_parser("broker", help="the MQTT broker's configuration").add_subparsers(
        dest="cmd", required=True
    )
    bc = br.add_parser(
        "config",
        help="write mosquitto.conf and its two ACL files (device and operator listeners, with the CRL)",
    )
    bc.add_argument("--out", type=Path, help="directory for the files (default: HOME/broker)")
    bc.add_argument("--device-port", type=int, help="default: [broker] device_port")
    bc.add_argument("--operator-port", type=int, help="default: [broker] port")
    bc.add_argument("--device-bind", default="", help="address of the device listener (default: all)")
    bc.add_argument(
        "--operator-bind",
        default="127.0.0.1",
        help="address of the operator listener (default 127.0.0.1: keep it off the devices' network)",
    )
    bc.add_argument(
        "--run-as",
        default="",
        metavar="USER",
        help="the user mosquitto switches to when started as root (its default: mosquitto); it must "
        "be able to read HOME/pki/broker.key",
    )


def run(args: argparse.Namespace) -> int:
    home = home_of(args)
    cfg = config.load(home)
    layout = brokerconf.BrokerLayout(
        out=(args.out or home / "broker").absolute(),
        pki=Pki.of_home(home),
        device_port=args.device_port or cfg.broker.device_port,
        operator_port=args.operator_port or cfg.broker.port,
        device_bind=args.device_bind,
        operator_bind=args.operator_bind,
        prefix=cfg.broker.prefix,
        run_as=args.run_as,
    )
    doc = brokerconf.write(layout)
    doc["note"] = "mosquitto reads the CRL at start: restart it after `edge-deploy device revoke`"
    out(args, doc)
    return EXIT_OK
