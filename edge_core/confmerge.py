"""Config merging for both sides: defaults -> TOML -> environment -> typed dataclasses.

:func:`build_section` turns a mapping into a dataclass, converting strings from the environment and
naming the exact field (``mqtt.port``) when a key is unknown or a value has the wrong type;
:func:`env_overrides` turns ``PREFIX_SECTION__KEY=value`` variables into a nested mapping;
:func:`merge` lays one mapping over another. The agent (agent/config.py) and the control plane
(deploy/config.py) declare their own dataclasses and validation on top.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from edge_core.errors import ConfigError


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(value, args[0], where)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(where, f"expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"expected a table, got {type(value).__name__}")
        return build_section(tp, value, where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(where, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        try:
            return int(value) if isinstance(value, int | str) else _bad(where, "an integer", value)
        except ValueError:
            raise ConfigError(where, f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(where, f"expected a number, got {value!r}")
        try:
            return float(value) if isinstance(value, int | float | str) else _bad(where, "a number", value)
        except ValueError:
            raise ConfigError(where, f"expected a number, got {value!r}") from None
    if tp is str:
        return value if isinstance(value, str) else _bad(where, "a string", value)
    if tp is Path:
        return Path(value) if isinstance(value, str) else _bad(where, "a path", value)
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - a programming error


def _bad(where: str, expected: str, value: Any) -> Any:
    raise ConfigError(where, f"expected {expected}, got {type(value).__name__} {value!r}")


def build_section(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    """The dataclass ``cls`` from ``data``; an unknown key or a wrong type names the field."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(prefix + key, f"unknown setting (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def env_overrides(env: Mapping[str, str], env_prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(env_prefix) or name == env_prefix + "CONFIG":
            continue
        path = name[len(env_prefix) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base
