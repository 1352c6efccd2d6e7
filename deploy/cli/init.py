"""``edge-deploy init``: create a control-plane home, so that no other command has to guess one."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from deploy import config
from deploy.cli._common import EXIT_OK, out

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers

CONFIG = """# The edge-deploy control plane's settings (docs/config.md lists every key).
# `edge-deploy pki init --broker-host HOST` appends the [broker] table.

[serve]
listen = "127.0.0.1:8700"
"""


def add_parser(sub: Subparsers) -> None:
    sub.add_parser("init", help="create the control-plane home (--home, $EDGE_DEPLOY_HOME or ./.edge-deploy)")


def run(args: argparse.Namespace) -> int:
    home = config.load(args.home).home
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)  # the registry and, later, the CA's key live here
    cfg = home / "config.toml"
    created = not cfg.exists()
    if created:
        cfg.write_text(CONFIG)
    out(args, {"home": str(home.absolute()), "config": str(cfg), "created": created})
    return EXIT_OK
