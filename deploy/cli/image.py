"""``edge-deploy image``: building bundles, and the image registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from deploy import bundle
from deploy.cli._common import EXIT_OK, listing, open_plane, out, upload_progress, versioned
from deploy.registry import parse_ref, parse_tags
from edge_core.errors import BuildError

if TYPE_CHECKING:
    from deploy.cli._common import Subparsers

IMAGE_COLUMNS = ["ref", "models", "sha256", "size", "score_py", "tags", "created_at"]


def add_parser(sub: Subparsers) -> None:
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


def run(args: argparse.Namespace) -> int:
    c = args.cmd
    # A bundle file and its metadata need neither the registry nor the artifact store.
    if c == "inspect":
        print(json.dumps(bundle.read_metadata(args.bundle), indent=2, sort_keys=True))
        return EXIT_OK
    if c == "build" and args.version is not None:
        return _build_file(args, _smoke(args), _image_tags(args.tag))
    with open_plane(args) as cp:
        reg = cp.registry
        if c == "build":
            tags = _image_tags(args.tag)
            smoke = _smoke(args)
            line, show = upload_progress()
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
            line.done()
            doc = image.as_dict()
            if args.out is not None:
                doc["path"] = str(cp.export_image(image, args.out))
            doc["url"] = cp.artifacts.download_url(image.artifact)
            out(args, doc)
        elif c == "list":
            model = parse_ref(args.model, "model") if args.model else None
            imgs = [i.as_dict() for i in reg.images(args.name, args.version, parse_tags(args.tag), model)]
            out(args, imgs, columns=IMAGE_COLUMNS)
        elif c == "show":
            i = reg.image(*parse_ref(args.ref, "image"))
            deps = [d["id"] for d in reg.deployments(image=(i.name, i.version))]
            out(args, {**i.as_dict(), "bundle": i.meta, "deployments": deps})
        else:
            out(args, {"deleted": reg.delete_image(*versioned(args.ref, "image")).ref})
        return EXIT_OK


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


def _build_file(args: argparse.Namespace, smoke: bundle.SmokeTest | None, tags: dict[str, str]) -> int:
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
