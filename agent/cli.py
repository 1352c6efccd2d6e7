"""``edge-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent import config as config_mod
from agent import log as log_mod
from agent.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edge ML deployment agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", type=Path, help="TOML config file (env EDGE_AGENT_* overrides it)")
    chk = sub.add_parser("check-config", help="validate a config file and print the result")
    chk.add_argument("--config", type=Path)
    args = p.parse_args(argv)

    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration: {exc.message}", file=sys.stderr)
        return 2
    if args.cmd == "check-config":
        print(
            json.dumps({"ok": True, "device_id": cfg.device_id, "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}"})
        )
        return 0
    log_mod.setup(cfg.log_level)
    from agent.daemon import Agent

    try:
        return Agent(cfg).run()
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
