"""``edge-deploy``: the operator's and the pipeline's command line.

Exit codes: 0 ok; 1 the operation failed (a rollout rolled back or was aborted); 2 bad usage or input
(every refusal prints its stable code, what is wrong and what to do); 3 a rollout is paused or held,
or --timeout ran out; 4 the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deploy import bundle, collection, config, signer
from deploy.artifacts import Progress
from deploy.plane import ControlPlane
from deploy.registry import LIVE_STATES, parse_ref, parse_tags
from deploy.rollout import Gate, Policy, summary
from edge_core import manifest as mf
from edge_core.errors import BuildError, ControlPlaneError, EdgeError, ErrorCode, ManifestRefused
from edge_core.fsutil import hash_file


def _duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 12h or 7d")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def new_manifest(
    device_id: str,
    bundle: Path,
    urls: list[str],
    *,
    name: str,
    version: str,
    generation: int | None = None,
    deployment_id: str | None = None,
    valid_for: timedelta = timedelta(days=7),
    now: datetime | None = None,
) -> dict[str, Any]:
    """A manifest for one device naming one bundle file. The generation defaults to the current time
    in milliseconds: it only grows, without a registry to count it."""
    now = now or datetime.now(UTC)
    return {
        "schema_version": 1,
        "device_id": device_id,
        "deployment_id": deployment_id or f"dep-{uuid.uuid4().hex[:12]}",
        "generation": generation if generation is not None else int(time.time() * 1000),
        "issued_at": mf.format_time(now),
        "expires_at": mf.format_time(now + valid_for),
        "image": {
            "name": name,
            "version": version,
            "sha256": hash_file(bundle),
            "size": bundle.stat().st_size,
            "urls": urls,
        },
    }


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HELD, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-deploy",
        description="Edge ML control plane: models, images, devices, deployments and rollouts.",
        epilog="exit codes: 0 ok; 1 the operation failed (a rollout rolled back or was aborted); "
        "2 bad usage or input; 3 a rollout is paused or held, waiting for an operator; 4 broker unreachable",
    )
    p.add_argument(
        "--home", type=Path, help="control-plane directory (default $EDGE_DEPLOY_HOME or ./.edge-deploy)"
    )
    sub = p.add_subparsers(dest="group", required=True)

    def listing(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        return parser

    keys = sub.add_parser("keys", help="manifest signing keys").add_subparsers(dest="cmd", required=True)
    kc = keys.add_parser("create", help="create an Ed25519 signing key pair")
    kc.add_argument("--out", type=Path, help="directory for NAME.key and NAME.pub (default: HOME/keys)")
    kc.add_argument("--name", default="signing")

    # -- models
    model = sub.add_parser("model", help="the model registry").add_subparsers(dest="cmd", required=True)
    mr = listing(model.add_parser("register", help="register an ONNX file as the next version of NAME"))
    mr.add_argument("name")
    mr.add_argument("file", type=Path)
    mr.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    mr.add_argument("--property", action="append", default=[], metavar="KEY=VALUE")
    ml = listing(model.add_parser("list", help="models, filtered by name, version or tags"))
    ml.add_argument("--name")
    ml.add_argument("--version", type=int)
    ml.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    listing(model.add_parser("show", help="one model (NAME for the latest, or NAME:VERSION)")).add_argument(
        "ref"
    )
    model.add_parser("delete", help="delete NAME:VERSION (refused while an image uses it)").add_argument(
        "ref"
    )

    # -- images
    img = sub.add_parser("image", help="image bundles and the image registry").add_subparsers(
        dest="cmd", required=True
    )
    ib = listing(
        img.add_parser(
            "build",
            help="build an image from registered models (or, with --version, a bundle file from ONNX files)",
            description="Without --version: build from registered models (--model "
            "[ALIAS=]NAME[:VERSION]) and register the image as the next version of --name. With "
            "--version: build a bundle file from ONNX files (--model [NAME=]PATH) and register "
            "nothing. See docs/bundle.md.",
        )
    )
    ib.add_argument("--name", required=True, help="image name (the manifest's image.name)")
    ib.add_argument("--version", help="build a bundle file with this version, outside the registry")
    ib.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="MODEL",
        help="[ALIAS=]NAME[:VERSION] of a registered model, or [NAME=]PATH with --version (repeatable)",
    )
    ib.add_argument("--score", type=Path, metavar="FILE", help="the entry script, stored as score.py")
    ib.add_argument(
        "--include",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="another file at the bundle's root, e.g. a module score.py imports (repeatable)",
    )
    ib.add_argument("--wheel", type=Path, action="append", default=[], help="a pinned .whl (repeatable)")
    ib.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="(repeatable)")
    ib.add_argument("--property", action="append", default=[], metavar="KEY=VALUE", help="registry only")
    ib.add_argument("--sample-request", type=Path, metavar="FILE.json", help="the smoke test's request")
    ib.add_argument("--expected-response", type=Path, metavar="FILE.json", help="its expected response")
    ib.add_argument(
        "--rtol", type=float, help=f"relative tolerance for floats (default {bundle.DEFAULT_RTOL:g})"
    )
    ib.add_argument(
        "--atol", type=float, help=f"absolute tolerance for floats (default {bundle.DEFAULT_ATOL:g})"
    )
    ib.add_argument("--smoke-model", metavar="NAME", help="the model the smoke test is for (several models)")
    ib.add_argument(
        "--out", type=Path, help="the bundle file to write (with --version: default NAME-VERSION.tar)"
    )
    il = listing(img.add_parser("list", help="images, filtered by name, version, tags or model"))
    il.add_argument("--name")
    il.add_argument("--version", type=int)
    il.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    il.add_argument("--model", metavar="NAME[:VERSION]", help="images built from this model")
    listing(img.add_parser("show", help="one image (NAME or NAME:VERSION)")).add_argument("ref")
    img.add_parser("delete", help="delete NAME:VERSION (refused while a deployment uses it)").add_argument(
        "ref"
    )
    img.add_parser("inspect", help="print a bundle file's bundle.json").add_argument("bundle", type=Path)

    # -- devices
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

    # -- deployments
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

    sv = sub.add_parser("serve", help="serve the local artifact store over HTTP and drive every live rollout")
    sv.add_argument("--listen", help="HOST:PORT (default serve.listen)")

    # -- manifests by hand
    man = sub.add_parser("manifest", help="deployment manifests by hand").add_subparsers(
        dest="cmd", required=True
    )
    mc = man.add_parser("create", help="write an (unsigned) manifest for one device and one bundle")
    mc.add_argument("--device", required=True)
    mc.add_argument("--bundle", type=Path, required=True)
    mc.add_argument(
        "--url", action="append", required=True, help="where the device downloads the bundle (repeatable)"
    )
    mc.add_argument("--generation", type=int)
    mc.add_argument("--deployment-id")
    mc.add_argument("--valid-for", type=_duration, default=timedelta(days=7))
    mc.add_argument(
        "--data-collection",
        type=Path,
        metavar="FILE.yaml|json",
        help="Azure ML's data_collector (a deployment YAML or its data_collector block)",
    )
    ms = man.add_parser("sign", help="sign a manifest (JSON file or - for stdin) into an envelope")
    ms.add_argument("manifest")
    ms.add_argument("--key", type=Path, required=True)
    mv = man.add_parser("verify", help="verify a signed envelope as a device would")
    mv.add_argument("envelope", type=Path)
    mv.add_argument("--pubkey", type=Path, action="append", required=True)
    mv.add_argument("--device", required=True)
    mv.add_argument("--last-generation", type=int, default=0)
    mp = man.add_parser("publish", help="publish a signed envelope as a device's retained desired state")
    mp.add_argument("envelope", type=Path)
    mp.add_argument("--device", required=True)
    mp.add_argument("--broker", required=True, help="HOST:PORT")
    mp.add_argument("--ca", type=Path)
    mp.add_argument("--cert", type=Path)
    mp.add_argument("--key", type=Path)
    mp.add_argument("--prefix", default="edge")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except EdgeError as exc:
        _fail(exc.as_dict())
        return EXIT_UNREACHABLE if exc.code == ErrorCode.BROKER_UNREACHABLE else EXIT_USAGE
    except BuildError as exc:
        _fail({"code": str(ErrorCode.INVALID_ARGUMENT), "message": str(exc), "hint": "fix the input"})
        return EXIT_USAGE
    except (FileNotFoundError, PermissionError, FileExistsError, ValueError) as exc:
        print(f"edge-deploy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _fail(err: dict[str, str]) -> None:
    hint = f"\n  hint: {err['hint']}" if err.get("hint") else ""
    print(f"edge-deploy: {err['code']}: {err['message']}{hint}", file=sys.stderr)


def _image_tags(items: list[str]) -> dict[str, str]:
    """Image tags go into bundle.json, so the bundle builder's rules apply to them."""
    tags: dict[str, str] = {}
    for text in items:
        key, value = bundle.parse_tag(text)
        if key in tags:
            # Refused rather than last-wins: the order of the flags must not change the image.
            raise BuildError(f"tag {key!r} is given twice")
        tags[key] = value
    return tags


