"""The bridge between Azure ML's data-collection SDKs, as score.py imports them, and the edge agent.

On Azure ML, ``azureml.ai.monitoring.Collector`` (and the legacy ``azureml.monitoring.ModelDataCollector``)
send what a scoring script collects to a side-car that writes it to blob storage. On the edge the
shim packages beside this module stand in for them (``worker_child.py`` puts
``agent/serving/collector_shim`` on the worker's ``sys.path`` right after the image's own root, so
an image can still ship its own copy), and every record they make lands here. ``azureml`` stays a
namespace package (no ``__init__.py``), so other ``azureml.*`` packages the image installs still
import beside it. The worker hands the records of one request to the agent
with its answer (``drain()``), and the agent puts them into its telemetry buffer, which uploads
them in Azure ML's blob layouts (``agent/telemetry/collections.py``).

Standard library only: the worker may run under the image's own virtual environment. pandas and
numpy are never imported here; a DataFrame or an array is recognised by the module its type comes
from, which the script has already imported (``sys.modules``).

What the deployment enabled comes from the environment (``EDGE_DATA_COLLECTION``, set by the agent
when it starts the worker): a collection that is not enabled, or a request that is not sampled,
costs a dictionary lookup and a hash, and nothing is serialised.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
import uuid
from typing import Any

#: Set by the agent for the worker: ``{"collections": {name: sampling rate}, "model_data_collector": bool}``.
CONFIG_ENV = "EDGE_DATA_COLLECTION"
#: What the legacy SDK writes in ``$aml_request_id`` outside a request; the agent replaces it with
#: the request's id, which the worker does not know until the new frame protocol carries headers.
NO_REQUEST_ID = "00000000-0000-0000-0000-000000000000"

_lock = threading.Lock()
_pending: list[dict[str, Any]] = []
_headers: dict[str, str] = {}
_context: Any = None  # the current request's BasicCorrelationContext, made on first use
_config: dict[str, Any] | None = None


def config() -> dict[str, Any]:
    """The deployment's collection settings, read once (they are fixed for a worker's life)."""
    global _config
    if _config is None:
        try:
            doc = json.loads(os.environ.get(CONFIG_ENV) or "{}")
        except ValueError:
            doc = {}
        _config = doc if isinstance(doc, dict) else {}
    return _config


def rate(collection: str) -> float | None:
    """The collection's sampling rate, or None when the deployment does not collect it."""
    value = (config().get("collections") or {}).get(collection)
    return float(value) if isinstance(value, int | float) else None


def model_data_collector_enabled() -> bool:
    return bool(config().get("model_data_collector"))


def deployment_default(key: str, given: str) -> str:
    """What the legacy SDK uses for an argument left at ``"default"``: the deployment's value
    (``workspace``, ``webservice``, ``model_version``), as Azure ML fills them in for a service."""
    value = config().get(key)
    return str(value) if given in ("default", "default/default/default") and value else given


def sampled(sampling_rate: float, key: str) -> bool:
    """Whether the request that ``key`` (its correlation id) names is in the sample.

    A function of the id, not a random draw: every collection of one request (inputs, outputs, and
    the agent's request/response payloads, which use the same function on the same id) is kept or
    dropped together, and a collection with a lower rate keeps a subset of one with a higher rate.
    The agent's copy is ``agent/telemetry/collections.py: sampled``; the two must agree.
    """
    if sampling_rate >= 1.0:
        return True
    if sampling_rate <= 0.0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < sampling_rate


# --- one request ----------------------------------------------------------------------------------


def begin(headers: dict[str, str] | None = None) -> None:
    """A request starts: forget what the last one left, remember this one's headers."""
    global _context
    with _lock:
        _pending.clear()
        _headers.clear()
        _headers.update({k.lower(): v for k, v in (headers or {}).items()})
        _context = None


def drain() -> list[dict[str, Any]]:
    """The records collected since ``begin()``, handed over once."""
    with _lock:
        out = _pending[:]
        _pending.clear()
    return out


def request_header(name: str) -> str | None:
    return _headers.get(name.lower())


def request_context(factory: Any) -> Any:
    """The context of the request being served: one per request, so ``collect()`` calls without an
    explicit context correlate with each other. Its id is the request's ``x-request-id`` when the
    worker knows it (Azure ML's correlation id is the request id), else a new UUID."""
    global _context
    with _lock:
        if _context is None:
            rid = _headers.get("x-request-id")
            _context = factory(rid or None, None, dict(_headers))
        return _context


def is_pending(context: Any) -> bool:
    """Whether ``context`` is the request's own and its id is not the request id yet (the worker was
    not told the request's ``x-request-id``): the agent then sets the id, and samples on it."""
    return context is _context and "x-request-id" not in _headers


def emit(record: dict[str, Any]) -> None:
    with _lock:
        _pending.append(record)


# --- data -----------------------------------------------------------------------------------------


def type_name(data: Any) -> str:
    """``pandas.core.frame.DataFrame``, ``builtins.list``...: Azure ML's ``collectdatatype``. A
    DataFrame gets the name Azure ML writes, whatever module pandas defines it in today."""
    if is_dataframe(data):
        return "pandas.core.frame.DataFrame"
    t = type(data)
    return f"{t.__module__}.{t.__qualname__}"


def is_dataframe(data: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(data, pd.DataFrame)


def is_ndarray(data: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(data, np.ndarray)


def _builtin(obj: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays (and anything else with tolist/item)."""
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"cannot collect a {type(obj).__name__}: not JSON serializable")


def _finite(obj: Any) -> Any:
    """NaN and infinities are not JSON: null, as pandas writes them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(data: Any) -> str:
    """The data as JSON text: a DataFrame as its rows (``orient="records"``, Azure ML's layout), an
    array as nested lists, anything else as JSON. Raises TypeError/ValueError for what cannot be."""
    if is_dataframe(data):
        return str(data.to_json(orient="records", date_format="iso"))
    if is_ndarray(data):
        data = data.tolist()
    try:
        return json.dumps(data, default=_builtin, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or infinity somewhere: convert once, only when needed
        plain = json.loads(json.dumps(data, default=_builtin))
        return json.dumps(_finite(plain), allow_nan=False, separators=(",", ":"))


def now() -> float:
    return time.time()


def new_id() -> str:
    return str(uuid.uuid4())
