"""Azure ML's inference server as its clients see it: request ids, error bodies, liveness, swagger.

The agent answers ``/``, ``/score`` and ``/swagger.json`` as azureml-inference-server-http 1.5.1
does (its ``server/routes.py`` and ``server/swagger.py``), so a client written against an Azure ML
endpoint works unchanged; tests/test_azureml_compat.py runs both side by side. This module is that
server's HTTP rules, free of ASGI: :mod:`agent.serving.api` routes, :mod:`agent.serving.scoring`
scores, the score.py worker (``worker_child.py``) calls run() as that server calls it.

- Request ids (``_init_headers``): ``x-request-id`` is taken or generated (uuid4);
  ``x-ms-client-request-id`` is taken; the deprecated ``x-ms-request-id`` is taken, or else is the
  client id, or else the request id. All are echoed; an id over 100 characters is 431.
- Errors are ``{"message": ...}``; the agent adds its stable ``code``. The messages are the
  server's where it has the same error.
- ``x-ms-server-version`` names the server that answered: ``edge-agent/<version>`` here.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__
from agent.serving.swagger_templates import SWAGGER2, SWAGGER3
from agent.serving.worker_protocol import HttpRequest
from edge_core.errors import (
    ResultUnsendable,
    ScoreFailed,
    ScoreRefused,
    ScoreTimeout,
    ScoringError,
    WorkerUnavailable,
)

SERVER_VERSION = f"edge-agent/{__version__}"
HEADER_LIMIT = 100

HEALTHY = b"Healthy"
TEXT_HTML = "text/html; charset=utf-8"
RUN_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."
INTERNAL_ERROR = "An unexpected internal error occurred. Check the logs for more info."
NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually please check your "
    "spelling and try again."
)
METHOD_NOT_ALLOWED = "The method is not allowed for the requested URL."
#: What run() is called with: anything else is refused by the routing (405), as by Flask's.
SCORE_METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})
#: The routes the server answers; HEAD and OPTIONS are Flask's automatic ones.
ROUTE_METHODS = {
    "/": frozenset({"GET", "HEAD", "OPTIONS"}),
    "/swagger.json": frozenset({"GET", "HEAD", "OPTIONS"}),
}
FAILED = "x-ms-run-function-failed"


# --- request ids ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestIds:
    """The ids a request is answered with (empty: not echoed), and Office's ``TraceId``."""

    request_id: str = ""
    client_request_id: str = ""
    legacy_client_request_id: str = ""
    trace_id: str | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``populate_response_headers``: the server's version, the ids, ``TraceId``."""
        out = [(b"x-ms-server-version", SERVER_VERSION.encode())]
        for name, value in (
            (b"x-request-id", self.request_id),
            (b"x-ms-request-id", self.legacy_client_request_id),
            (b"x-ms-client-request-id", self.client_request_id),
        ):
            if value:
                out.append((name, value.encode("latin-1")))
        if self.trace_id is not None:
            out.append((b"TraceId", self.trace_id.encode("latin-1")))
        return out


