"""What the registry accepts as a name, a ``name:version`` reference and a ``key=value`` tag.

No database here: the command line parses with these before it opens the registry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from edge_core.errors import ControlPlaneError, ErrorCode

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} {name!r} is not a valid name",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def parse_tags(items: Iterable[str], what: str = "tag") -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a key given twice or without ``=`` is refused."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not TAG_KEY_RE.fullmatch(key):
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what} {item!r} is not KEY=VALUE",
                f"write it as key=value; keys match {TAG_KEY_RE.pattern}",
            )
        if key in out:
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT, f"{what} {key!r} is given twice", "give it once"
            )
        out[key] = value.strip()
    return out


def parse_ref(ref: str, what: str) -> tuple[str, int | None]:
    """``name`` (the latest version) or ``name:version``."""
    name, sep, version = ref.partition(":")
    check_name(name, what)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} {ref!r}: the version must be a positive integer",
            f"write {name}:<version>, or {name} for the latest version",
        )
    return name, int(version)
