"""The image bundle's layout, shared by the builder (deploy/bundle.py) and the store (agent/update/store.py).

One uncompressed tar: ``bundle.json`` (the metadata: ``format``, name, version, models, entry script,
files, smoke test) beside the image's files. docs/bundle.md is the full contract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge_core import strictjson
from edge_core.errors import ErrorCode, VerifyError

_SHA256 = re.compile(r"[0-9a-f]{64}")

#: The metadata member, at the root of the archive.
BUNDLE_METADATA = "bundle.json"
#: bundle.json's ``format``: a reader refuses any other.
FORMAT = 1
ENTRY_SCRIPT = "score.py"
MODELS_DIR = "models"
WHEELS_DIR = "wheels"
#: More members than this is refused before anything is unpacked.
MAX_MEMBERS = 10_000
#: bundle.json larger than this is refused before it is parsed (a real one is a few KiB).
MAX_METADATA_BYTES = 4 << 20


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


def _invalid(message: str, hint: str = "rebuild the image with `edge-deploy image build`") -> VerifyError:
    return VerifyError(ErrorCode.BUNDLE_INVALID, message, hint)


def parse_metadata(data: bytes, name: str, version: str) -> tuple[dict[str, Any], dict[str, FileEntry]]:
    """bundle.json's document and its ``files``, checked against the manifest's name and version.

    Pure: bytes in, a verdict out. Refused (``bundle_invalid``): not strict JSON, a ``format`` this
    reader does not know, another name or version, a ``files`` table that is not path -> {sha256,
    size}, and any path the document names (``models[].file``, ``entry_script``, ``wheels[]``) that
    is not one of ``files``: with every member checked against ``files`` while it is unpacked, that
    confines everything the runtime will open to the image's own, verified bytes.
    """
    try:
        meta = strictjson.loads(data, max_bytes=MAX_METADATA_BYTES)
    except strictjson.StrictJSONError as exc:
        raise _invalid(f"{BUNDLE_METADATA} is not strict JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _invalid(f"{BUNDLE_METADATA} is not a JSON object")
    if meta.get("format") != FORMAT or isinstance(meta.get("format"), bool):
        raise _invalid(
            f"{BUNDLE_METADATA} has format {meta.get('format')!r}; this agent reads format {FORMAT}",
            "build the image with an edge-deploy that matches the agent, or upgrade the agent",
        )
    if meta.get("name") != name or str(meta.get("version")) != version:
        raise _invalid(
            f"{BUNDLE_METADATA} names {(meta.get('name'), meta.get('version'))}, "
            f"the manifest names ({name!r}, {version!r})",
            "deploy the image the manifest names",
        )
    table = meta.get("files")
    if not isinstance(table, dict):
        raise _invalid(f"{BUNDLE_METADATA} has no files table")
    files: dict[str, FileEntry] = {}
    for path, entry in table.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
            or entry["size"] < 0
        ):
            raise _invalid(f"{BUNDLE_METADATA}: files[{path!r}] is not {{sha256, size}}")
        files[path] = FileEntry(entry["sha256"], entry["size"])
    named: list[tuple[str, Any]] = [("entry_script", meta.get("entry_script"))]
    models = meta.get("models") or []
    wheels = meta.get("wheels") or []
    if not isinstance(models, list) or not isinstance(wheels, list):
        raise _invalid(f"{BUNDLE_METADATA}: models and wheels must be lists")
    named += [
        (f"models[{i}].file", m.get("file") if isinstance(m, dict) else m) for i, m in enumerate(models)
    ]
    named += [(f"wheels[{i}]", w) for i, w in enumerate(wheels)]
    for where, path in named:
        if path is None and where == "entry_script":
            continue
        if not isinstance(path, str) or path not in files:
            raise _invalid(
                f"{BUNDLE_METADATA}: {where} is {path!r}, which is not a file of this image",
                "every path bundle.json names must be one of its files (nothing outside the image)",
            )
    return meta, files
