"""The operators' JSON API: one route table, from which the server dispatches and the OpenAPI
document is generated (one source of truth: tests/test_web_api.py checks both directions).

Every handler gets a ControlPlane opened for its request (its own registry connection: the SQLite
connection of `serve`'s main loop is not shared across threads) and returns a JSON-able value.
Refusals are ControlPlaneErrors with the project's stable codes; the server maps them to statuses.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploy.plane import ControlPlane
from deploy.registry import parse_ref, parse_tags
from deploy.rollout import COMMANDS, Policy, summary
from edge_core.errors import ControlPlaneError, ErrorCode

#: heartbeats younger than this give a device's p99 and error rate in the fleet table
METRICS_WINDOW_S = 300.0


@dataclass(frozen=True)
class Request:
    params: dict[str, str]
    query: dict[str, list[str]]
    body: Any = None

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.arg(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise _bad(f"query parameter {name}={raw!r} is not a number from {low:g} to {high:g}")
        return value


Handler = Callable[[ControlPlane, Request], Any]


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    repeat: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    op_id: str
    summary: str
    tag: str
    handler: Handler | None  # None: answered by the server itself (the event stream, this document)
    query: tuple[Param, ...] = ()
    body: Mapping[str, Any] | None = None  # the JSON schema of the request body
    produces: str = "application/json"
    pattern: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.path)

    def match(self, path: str) -> dict[str, str] | None:
        m = self.pattern.match(path)
        return m.groupdict() if m else None


def _bad(message: str, hint: str = "see /api/openapi.json") -> ControlPlaneError:
    return ControlPlaneError(ErrorCode.INVALID_ARGUMENT, message, hint)


def _tags(rq: Request) -> dict[str, str]:
    return parse_tags(rq.query.get("tag", []))


def _ref(rq: Request, name: str, what: str) -> tuple[str, int | None] | None:
    raw = rq.arg(name)
    return parse_ref(raw, what) if raw else None


def _version(raw: str, what: str) -> int:
    if not raw.isdigit():
        raise _bad(f"{what} version {raw!r} is not a number", f"see /api/{what}s")
    return int(raw)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Requests, error rate and p99 of heartbeat windows, as the health gates weigh them: the p99
    is the request-weighted mean of the windows' p99s (docs/control-plane.md)."""
    req = sum(int(r["requests"]) for r in rows)
    err = sum(int(r["errors"]) for r in rows)
    weighted = [
        (float(r["p99_ms"]), int(r["requests"])) for r in rows if r["p99_ms"] is not None and r["requests"]
    ]
    total = sum(n for _, n in weighted)
    return {
        "requests": req,
        "error_rate": err / req if req else None,
        "p99_ms": sum(p * n for p, n in weighted) / total if total else None,
    }


