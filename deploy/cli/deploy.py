"""``edge-deploy deploy``: deployments, and the rollouts that carry them out in waves."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy import bundle, collection
from deploy.cli._common import (
    EXIT_FAILED,
    EXIT_HELD,
    EXIT_OK,
    ProgressLine,
    bar,
    listing,
    open_plane,
    out,
)
from deploy.plane import ControlPlane
from deploy.registry import parse_ref, parse_tags
from deploy.rollout import Gate, Policy, summary
from edge_core.errors import ControlPlaneError, ErrorCode

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers

DEPLOY_COLUMNS = ["id", "image", "state", "wave", "waves", "devices", "counts", "created_at"]

#: the state in which each command has done what it was asked (create, resume and watch: succeeded)
_DONE = {"pause": "paused", "abort": "aborted", "rollback": "rolled_back"}


def add_parser(sub: Subparsers) -> None:
    dep = sub.add_parser("deploy", help="deployments and rollouts").add_subparsers(dest="cmd", required=True)
    dc = listing(dep.add_parser("create", help="deploy an image to devices by id or by tags, in waves"))
    dc.add_argument("image", metavar="NAME[:VERSION]")
    dc.add_argument(
        "--device", action="append", default=[], metavar="ID", help="a target device (repeatable)"
    )
    dc.add_argument("--tag-query", metavar="KEY=VALUE[,KEY=VALUE]", help="every device with all these tags")
    dc.add_argument(
        "--sections",
        type=Path,
        metavar="FILE.json",
        help="the manifests' runtime and data_collection sections (docs/manifest.md)",
    )
    dc.add_argument(
        "--data-collection",
        type=Path,
        metavar="FILE.yaml|json",
        help="Azure ML's data_collector (a deployment YAML or its data_collector block): collections, "
        "sampling and rolling rate, into the manifests' data_collection (docs/monitoring.md)",
    )
    dc.add_argument(
        "--no-wait", action="store_true", help="create it and return; `edge-deploy serve` drives it"
    )
    dc.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (the devices of each wave, the manifests) and write or publish nothing",
    )
    dc.add_argument("--timeout", type=float, metavar="SECONDS", help="stop waiting after this long (exit 3)")
    _add_rollout_flags(dc)
    dls = listing(dep.add_parser("list", help="deployments, by image, model, device or state"))
    dls.add_argument("--image", metavar="NAME[:VERSION]")
    dls.add_argument("--model", metavar="NAME[:VERSION]")
    dls.add_argument("--device")
    dls.add_argument("--state")
    listing(dep.add_parser("show", help="a deployment, its devices and its history")).add_argument("id")
    for name, text in (
        ("pause", "start no further wave"),
        ("resume", "go on with the next wave"),
        ("abort", "start no further wave, ever; devices keep what they run"),
        ("rollback", "put every device it updated back on its previous image"),
        ("watch", "drive or follow a deployment until it settles"),
    ):
        c = listing(dep.add_parser(name, help=text))
        c.add_argument("id")
        if name != "watch":
            c.add_argument("--no-wait", action="store_true", help="record the command and return")
        c.add_argument("--timeout", type=float, metavar="SECONDS")


def _add_rollout_flags(p: argparse.ArgumentParser) -> None:
    d = Policy()
    g = p.add_argument_group("rollout policy (docs/control-plane.md)")
    g.add_argument(
        "--canary", type=int, default=d.canary, help=f"devices in the first wave (default {d.canary})"
    )
    g.add_argument(
        "--growth", type=float, default=d.growth, help=f"each wave is this many times the last ({d.growth:g})"
    )
    g.add_argument("--max-wave", type=int, default=d.max_wave, help="largest wave (0: no limit)")
    g.add_argument(
        "--success-threshold",
        type=float,
        default=d.success_threshold,
        help=f"fraction of a wave that must be active to go on ({d.success_threshold:g})",
    )
    g.add_argument(
        "--failure-threshold",
        type=float,
        default=d.failure_threshold,
        help=f"fraction of a wave that may fail before it rolls back ({d.failure_threshold:g})",
    )
    g.add_argument(
        "--wave-timeout",
        type=float,
        default=d.wave_timeout_s,
        metavar="SECONDS",
        help=f"a device silent this long counts as failed ({d.wave_timeout_s:g})",
    )
    g.add_argument("--no-auto-rollback", action="store_true", help="pause instead of rolling back")
    g.add_argument(
        "--gate-soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="serve this long on each wave before the health gate judges it (0: no gate)",
    )
    g.add_argument("--gate-max-error-rate", type=float, metavar="RATE")
    g.add_argument(
        "--gate-max-error-rate-increase",
        type=float,
        metavar="RATE",
        help="against the same devices on their previous image",
    )
    g.add_argument(
        "--gate-max-p99-ratio",
        type=float,
        metavar="X",
        help="p99 latency against the same devices on their previous image",
    )
    g.add_argument("--gate-max-p99-ms", type=float, metavar="MS")
    g.add_argument("--gate-min-requests", type=int, default=Gate().min_requests)
    g.add_argument(
        "--gate-no-data",
        choices=("pass", "fail"),
        default="pass",
        help="the verdict when the soak saw fewer than --gate-min-requests requests",
    )


def _policy(args: argparse.Namespace) -> Policy:
    gate = Gate(
        soak_s=args.gate_soak,
        max_error_rate=args.gate_max_error_rate,
        max_error_rate_increase=args.gate_max_error_rate_increase,
        max_p99_ratio=args.gate_max_p99_ratio,
        max_p99_ms=args.gate_max_p99_ms,
        min_requests=args.gate_min_requests,
        no_data=args.gate_no_data,
    )
    bounds = (
        args.gate_max_error_rate,
        args.gate_max_error_rate_increase,
        args.gate_max_p99_ratio,
        args.gate_max_p99_ms,
    )
    if args.gate_soak <= 0 and any(b is not None for b in bounds):
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            "a --gate-max-* bound without --gate-soak: the gate would never look",
            "add --gate-soak SECONDS (how long each wave serves before it is judged)",
        )
    if args.gate_soak > 0 and not gate.enabled:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            "--gate-soak without any --gate-max-* bound",
            "add a bound such as --gate-max-p99-ratio 2",
        )
    return Policy(
        canary=args.canary,
        growth=args.growth,
        max_wave=args.max_wave,
        success_threshold=args.success_threshold,
        failure_threshold=args.failure_threshold,
        wave_timeout_s=args.wave_timeout,
        auto_rollback=not args.no_auto_rollback,
        gate=gate,
    )


def run(args: argparse.Namespace) -> int:
    with open_plane(args) as cp:
        reg, c = cp.registry, args.cmd
        if c == "create":
            name, version = parse_ref(args.image, "image")
            image = reg.image(name, version)
            sections = bundle.load_json(args.sections, "sections") if args.sections else {}
            if not isinstance(sections, dict) or set(sections) - {"runtime", "data_collection"}:
                raise ControlPlaneError(
                    ErrorCode.INVALID_ARGUMENT,
                    "--sections holds only runtime and data_collection",
                    'write {"runtime": {...}, "data_collection": {...}} (docs/manifest.md)',
                )
            if args.data_collection is not None:
                sections = collection.merge(sections, collection.load(args.data_collection))
            query = parse_tags(args.tag_query.split(","), "tag query") if args.tag_query else {}
            if args.dry_run:
                out(args, cp.plan_deployment(image, args.device, query, _policy(args)))
                return EXIT_OK
            dep_id = cp.create_deployment(image, args.device, query, _policy(args), sections)
            if args.no_wait:
                out(args, cp.summary(dep_id))
                return EXIT_OK
            return _drive(cp, args, dep_id)
        if c == "list":
            rows = reg.deployments(
                image=parse_ref(args.image, "image") if args.image else None,
                model=parse_ref(args.model, "model") if args.model else None,
                device=args.device,
                state=args.state,
            )
            listed = [{k: v for k, v in summary(reg, d["id"]).items() if k != "members"} for d in rows]
            out(args, listed, columns=DEPLOY_COLUMNS)
            return EXIT_OK
        if c == "show":
            out(args, cp.summary(args.id))
            return EXIT_OK
        if c != "watch":
            cp.command(args.id, c)
            if args.no_wait:
                out(args, cp.summary(args.id))
                return EXIT_OK
        return _drive(cp, args, args.id)


def _drive(cp: ControlPlane, args: argparse.Namespace, dep_id: str) -> int:
    progress = ProgressLine()

    last: list[tuple[Any, ...]] = []

    def on_step(dep: dict[str, Any]) -> None:
        s = summary(cp.registry, dep_id)
        if not progress.tty:
            # A log or a pipe: one line per change (a JSON object with --json), never rewritten.
            c = s["counts"]
            key = (s["state"], s["wave"], s["phase"], tuple(sorted(c.items())))
            if not last or last[-1] != key:
                last[:] = [key]
                event = {
                    "event": "progress",
                    "deployment": dep_id,
                    "state": s["state"],
                    "wave": s["wave"],
                    "waves": s["waves"],
                    "phase": s["phase"],
                    "counts": c,
                }
                if getattr(args, "json", False):
                    print(json.dumps(event, sort_keys=True), file=sys.stderr, flush=True)
                else:
                    print(
                        f"{dep_id} {s['state']} wave {s['wave']}/{s['waves']} "
                        + " ".join(f"{k} {v}" for k, v in sorted(c.items())),
                        file=sys.stderr,
                        flush=True,
                    )
            return
        c = s["counts"]
        done = c.get("active", 0) + c.get("failed", 0) + c.get("reverted", 0) + c.get("revert_failed", 0)
        progress(
            f"{dep_id} {s['state']:<12} wave {s['wave']}/{s['waves']} {bar(done, s['devices'])} "
            f"active {c.get('active', 0)} failed {c.get('failed', 0)} reverted {c.get('reverted', 0)} "
            f"of {s['devices']} {s['phase'] or ''}"
        )

    dep = cp.driver().run(dep_id, on_step=on_step, timeout_s=args.timeout)
    progress.done()
    out(args, cp.summary(dep_id))
    if dep["state"] == _DONE.get(args.cmd, "succeeded"):
        return EXIT_OK
    if dep["state"] in ("rolled_back", "aborted"):
        return EXIT_FAILED
    return EXIT_HELD