def _out(args: argparse.Namespace, doc: Any, columns: list[str] | None = None) -> None:
    """One JSON document with --json, or for a command that has no table; else a table."""
    if getattr(args, "json", False) or columns is None:
        print(
            json.dumps(doc, indent=None if getattr(args, "json", False) else 2, sort_keys=True, default=str)
        )
        return
    rows = doc if isinstance(doc, list) else [doc]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in sorted(v.items())) or "-"
    if isinstance(v, list | tuple):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, float) and v > 1e9:
        return datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


class _Progress:
    """One line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, text: str) -> None:
        if self.tty and text != self.last:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
            self.last = text

    def done(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")


def _upload_progress() -> tuple[_Progress, Progress]:
    bar = _Progress()

    def show(name: str, sent: int, total: int) -> None:
        bar(f"uploading {name} {_bar(sent, total)} {sent / 2**20:.1f}/{total / 2**20:.1f} MiB")

    return bar, show


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


#: the state in which each command has done what it was asked (create, resume and watch: succeeded)
_DONE = {"pause": "paused", "abort": "aborted", "rollback": "rolled_back"}


def _drive(cp: ControlPlane, args: argparse.Namespace, dep_id: str) -> int:
    progress = _Progress()

    def on_step(dep: dict[str, Any]) -> None:
        if not progress.tty:
            return
        s = summary(cp.registry, dep_id)
        c = s["counts"]
        done = c.get("active", 0) + c.get("failed", 0) + c.get("reverted", 0) + c.get("revert_failed", 0)
        progress(
            f"{dep_id} {s['state']:<12} wave {s['wave']}/{s['waves']} {_bar(done, s['devices'])} "
            f"active {c.get('active', 0)} failed {c.get('failed', 0)} reverted {c.get('reverted', 0)} "
            f"of {s['devices']} {s['phase'] or ''}"
        )

    dep = cp.driver().run(dep_id, on_step=on_step, timeout_s=args.timeout)
    progress.done()
    out = cp.summary(dep_id)
    _out(args, out)
    if dep["state"] == _DONE.get(args.cmd, "succeeded"):
        return EXIT_OK
    if dep["state"] in ("rolled_back", "aborted"):
        return EXIT_FAILED
    return EXIT_HELD


def _image_build_file(args: argparse.Namespace, smoke: bundle.SmokeTest | None, tags: dict[str, str]) -> int:
    models = [bundle.parse_model_arg(m) for m in args.model]
    built = bundle.build_image(
        args.out or Path(f"{args.name}-{args.version}.tar"),
        args.name,
        args.version,
        models,
        score=args.score,
        include=args.include,
        wheels=args.wheel,
        tags=tags,
        smoke_test=smoke,
    )
    print(json.dumps(built.as_dict()))
    return EXIT_OK


def _smoke(args: argparse.Namespace) -> bundle.SmokeTest | None:
    if (args.sample_request is None) != (args.expected_response is None):
        raise BuildError("--sample-request and --expected-response go together")
    if args.sample_request is not None:
        return bundle.SmokeTest(
            request=bundle.load_json(args.sample_request, "sample request"),
            expected=bundle.load_json(args.expected_response, "expected response"),
            model=args.smoke_model,
            rtol=bundle.DEFAULT_RTOL if args.rtol is None else args.rtol,
            atol=bundle.DEFAULT_ATOL if args.atol is None else args.atol,
        )
    if args.rtol is not None or args.atol is not None or args.smoke_model is not None:
        raise BuildError("--rtol, --atol and --smoke-model need --sample-request and --expected-response")
    return None


def _model_ref(text: str) -> tuple[str, str, int | None]:
    alias, sep, ref = text.partition("=")
    if not sep:
        alias, ref = "", text
    name, version = parse_ref(ref, "model")
    return alias or name, name, version


def _versioned(ref: str, what: str) -> tuple[str, int]:
    name, version = parse_ref(ref, what)
    if version is None:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"deleting needs an exact version: {what} {ref}:<version>",
            f"see `edge-deploy {what} list --name {name}`",
        )
    return name, version


MODEL_COLUMNS = ["ref", "sha256", "size", "tags", "created_at"]
IMAGE_COLUMNS = ["ref", "models", "sha256", "size", "score_py", "tags", "created_at"]
DEVICE_COLUMNS = ["id", "online", "tags", "state", "image", "generation", "last_seen"]
DEPLOY_COLUMNS = ["id", "image", "state", "wave", "waves", "devices", "counts", "created_at"]


def _device_row(d: dict[str, Any]) -> dict[str, Any]:
    st, act = d["status"] or {}, d["active"] or {}
    return {
        **d,
        "state": st.get("state"),
        "generation": st.get("generation"),
        "image": f"{act['name']}:{act['version']}" if act else None,
    }


def _registry_command(cp: ControlPlane, args: argparse.Namespace) -> int:
    reg = cp.registry
    g, c = args.group, args.cmd
    if g == "model":
        if c == "register":
            bar, show = _upload_progress()
            m = cp.register_model(
                args.name, args.file, parse_tags(args.tag), parse_tags(args.property, "property"), show
            )
            bar.done()
            _out(args, m.as_dict())
        elif c == "list":
            ms = [m.as_dict() for m in reg.models(args.name, args.version, parse_tags(args.tag))]
            _out(args, ms, columns=MODEL_COLUMNS)
        elif c == "show":
            m = reg.model(*parse_ref(args.ref, "model"))
            _out(args, {**m.as_dict(), "images": [i.ref for i in reg.images(model=(m.name, m.version))]})
        else:
            _out(args, {"deleted": reg.delete_model(*_versioned(args.ref, "model")).ref})
        return EXIT_OK
    if g == "image":
        if c == "build":
            tags = _image_tags(args.tag)
            smoke = _smoke(args)
            if args.version is not None:
                return _image_build_file(args, smoke, tags)
            bar, show = _upload_progress()
            image = cp.build_image(
                args.name,
                [_model_ref(m) for m in args.model],
                score=args.score,
                include=args.include,
                wheels=args.wheel,
                tags=tags,
                properties=parse_tags(args.property, "property"),
                smoke_test=smoke,
                progress=show,
            )
            bar.done()
            doc = image.as_dict()
            if args.out is not None:
                doc["path"] = str(cp.export_image(image, args.out))
            doc["url"] = cp.artifacts.download_url(image.artifact)
            _out(args, doc)
        elif c == "list":
            model = parse_ref(args.model, "model") if args.model else None
            imgs = [i.as_dict() for i in reg.images(args.name, args.version, parse_tags(args.tag), model)]
            _out(args, imgs, columns=IMAGE_COLUMNS)
        elif c == "show":
            i = reg.image(*parse_ref(args.ref, "image"))
            deps = [d["id"] for d in reg.deployments(image=(i.name, i.version))]
            _out(args, {**i.as_dict(), "bundle": i.meta, "deployments": deps})
        else:
            _out(args, {"deleted": reg.delete_image(*_versioned(args.ref, "image")).ref})
        return EXIT_OK
    if g == "device":
        if c == "list":
            rows = [_device_row(d) for d in cp.devices(parse_tags(args.tag), refresh=not args.offline)]
            _out(args, rows, columns=DEVICE_COLUMNS)
        elif c == "show":
            _ = cp.fleet
            d = reg.device(args.device)
            _out(args, {**d, "deployments": [x["id"] for x in reg.deployments(device=args.device)]})
        else:
            _out(args, reg.tag_device(args.device, parse_tags(args.tags), args.remove))
        return EXIT_OK
    # deploy
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
        dep_id = cp.create_deployment(image, args.device, query, _policy(args), sections)
        if args.no_wait:
            _out(args, cp.summary(dep_id))
            return EXIT_OK
        return _drive(cp, args, dep_id)
    if c == "list":
        rows = reg.deployments(
            image=parse_ref(args.image, "image") if args.image else None,
            model=parse_ref(args.model, "model") if args.model else None,
            device=args.device,
            state=args.state,
        )
        out = [{k: v for k, v in summary(reg, d["id"]).items() if k != "members"} for d in rows]
        _out(args, out, columns=DEPLOY_COLUMNS)
        return EXIT_OK
    if c == "show":
        _out(args, cp.summary(args.id))
        return EXIT_OK
    if c != "watch":
        cp.command(args.id, c)
        if args.no_wait:
            _out(args, cp.summary(args.id))
            return EXIT_OK
    return _drive(cp, args, args.id)


def _serve(cp: ControlPlane, args: argparse.Namespace) -> int:
    """The control plane as a service: the artifact endpoint, the fleet's reports in the registry,
    and every live deployment driven (pause/resume/abort/rollback from other processes included)."""
    from simulators.bundle_server import BundleServer

    listen = args.listen or cp.cfg.serve.listen
    host, _, port = listen.rpartition(":")
    root = cp.artifacts.root
    server = BundleServer(root, host=host, port=int(port), keep_requests=1000).start() if root else None
    driver = cp.driver()
    # One identity per host and home: a serve restarted after a crash takes its own lease back at once.
    driver.owner = f"serve@{socket.gethostname()}:{cp.cfg.home.absolute()}"
    print(
        json.dumps({"serving": server.url if server else None, "registry": str(cp.cfg.registry_path)}),
        flush=True,
    )
    try:
        while True:
            cp.ingest()
            for dep in cp.registry.deployments():
                live = dep["state"] in LIVE_STATES or dep["command"]
                if live and cp.registry.take_lease(dep["id"], driver.owner, driver.LEASE_S):
                    driver.step_or_wait(dep["id"])
            time.sleep(cp.cfg.serve.poll)
    finally:
        if server is not None:
            server.stop()


def _dispatch(args: argparse.Namespace) -> int:
    if args.group == "keys":
        out = args.out or (config.load(args.home).signing_key.parent)
        key_path, pub_path, kid = signer.create_keypair(out, args.name)
        print(json.dumps({"private_key": str(key_path), "public_key": str(pub_path), "keyid": kid}))
        return EXIT_OK
    if args.group == "image" and args.cmd == "inspect":
        print(json.dumps(bundle.read_metadata(args.bundle), indent=2, sort_keys=True))
        return EXIT_OK
    if args.group == "image" and args.cmd == "build" and args.version is not None:
        return _image_build_file(args, _smoke(args), _image_tags(args.tag))
    if args.group == "manifest":
        return _manifest_command(args)
    with ControlPlane(config.load(args.home)) as cp:
        if args.group == "serve":
            return _serve(cp, args)
        return _registry_command(cp, args)


def _manifest_command(args: argparse.Namespace) -> int:
    if args.cmd == "create":
        meta = bundle.read_metadata(args.bundle)
        doc = new_manifest(
            args.device,
            args.bundle,
            args.url,
            name=meta["name"],
            version=str(meta["version"]),
            generation=args.generation,
            deployment_id=args.deployment_id,
            valid_for=args.valid_for,
        )
        if args.data_collection is not None:
            doc["data_collection"] = collection.load(args.data_collection)
        print(json.dumps(doc, indent=2))
        return 0
    if args.cmd == "sign":
        text = sys.stdin.read() if args.manifest == "-" else Path(args.manifest).read_text()
        sys.stdout.buffer.write(signer.sign_manifest(json.loads(text), signer.load_private(args.key)) + b"\n")
        return 0
    if args.cmd == "verify":
        trusted = {}
        for path in args.pubkey:
            k = mf.load_public_key(path.read_bytes())
            trusted[mf.key_id(k)] = k
        try:
            m = mf.verify(
                args.envelope.read_bytes().strip(),
                trusted,
                device_id=args.device,
                now=datetime.now(UTC),
                last_generation=args.last_generation,
            )
        except ManifestRefused as exc:
            print(json.dumps({"ok": False, **exc.as_dict()}))
            return 1
        print(json.dumps({"ok": True, "keyid": m.keyid, "manifest": json.loads(m.payload)}, indent=2))
        return 0
    if args.cmd == "publish":
        from deploy.publisher import OperatorClient

        host, _, port = args.broker.rpartition(":")
        with OperatorClient(
            host, int(port), ca=args.ca, cert=args.cert, key=args.key, prefix=args.prefix
        ) as op:
            op.publish_manifest(args.device, args.envelope.read_bytes().strip())
        print(json.dumps({"published": True, "device": args.device}))
        return 0
    raise AssertionError(args)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
