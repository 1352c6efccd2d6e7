"""Whether an optional part of the install (a pip extra of edge-ml) is there, asked of the installed
package's own metadata, so that the list of what an extra needs lives in pyproject.toml only.

A device installs the base package: `edge-agent` and nothing of the control plane. `edge-deploy` and
`edge-sim` call :func:`require` first, so that on a device they say which extra to install instead
of failing later, deep in some command, with an ImportError's traceback."""

from __future__ import annotations

import re
import sys
from importlib import metadata

DIST = "edge-ml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(extra: str) -> list[str]:
    """The distributions that ``extra`` requires and that are not installed. Empty where edge-ml is
    not installed at all (run from a checkout with PYTHONPATH: the developer's environment decides)."""
    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for req in requires:
        marker = _EXTRA.search(req.partition(";")[2])
        name = _NAME.match(req)
        if marker is None or name is None or _normalize(marker.group(1)) != _normalize(extra):
            continue
        try:
            metadata.distribution(name.group(1))
        except metadata.PackageNotFoundError:
            out.append(name.group(1))
    return out


def require(extra: str, prog: str) -> None:
    """Exit with status 2 and one line naming the pip command when ``extra`` is not installed."""
    absent = missing(extra)
    if absent:
        print(
            f"{prog}: needs the {extra} extra, which is not installed here (missing: {', '.join(absent)}): "
            f"pip install '{DIST}[{extra}]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
