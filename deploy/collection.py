"""Azure ML's data-collector settings, as a deployment YAML writes them, into a manifest's
``data_collection`` section (``edge-deploy deploy create --data-collection FILE``).

The file is an Azure ML online deployment YAML (its ``data_collector`` block is taken, with its
``endpoint_name`` and ``name``), a bare ``data_collector`` block, or JSON of either::

    data_collector:
      collections:
        model_inputs: {enabled: 'True'}
        model_outputs: {enabled: 'True', sampling_rate: 0.5}
        request: {enabled: 'True'}
      rolling_rate: Hour
      sampling_rate: 1.0

Azure ML's YAML quotes its booleans (``'True'``, ``'False'``); they are turned into JSON booleans
here, and the result is checked against the manifest's JSON Schema before anything is signed.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema

from edge_core import manifest as mf
from edge_core.errors import ControlPlaneError, ErrorCode

#: The data_collector keys Azure ML's YAML schema has, and the manifest's own additions.
KEYS = frozenset(
    {
        "collections",
        "sampling_rate",
        "rolling_rate",
        "request_logging",
        "collect_model_data",
        "endpoint_name",
        "deployment_name",
        "workspace",
    }
)


def _refuse(path: Path, message: str) -> ControlPlaneError:
    return ControlPlaneError(
        ErrorCode.INVALID_ARGUMENT,
        f"--data-collection {path}: {message}",
        "write an Azure ML data_collector block (docs/manifest.md, data_collection)",
    )


def _bool(value: Any) -> Any:
    """Azure ML's YAML writes ``enabled: 'True'``; YAML 1.1 readers may also give True itself."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _read(path: Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        yaml = importlib.import_module("yaml")  # PyYAML, when installed: JSON needs nothing
    except ImportError:
        raise _refuse(path, "reading YAML needs PyYAML (pip install pyyaml); or give JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def to_section(doc: Any, path: Path = Path("-")) -> dict[str, Any]:
    """The manifest's ``data_collection`` keys for a deployment YAML or data_collector block."""
    if not isinstance(doc, Mapping):
        raise _refuse(path, "not a mapping")
    block = doc.get("data_collector", doc)
    if not isinstance(block, Mapping):
        raise _refuse(path, "data_collector is not a mapping")
    unknown = sorted(set(block) - KEYS)
    if unknown:
        raise _refuse(path, f"unknown data_collector key(s) {unknown}; known: {sorted(KEYS)}")
    section: dict[str, Any] = {k: v for k, v in block.items() if k != "collections"}
    collections: dict[str, Any] = {}
    for name, spec in (block.get("collections") or {}).items():
        if not isinstance(spec, Mapping):
            raise _refuse(path, f"collection {name!r} is not a mapping")
        collections[str(name)] = {k: _bool(v) for k, v in spec.items()}
    if collections:
        section["collections"] = collections
    if "collect_model_data" in section:
        section["collect_model_data"] = _bool(section["collect_model_data"])
    if "data_collector" in doc:  # a whole deployment YAML: its endpoint and deployment names
        if isinstance(doc.get("endpoint_name"), str):
            section.setdefault("endpoint_name", doc["endpoint_name"])
        if isinstance(doc.get("name"), str):
            section.setdefault("deployment_name", doc["name"])
    return section


def check(section: Mapping[str, Any], path: Path = Path("-")) -> None:
    """Refuse what every agent would refuse, naming the key (the manifest's own schema)."""
    full = mf.schema()
    sub = {"$defs": full["$defs"], **full["properties"]["data_collection"]}
    errors = sorted(
        jsonschema.Draft202012Validator(sub).iter_errors(dict(section)), key=lambda e: list(e.absolute_path)
    )
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "data_collector"
        raise _refuse(path, f"{where}: {errors[0].message}")


def load(path: Path) -> dict[str, Any]:
    """Read, convert and check a ``--data-collection`` file."""
    try:
        doc = _read(path)
    except OSError as exc:
        raise _refuse(path, f"cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSON and YAML parse errors
        raise _refuse(path, f"cannot parse it: {exc}") from None
    section = to_section(doc, path)
    check(section, path)
    return section


def merge(sections: Mapping[str, Any], section: Mapping[str, Any]) -> dict[str, Any]:
    """``--sections`` with a ``--data-collection`` file's keys over the same keys of its
    ``data_collection`` (the capture settings there stay)."""
    return {**sections, "data_collection": {**(sections.get("data_collection") or {}), **section}}