def device_row(d: Mapping[str, Any], beats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A device as the fleet table shows it: the registry's row, what it runs, and its recent serving."""
    st, act = d["status"] or {}, d["active"] or {}
    return {
        **d,
        "state": st.get("state"),
        "generation": st.get("generation"),
        "deployment_id": st.get("deployment_id"),
        "image": f"{act['name']}:{act['version']}" if act.get("name") else None,
        # the agent reports drift in its status when a monitor computes it; absent: unknown
        "drift": st.get("drift"),
        **aggregate(beats),
    }


def fleet_rows(cp: ControlPlane, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    reg = cp.registry
    devices = reg.devices(tags)
    t = time.time()
    beats = reg.heartbeats([d["id"] for d in devices], t - METRICS_WINDOW_S, t)
    by_device: dict[str, list[dict[str, Any]]] = {}
    for b in beats:
        by_device.setdefault(b["device_id"], []).append(b)
    return [device_row(d, by_device.get(d["id"], [])) for d in devices]


# -- handlers --------------------------------------------------------------------------------------


def list_models(cp: ControlPlane, rq: Request) -> Any:
    version = rq.arg("version")
    models = cp.registry.models(
        name=rq.arg("name"), version=_version(version, "model") if version else None, tags=_tags(rq)
    )
    return [
        {**m.as_dict(), "images": [i.ref for i in cp.registry.images(model=(m.name, m.version))]}
        for m in models
    ]


def show_model(cp: ControlPlane, rq: Request) -> Any:
    m = cp.registry.model(rq.params["name"], _version(rq.params["version"], "model"))
    return {**m.as_dict(), "images": [i.ref for i in cp.registry.images(model=(m.name, m.version))]}


def _image_doc(cp: ControlPlane, ref: str, doc: dict[str, Any], fleet: Sequence[Mapping[str, Any]]) -> Any:
    name, version = doc["name"], doc["version"]
    deps = cp.registry.deployments(image=(name, version))
    return {
        **doc,
        "deployments": [d["id"] for d in deps],
        "devices": [d["id"] for d in fleet if d["image"] == ref],
    }


def list_images(cp: ControlPlane, rq: Request) -> Any:
    fleet = fleet_rows(cp)
    images = cp.registry.images(name=rq.arg("name"), tags=_tags(rq), model=_ref(rq, "model", "model"))
    return [_image_doc(cp, i.ref, i.as_dict(), fleet) for i in images]


def show_image(cp: ControlPlane, rq: Request) -> Any:
    i = cp.registry.image(rq.params["name"], _version(rq.params["version"], "image"))
    return _image_doc(cp, i.ref, i.as_dict(), fleet_rows(cp))


def list_devices(cp: ControlPlane, rq: Request) -> Any:
    # No broker round trip: `serve` ingests every report as it arrives, so the registry is current.
    return fleet_rows(cp, _tags(rq))


def show_device(cp: ControlPlane, rq: Request) -> Any:
    reg = cp.registry
    dev = reg.device(rq.params["device_id"])
    t = time.time()
    row = device_row(dev, reg.heartbeats([dev["id"]], t - METRICS_WINDOW_S, t))
    history = []
    for dep in reversed(reg.deployments(device=dev["id"])):
        mine = [m for m in reg.members(dep["id"]) if m["device_id"] == dev["id"]]
        m = mine[0] if mine else {}
        history.append(
            {
                "deployment_id": dep["id"],
                "image": reg.image_by_id(dep["image_id"]).ref,
                "deployment_state": dep["state"],
                "created_at": dep["created_at"],
                **{k: m.get(k) for k in ("wave", "state", "generation", "error")},
            }
        )
    return {**row, "history": history}


def tag_device(cp: ControlPlane, rq: Request) -> Any:
    body = rq.body if isinstance(rq.body, dict) else None
    if body is None or set(body) - {"set", "remove"}:
        raise _bad('the body is {"set": {"key": "value"}, "remove": ["key"]}')
    set_tags, remove = body.get("set", {}), body.get("remove", [])
    if not isinstance(set_tags, dict) or not all(isinstance(v, str) for v in set_tags.values()):
        raise _bad("set maps tag keys to string values")
    if not isinstance(remove, list) or not all(isinstance(k, str) for k in remove):
        raise _bad("remove is a list of tag keys")
    # the CLI's parser, so that the API accepts exactly the tags `device tag` accepts
    checked = parse_tags([f"{k}={v}" for k, v in set_tags.items()])
    dev = cp.registry.tag_device(rq.params["device_id"], checked, remove)
    return next(r for r in fleet_rows(cp) if r["id"] == dev["id"])


def list_deployments(cp: ControlPlane, rq: Request) -> Any:
    reg = cp.registry
    rows = reg.deployments(
        image=_ref(rq, "image", "image"),
        model=_ref(rq, "model", "model"),
        device=rq.arg("device"),
        state=rq.arg("state"),
    )
    return [summary(reg, d["id"]) for d in rows]


def show_deployment(cp: ControlPlane, rq: Request) -> Any:
    return cp.summary(rq.params["deployment_id"])


def create_deployment(cp: ControlPlane, rq: Request) -> Any:
    body = rq.body if isinstance(rq.body, dict) else None
    if body is None or not isinstance(body.get("image"), str):
        raise _bad('the body is {"image": "NAME[:VERSION]", "devices": [...] or "tag_query": {...}}')
    extra = set(body) - {"image", "devices", "tag_query", "policy", "sections"}
    if extra:
        raise _bad(f"unknown field(s) {sorted(extra)}")
    devices, query = body.get("devices", []), body.get("tag_query", {})
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise _bad("devices is a list of device ids")
    if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
        raise _bad("tag_query maps tag keys to string values")
    policy_doc, sections = body.get("policy", {}), body.get("sections", {})
    if not isinstance(sections, dict) or set(sections) - {"runtime", "data_collection"}:
        raise _bad("sections holds only runtime and data_collection", "docs/manifest.md")
    if not isinstance(policy_doc, dict):
        raise _bad("policy is an object (the fields of `deploy create`'s policy, docs/control-plane.md)")
    try:
        policy = Policy.from_dict(policy_doc)
    except TypeError as exc:
        raise _bad(f"policy: {exc}") from None
    name, version = parse_ref(body["image"], "image")
    image = cp.registry.image(name, version)
    tags = parse_tags([f"{k}={v}" for k, v in query.items()], "tag query")
    # refresh=False: `serve` keeps the registry current; the API opens no broker connection per request
    dep_id = cp.create_deployment(image, devices, tags, policy, sections, refresh=False)
    return cp.summary(dep_id)


def command_deployment(cp: ControlPlane, rq: Request) -> Any:
    cmd = rq.params["command"]
    if cmd not in COMMANDS:
        raise _bad(f"unknown command {cmd!r}", f"use one of {', '.join(COMMANDS)}")
    # recorded only, as `--no-wait` does: `serve` carries it out at its next pass
    cp.command(rq.params["deployment_id"], cmd)
    return cp.summary(rq.params["deployment_id"])


def metrics(cp: ControlPlane, rq: Request) -> Any:
    """Latency and error rate per image over time: the stored heartbeats, in buckets of ``step``."""
    window = rq.number("window", 900.0, 10.0, 24 * 3600.0)
    step = rq.number("step", 15.0, 1.0, 3600.0)
    reg = cp.registry
    t = time.time()
    beats = reg.heartbeats([d["id"] for d in reg.devices()], t - window, t)
    buckets: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for b in beats:
        label = f"{b['model']}:{b['version']}"
        buckets.setdefault(label, {}).setdefault(int(b["ts"] // step), []).append(b)
    return {
        "window": window,
        "step": step,
        "now": t,
        "series": [
            {
                "image": label,
                "points": [{"t": k * step, **aggregate(rows)} for k, rows in sorted(by_t.items())],
            }
            for label, by_t in sorted(buckets.items())
        ],
    }


_TAG_Q = Param("tag", "KEY=VALUE; every one must match", repeat=True)
_OBJ = {"type": "object"}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/api/models",
        "listModels",
        "registered models, each with the images built from it",
        "registry",
        list_models,
        (Param("name", "model name"), Param("version", "model version"), _TAG_Q),
    ),
    Route("GET", "/api/models/{name}/{version}", "showModel", "one model version", "registry", show_model),
    Route(
        "GET",
        "/api/images",
        "listImages",
        "images, each with its deployments and the devices running it",
        "registry",
        list_images,
        (Param("name", "image name"), Param("model", "NAME[:VERSION]"), _TAG_Q),
    ),
    Route("GET", "/api/images/{name}/{version}", "showImage", "one image version", "registry", show_image),
    Route(
        "GET",
        "/api/devices",
        "listDevices",
        "the fleet, with recent p99 and error rate",
        "devices",
        list_devices,
        (_TAG_Q,),
    ),
    Route(
        "GET",
        "/api/devices/{device_id}",
        "showDevice",
        "a device, its status document and history",
        "devices",
        show_device,
    ),
    Route(
        "POST",
        "/api/devices/{device_id}/tags",
        "tagDevice",
        "set and remove a device's tags",
        "devices",
        tag_device,
        body={
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "set": {"type": "object", "additionalProperties": {"type": "string"}},
                "remove": {"type": "array", "items": {"type": "string"}},
            },
        },
    ),
    Route(
        "GET",
        "/api/deployments",
        "listDeployments",
        "deployments and their progress",
        "deployments",
        list_deployments,
        (
            Param("image", "NAME[:VERSION]"),
            Param("model", "NAME[:VERSION]"),
            Param("device", "device id"),
            Param("state", "deployment state"),
        ),
    ),
    Route(
        "POST",
        "/api/deployments",
        "createDeployment",
        "create a deployment; `serve` rolls it out",
        "deployments",
        create_deployment,
        body={
            "type": "object",
            "required": ["image"],
            "additionalProperties": False,
            "properties": {
                "image": {"type": "string"},
                "devices": {"type": "array", "items": {"type": "string"}},
                "tag_query": {"type": "object", "additionalProperties": {"type": "string"}},
                "policy": _OBJ,
                "sections": _OBJ,
            },
        },
    ),
    Route(
        "GET",
        "/api/deployments/{deployment_id}",
        "showDeployment",
        "a deployment, its devices and history",
        "deployments",
        show_deployment,
    ),
    Route(
        "POST",
        "/api/deployments/{deployment_id}/{command}",
        "commandDeployment",
        "pause, resume, abort or rollback (recorded; `serve` carries it out)",
        "deployments",
        command_deployment,
    ),
    Route(
        "GET",
        "/api/metrics",
        "metrics",
        "p99 and error rate per image over time",
        "devices",
        metrics,
        (Param("window", "seconds back (default 900)"), Param("step", "bucket seconds (default 15)")),
    ),
    Route(
        "GET",
        "/api/events",
        "events",
        "server-sent events: deployment and device changes",
        "events",
        None,
        produces="text/event-stream",
    ),
    Route("GET", "/api/openapi.json", "openapi", "this document", "meta", None),
)


def find(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route and its path parameters."""
    for r in ROUTES:
        params = r.match(path)
        if params is not None and r.method == method:
            return r, params
    return None


def path_exists(path: str) -> bool:
    return any(r.match(path) is not None for r in ROUTES)


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "hint": {"type": "string"},
            },
        }
    },
}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3 document, generated from ROUTES."""
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        params: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in r.path_params
        ]
        if "command" in r.path_params:
            params[-1]["schema"] = {"type": "string", "enum": list(COMMANDS)}
        for q in r.query:
            schema: dict[str, Any] = {"type": "string"}
            if q.repeat:
                schema = {"type": "array", "items": schema}
            params.append({"name": q.name, "in": "query", "description": q.description, "schema": schema})
        op: dict[str, Any] = {
            "operationId": r.op_id,
            "summary": r.summary,
            "tags": [r.tag],
            "parameters": params,
            "responses": {
                "200": {"description": "OK", "content": {r.produces: {"schema": {}}}},
                "default": {"description": "refused", "content": {"application/json": {"schema": _ERROR}}},
            },
        }
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": dict(r.body)}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "edge-deploy control plane", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
