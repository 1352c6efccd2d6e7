"""``edge-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from agent import __version__
from agent import config as config_mod
from edge_core import log as log_mod
from edge_core.errors import ConfigError, StatusUnavailable


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edge ML deployment agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", type=Path, help="TOML config file (env EDGE_AGENT_* overrides it)")
    chk = sub.add_parser("check-config", help="validate a config file and print the result")
    chk.add_argument("--config", type=Path)
    st = sub.add_parser(
        "status",
        help="what the agent runs and reports, read from its state directory (exit 0 running, "
        "3 not running, 2 unreadable)",
    )
    st.add_argument("--config", type=Path, help="the agent's TOML config file")
    st.add_argument("--json", action="store_true", help="one JSON object instead of the key/value block")
    doc = sub.add_parser(
        "doctor",
        help="check config, certificates, control channel, disk, databases, execution providers and "
        "the API port (exit 0 no failure, 1 a failure)",
    )
    doc.add_argument("--config", type=Path, help="the agent's TOML config file")
    doc.add_argument("--json", action="store_true", help="a JSON list of {check, verdict, message, hint}")
    doc.add_argument(
        "--timeout", type=_positive, default=5.0, help="seconds for the control channel probe (default 5)"
    )
    args = p.parse_args(argv)

    if args.cmd == "doctor":
        return _doctor(args.config, args.json, args.timeout)
    from agent.ops.wiring import validate_for_run

    try:
        cfg = config_mod.load(args.config)
        if args.cmd in ("check-config", "run"):
            validate_for_run(cfg)  # the same refusals in both: check-config promises run will start
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration: {exc.message}", file=sys.stderr)
        if args.cmd == "status" and args.json:
            print(json.dumps({"error": exc.as_dict()}))
        return 2
    if args.cmd == "check-config":
        summary = {"ok": True, "device_id": cfg.device_id, "transport": cfg.transport}
        print(json.dumps({**summary, "endpoint": cfg.control_endpoint()}))
        return 0
    if args.cmd == "status":
        return _status(cfg.state_dir, args.json)
    log_mod.setup(cfg.log_level)
    from agent.ops.daemon import Agent
    from agent.ops.provision import ensure_identity

    # Before the daemon: a device still to provision has no identity to open its channel with.
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    try:
        if not ensure_identity(cfg, stop.wait):
            return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        return Agent(cfg).run()
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration: {exc.message}", file=sys.stderr)
        return 2


def _status(state_dir: Path, as_json: bool) -> int:
    from agent.ops import status

    try:
        doc = status.read_status(state_dir)
    except StatusUnavailable as exc:
        print(f"edge-agent: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": exc.as_dict()}))
        return status.EXIT_UNREADABLE
    print(json.dumps(doc, indent=2, sort_keys=True) if as_json else status.format_human(doc))
    return status.exit_code(doc)


def _doctor(config: Path | None, as_json: bool, timeout: float) -> int:
    from agent.ops import doctor

    results = doctor.run_checks(config, timeout=timeout)
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(doctor.format_human(results))
    return doctor.exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