class IdTooLong(Exception):
    """An id header is over :data:`HEADER_LIMIT` characters: 431, with the ids accepted so far."""

    def __init__(self, message: str, ids: RequestIds) -> None:
        super().__init__(message)
        self.message = message
        self.ids = ids


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A request header as WSGI (and so Azure ML's server) sees it: repeated ones joined by ``,``."""
    values = [v.decode("latin-1") for k, v in headers if k == name]
    return ",".join(values) if values else None


def request_ids(headers: Iterable[tuple[bytes, bytes]]) -> RequestIds:
    """Azure ML's ``_init_headers``; raises :class:`IdTooLong`."""
    headers = list(headers)
    trace = header(headers, b"traceid")
    request_id = header(headers, b"x-request-id")
    if request_id is None:
        request_id = str(uuid.uuid4())
    if len(request_id) > HEADER_LIMIT:
        raise IdTooLong(f"x-request-id must not exceed {HEADER_LIMIT} characters", RequestIds(trace_id=trace))
    legacy = header(headers, b"x-ms-request-id") or ""
    client = header(headers, b"x-ms-client-request-id") or ""
    if legacy:
        client = client or legacy
    else:
        legacy = client or request_id
    if len(legacy) > HEADER_LIMIT or len(client) > HEADER_LIMIT:
        raise IdTooLong(
            f"x-ms-request-id and x-ms-client-request-id must not exceed {HEADER_LIMIT} characters",
            RequestIds(request_id, trace_id=trace),
        )
    return RequestIds(request_id, client, legacy, trace)


# --- requests and answers ------------------------------------------------------------------------


def http_request(scope: Mapping[str, Any], body: bytes) -> HttpRequest:
    """The request a score.py worker gets, from an ASGI scope."""
    client = scope.get("client")
    server = scope.get("server")
    return HttpRequest(
        method=str(scope["method"]),
        path=str(scope["path"]),
        query=bytes(scope.get("query_string") or b"").decode("latin-1"),
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
        body=body,
        scheme=str(scope.get("scheme") or "http"),
        client=str(client[0]) if client else None,
        server=(str(server[0]), server[1]) if server else None,
    )


def query_input(query: str) -> dict[str, Any]:
    """A GET's query parameters as Azure ML hands them to run() (``_parse_get_parameters``): each
    value parsed as JSON where it is JSON, else kept as text; a repeated parameter is a list. The
    worker has its own copy (it imports nothing of the agent)."""
    lists: dict[str, list[str]] = {}
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        lists.setdefault(k, []).append(v)
    return {
        k: _json_or_text(v[0]) if len(v) == 1 else [_json_or_text(x) for x in v] for k, v in lists.items()
    }


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of the Azure ML routes. ``detail`` says what went wrong where ``body`` cannot
    (the user's exception: Azure ML's message only says to look at the log); it is never sent."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    detail: str = ""

    @property
    def content_type(self) -> str:
        return next((v for k, v in self.headers if k.lower() == "content-type"), "application/json")


def error(status: int, message: str, code: str, *, run_failed: bool = False, detail: str = "") -> Answer:
    """Azure ML's ``ErrorResponse``: ``{"message"}`` (with the agent's ``code``) and
    ``x-ms-run-function-failed``."""
    body = json.dumps({"message": message, "code": code}).encode()
    headers = (("Content-Type", "application/json"), (FAILED, str(run_failed)))
    return Answer(status, body, headers, detail)


def scoring_error(exc: ScoringError, timeout_s: float) -> Answer:
    """What a failed score.py request answers. run() raising and a result that cannot be sent get
    Azure ML's words (the exception is in the agent's log); a timeout gets its words and the
    agent's 504 (the worker was killed: a retry goes to a fresh one); a dead or busy worker is the
    agent's own 503."""
    code = str(exc.code)
    if isinstance(exc, ScoreRefused):
        return error(exc.http_status, exc.message, code)
    if isinstance(exc, ResultUnsendable):
        return error(500, INTERNAL_ERROR, code, detail=exc.message)
    if isinstance(exc, ScoreTimeout):
        message = f"Scoring timeout after {round(timeout_s * 1000)} ms"
        return error(exc.http_status, message, code, run_failed=True, detail=exc.message)
    if isinstance(exc, ScoreFailed) and exc.traceback is not None:
        return error(500, RUN_FAILED, code, run_failed=True, detail=exc.message)
    return error(
        exc.http_status, exc.message, code, run_failed=isinstance(exc, WorkerUnavailable | ScoreFailed)
    )


# --- swagger.json --------------------------------------------------------------------------------

#: Azure ML's swagger builders: the version, the aliases it answers to, the user's file that
#: replaces the generated document, its template.
_BUILDERS: tuple[tuple[str, frozenset[str], tuple[str, ...], dict[str, Any]], ...] = (
    ("2", frozenset({"2", "2.0"}), ("swagger.json", "swagger2.json"), SWAGGER2),
    ("3", frozenset({"3", "3.0"}), ("swagger3.json",), SWAGGER3),
    ("3.1", frozenset({"3.1"}), ("swagger3.1.json",), SWAGGER3),
)
#: What run() is described as when it is not decorated (or there is no score.py).
_ANY_OBJECT = {"type": "object", "example": {}}


def swagger(
    version: str | None, info: Mapping[str, Any] | None, image_dir: Path, title: str, service_version: str
) -> tuple[int, bytes]:
    """``GET /swagger.json?version=...`` (default 2): the user's ``swagger*.json`` in the image if
    there is one, else Azure ML's template with the schemas of run()'s inference_schema decorators
    (``info`` from the worker: ``versions``, ``input``, ``output``; None: not decorated). 404 for a
    version that is not valid, or one the decorators' types cannot be described in."""
    version = "2" if version is None else version
    docs: dict[str, dict[str, Any]] = {}
    supported: list[str] = []
    for name, aliases, files, template in _BUILDERS:
        doc = _user_swagger(image_dir, files) or _generate(
            name, aliases, template, info, title, service_version
        )
        if doc is not None:
            supported.append(name)
            for alias in aliases:
                docs[alias] = doc
    supported.sort()
    valid = {a for _, aliases, _, _ in _BUILDERS for a in aliases}
    if version not in valid:
        message = f"Swagger version [{version}] is not valid. Supported versions: [{', '.join(supported)}]."
        return 404, error(404, message, "not_found").body
    if version not in docs:
        message = (
            f"Swagger version [{version}] is not supported for the scoring script. "
            f"Supported swagger versions: [{', '.join(supported)}]."
        )
        return 404, error(404, message, "not_found").body
    return 200, json.dumps(docs[version]).encode()


def _user_swagger(image_dir: Path, files: tuple[str, ...]) -> dict[str, Any] | None:
    for name in files:
        try:
            doc = json.loads((image_dir / name).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            return doc
    return None


def _generate(
    name: str,
    aliases: frozenset[str],
    template: dict[str, Any],
    info: Mapping[str, Any] | None,
    title: str,
    service_version: str,
) -> dict[str, Any] | None:
    versions = (info or {}).get("versions") or ["2.0", "3.0", "3.1"]
    if not aliases & set(versions):
        return None
    input_schema = (info or {}).get("input") or _ANY_OBJECT
    output_schema = (info or {}).get("output") or _ANY_OBJECT
    text = json.dumps(template)
    for key, value in (
        ("$SERVICE_NAME$", title),
        ("$SERVICE_VERSION$", service_version),
        ("$PATH_PREFIX$", ""),
    ):
        text = text.replace(key, json.dumps(value)[1:-1])
    doc: dict[str, Any] = json.loads(text)
    if name == "2":
        doc["definitions"]["ServiceInput"] = input_schema
        doc["definitions"]["ServiceOutput"] = output_schema
    else:
        doc["components"]["schemas"]["ServiceInput"] = input_schema
        doc["components"]["schemas"]["ServiceOutput"] = output_schema
        if name == "3.1":
            doc["openapi"] = "3.1.0"
    return doc
