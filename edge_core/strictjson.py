"""One strict JSON reader for everything that crosses the device boundary.

Python's ``json`` is lenient where a verifier must not be: it keeps the last of duplicate keys (so a
signed payload with two ``device_id`` keys means one thing to a reader that keeps the first and
another to this one), accepts ``NaN`` and ``Infinity`` (which pass numeric range checks: every
comparison with NaN is false), turns ``1e999`` into ``inf``, raises ValueError on integers over
4,300 digits and RecursionError on deep nesting (neither of which callers expect). :func:`loads`
refuses all of these with :class:`StrictJSONError`, whose ``reason`` is stable, before any caller acts
on the document. The control plane's signer reads with the same function, so both sides agree byte
for byte on what a document says.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Deeper nesting than this is refused before the parser sees it. The project's documents are at most
#: five or six levels deep; a depth of thousands exists only to exhaust the parser's stack.
MAX_DEPTH = 32
#: Integer literals longer than this are refused (the schemas' largest bound, 2**63, has 19 digits).
MAX_INT_DIGITS = 24

#: A whole string literal (skipped), or one bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class StrictJSONError(ValueError):
    """The document is not strict JSON. ``reason`` is one of: ``not_utf8``, ``too_large``, ``syntax``,
    ``duplicate_key``, ``non_finite``, ``int_too_long``, ``too_deep``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise StrictJSONError("duplicate_key", f"the key {key[:64]!r} appears twice in one object")
        doc[key] = value
    return doc


def _constant(name: str) -> Any:
    raise StrictJSONError("non_finite", f"{name} is not JSON (only finite numbers are)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError("non_finite", f"the number {text[:32]} is beyond a double's range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise StrictJSONError("int_too_long", f"an integer of {len(text)} digits is beyond any allowed range")
    return int(text)


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float, parse_int=_int
)


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects, counted outside strings, without recursion."""
    depth = deepest = 0
    for m in _TOKENS.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads(data: bytes | str, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """The document in ``data``, or StrictJSONError (see the module docstring)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise StrictJSONError("too_large", f"{len(data)} bytes, more than the {max_bytes} allowed")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError("not_utf8", f"not UTF-8: {exc}") from None
    else:
        text = data
    if (depth := nesting_depth(text)) > max_depth:
        raise StrictJSONError("too_deep", f"nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise StrictJSONError("syntax", f"not JSON: {exc}") from None
