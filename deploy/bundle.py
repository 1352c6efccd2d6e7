"""Image bundles: one uncompressed tar holding ``bundle.json`` and the image's files.

Builds are reproducible: members are sorted, owned by 0:0, dated at the epoch, with normalised
modes, so the same inputs give the same bytes and the same sha256. The archive is not compressed:
model weights barely compress, and an uncompressed tar lets the agent resume downloads by byte
range and unpack with in-kernel copies (see docs/bundle.md).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.fetch import hash_file
from agent.store import BUNDLE_METADATA


def _info(name: str, size: int, executable: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o755 if executable else 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def build(
    out: Path, name: str, version: str, files: Mapping[str, Path], extra: Mapping[str, Any] | None = None
) -> str:
    """Write a bundle to ``out`` from ``{path inside the bundle: source file}``; return its sha256."""
    meta: dict[str, Any] = {
        "format": 1,
        "name": name,
        "version": version,
        "files": {
            arc: {"sha256": hash_file(src), "size": src.stat().st_size} for arc, src in sorted(files.items())
        },
        **(extra or {}),
    }
    meta_bytes = json.dumps(meta, sort_keys=True, indent=2).encode() + b"\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(BUNDLE_METADATA, len(meta_bytes)), io.BytesIO(meta_bytes))
        for arc, src in sorted(files.items()):
            with open(src, "rb") as f:
                tar.addfile(_info(arc, src.stat().st_size, bool(src.stat().st_mode & 0o100)), f)
    tmp.replace(out)
    return hash_file(out)


def read_metadata(path: Path) -> dict[str, Any]:
    """``bundle.json`` of a built bundle."""
    with tarfile.open(path, "r:") as tar:
        f = tar.extractfile(BUNDLE_METADATA)
        if f is None:
            raise ValueError(f"{path} has no {BUNDLE_METADATA}")
        doc: dict[str, Any] = json.loads(f.read())
    return doc
