"""``edge-deploy model``: the model registry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.cli._common import EXIT_OK, listing, open_plane, out, upload_progress, versioned
from deploy.registry import parse_ref, parse_tags

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers

MODEL_COLUMNS = ["ref", "sha256", "size", "tags", "created_at"]


def add_parser(sub: Subparsers) -> None:
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


def run(args: argparse.Namespace) -> int:
    with open_plane(args) as cp:
        reg, c = cp.registry, args.cmd
        if c == "register":
            line, show = upload_progress()
            m = cp.register_model(
                args.name, args.file, parse_tags(args.tag), parse_tags(args.property, "property"), show
            )
            line.done()
            out(args, m.as_dict())
        elif c == "list":
            ms = [m.as_dict() for m in reg.models(args.name, args.version, parse_tags(args.tag))]
            out(args, ms, columns=MODEL_COLUMNS)
        elif c == "show":
            m = reg.model(*parse_ref(args.ref, "model"))
            out(args, {**m.as_dict(), "images": [i.ref for i in reg.images(model=(m.name, m.version))]})
        else:
            out(args, {"deleted": reg.delete_model(*versioned(args.ref, "model")).ref})
        return EXIT_OK
