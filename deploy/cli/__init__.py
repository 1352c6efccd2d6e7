"""``edge-deploy``: the operator's and the pipeline's command line.

Exit codes: 0 ok; 1 the operation failed (a rollout rolled back or was aborted); 2 bad usage or input
(every refusal prints its stable code, what is wrong and what to do); 3 a rollout is paused or held,
or --timeout ran out; 4 the broker cannot be reached.

One module per command group, each with ``add_parser(sub)`` and ``run(args) -> exit code``; this
module builds the parser from them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from deploy.cli import (
    broker,
    completion,
    deploy,
    device,
    image,
    init,
    keys,
    manifest,
    model,
    pki,
    provision,
    serve,
)
from deploy.cli._common import (
    EXIT_FAILED,
    EXIT_HELD,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    fail,
)
from deploy.cli.manifest import new_manifest
from edge_core import extras
from edge_core.errors import BuildError, EdgeError, ErrorCode

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers

__all__ = [
    "EXIT_FAILED",
    "EXIT_HELD",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
    "new_manifest",
]


class _Group(Protocol):
    """What a command group's module provides."""

    def add_parser(self, sub: Subparsers) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: The groups in the order `edge-deploy --help` lists them.
GROUPS: dict[str, _Group] = {
    "init": init,
    "pki": pki,
    "broker": broker,
    "keys": keys,
    "model": model,
    "image": image,
    "device": device,
    "deploy": deploy,
    "serve": serve,
    "provision": provision,
    "manifest": manifest,
    "completion": completion,
}


def _version() -> str:
    try:
        return version("edge-ml")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-deploy",
        description="Edge ML control plane: models, images, devices, deployments and rollouts.",
        epilog="exit codes: 0 ok; 1 the operation failed (a rollout rolled back or was aborted); "
        "2 bad usage or input; 3 a rollout is paused or held, waiting for an operator; 4 broker unreachable",
    )
    p.add_argument("--version", action="version", version=f"edge-deploy {_version()}")
    p.add_argument(
        "--home", type=Path, help="control-plane directory (default $EDGE_DEPLOY_HOME or ./.edge-deploy)"
    )
    sub = p.add_subparsers(dest="group", required=True)
    for group in GROUPS.values():
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    extras.require("control-plane", "edge-deploy")  # on a device (the base install): say what to add
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("edge-deploy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `edge-deploy ... | head -1`: the reader left. Point stdout at /dev/null so that the
        # interpreter's final flush does not raise again, and exit as a SIGPIPE'd process would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.root_parser = parser  # `completion` writes the script from the whole tree of commands
    try:
        return GROUPS[args.group].run(args)
    except EdgeError as exc:
        fail(exc.as_dict())
        return EXIT_UNREACHABLE if exc.code == ErrorCode.BROKER_UNREACHABLE else EXIT_USAGE
    except BuildError as exc:
        fail({"code": str(ErrorCode.INVALID_ARGUMENT), "message": str(exc), "hint": "fix the input"})
        return EXIT_USAGE
    except (FileNotFoundError, PermissionError, FileExistsError, ValueError) as exc:
        fail(
            {"code": str(ErrorCode.INVALID_ARGUMENT), "message": str(exc), "hint": "check the path or value"}
        )
        return EXIT_USAGE
