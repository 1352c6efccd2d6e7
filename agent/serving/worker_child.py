"""A score.py worker: runs one image's Azure ML scoring script in a process of its own.

Started by the pool in ``agent/serving/worker.py`` as
``<python> /abs/path/agent/serving/worker_child.py <image_dir> <entry_script>``, possibly under the
image's own virtual environment (``agent/serving/pyenv.py``), whose interpreter need not see the
``agent`` package: so this file imports nothing but the standard library, and keeps its own side of
the protocol instead of sharing ``agent/serving/worker_protocol.py``.

What the scoring script sees is what Azure ML's inference server (azureml-inference-server-http
1.5.1) gives it: ``AZUREML_MODEL_DIR`` names the image's ``models/`` directory, the working directory
is the image, the image's root is first on ``sys.path``, the script is imported as module
``entry_module``, ``init()`` is called once, then run() once per request, called the way that server
calls it (see :class:`Script`: plain, inference_schema-decorated or ``@rawhttp``), with its answer
made into a response the way that server makes it (:func:`encode`). ``azureml.contrib.services``
(``rawhttp``, ``AMLRequest``, ``AMLResponse``) comes from ``azureml_shim/`` next to this file, last on
``sys.path``: an image that ships the real packages gets those.

Protocol, on the process's original stdin and stdout (fd 0 and 1 are then pointed at /dev/null
and stderr, so nothing the user's code prints or reads can interleave with it). Every message is
a frame: a 4-byte big-endian length, then that many bytes, made of a JSON header (one line: JSON
escapes newlines), ``\\n``, then a body of raw bytes.

- parent -> child, one frame per request: ``{"method", "path", "query", "headers": [[name, value],
  ...], "scheme", "client", "server": [host, port]}`` + the request body. ``query`` is the raw
  query string; header names are lower case, as HTTP/1.1 parsers give them.
- child -> parent: the first frame is ``{"ok": true, "ready": true, "mode": "plain" | "schema" |
  "rawhttp", "swagger": {"versions", "input", "output"}, ...}`` once ``init()`` returned, or
  ``{"ok": false, "error": "Type: message", "traceback": "..."}`` if the import or ``init()``
  failed (the process then exits). Then one frame per request: ``{"ok": true, "status": 200,
  "headers": [[name, value], ...]}`` + the response body (``Content-Type`` is among the headers),
  or ``{"ok": false, "kind", "error", ...}`` with an empty body, where ``kind`` is ``input``
  (the request cannot be run()'s arguments; ``status`` 400, 405 or 415 with Azure ML's message as
  ``error``), ``user`` (run() raised; ``traceback``) or ``internal`` (what run() returned cannot
  be sent, or the body fails where Azure ML's server fails too).
- The parent ignores header keys it does not know, so either side can add some: a response header
  may carry ``"collected": [...]``, what the script's Azure ML data collectors (``collector_shim/``)
  collected during that request.

The body travels as raw bytes after the header rather than as a JSON string inside it: no second
round of escaping for large requests or results, and bytes in and out (images, ``AMLResponse``
with a binary body) need no encoding.

End of stdin means the parent is stopping this worker (or is gone): the worker returns and exits.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib.util
import inspect
import json
import os
import signal
import struct
import sys
import threading
import time
import traceback
import types
import urllib.parse
from collections.abc import Callable
from typing import Any

#: Set by the parent to its pid, so the child can tell it was orphaned before it could arrange to die.
PARENT_PID_ENV = "EDGE_WORKER_PARENT_PID"
#: Azure ML's module name for the entry script (``user_script.py: load_script``).
MODULE_NAME = "entry_module"
#: ``azureml.contrib.services`` for scripts that use ``@rawhttp`` (standard library only).
SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "azureml_shim")
#: Azure ML's data-collection SDKs (``azureml.ai.monitoring``, ``azureml.monitoring``), standing in
#: for the Azure packages: put on sys.path right after the image's root (see main()).
COLLECTOR_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collector_shim")
_COLLECT_BRIDGE = "azureml._edge_collect"
TRACEBACK_CHARS = 8000

_LEN = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


class Channel:
    """Framed messages over two private file descriptors."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd

    @classmethod
    def take_over_stdio(cls) -> Channel:
        """Keep the pipes to the parent on private fds and point fd 0/1 elsewhere.

        Done at the fd level, not just ``sys.stdout``: native code (onnxruntime's logger, a C
        library's printf) and subprocesses of the user's code write to fd 1 directly. ``os.dup``
        returns non-inheritable fds, so the user's subprocesses do not hold the pipes open either.
        """
        rfd = os.dup(0)
        wfd = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)
        if sys.stdout is not None:
            # Now a pipe to the parent's log reader: line-buffered, so print() shows up in order.
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        return cls(rfd, wfd)

    def _read_exact(self, n: int) -> bytes | None:
        chunks = []
        while n:
            chunk = os.read(self.rfd, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read(self) -> bytes | None:
        """The next request, or None at end of input."""
        head = self._read_exact(_LEN.size)
        if head is None:
            return None
        (n,) = _LEN.unpack(head)
        return self._read_exact(n) if n else b""

    def write(self, header: dict[str, Any], body: bytes = b"") -> None:
        head = _HEADER_JSON.encode(header).encode()
        payload = b"".join((_LEN.pack(len(head) + 1 + len(body)), head, b"\n", body))
        view = memoryview(payload)
        while view:
            view = view[os.write(self.wfd, view) :]


def die_with_parent() -> None:
    """Make sure this worker does not outlive the agent, even one killed with SIGKILL.

    PR_SET_PDEATHSIG makes the kernel send SIGKILL when the parent goes; it is set here rather than
    in a ``preexec_fn`` because that is unsafe in a multi-threaded parent. Should the parent have
    died before the prctl, we are already orphaned: the ppid check catches that. A watcher thread
    covers kernels or platforms without prctl (the main thread may be stuck in user code).
    """
    expected = int(os.environ.pop(PARENT_PID_ENV, "") or os.getppid())
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != expected:
        os._exit(70)

    def watch() -> None:
        while os.getppid() == expected:
            time.sleep(1.0)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a user exception whose __str__ raises must not take the worker down
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_ours(filename: str) -> bool:
    return filename == __file__ or filename.startswith("<frozen importlib")


def traceback_text(exc: BaseException) -> str:
    """The traceback from the user's first frame on: this file's frames are noise to them."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))[-TRACEBACK_CHARS:]


# --- the scoring script ------------------------------------------------------------------------


class UserScriptError(Exception):
    """The script cannot be served as it is written (Azure ML refuses it at start too)."""


class InputError(Exception):
    """The request cannot be turned into run()'s arguments: answered with ``status`` (400, 405, 415)
    and Azure ML's message for it, without calling run()."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Script:
    """The entry script's run(), and how Azure ML's server calls it (``server/user_script.py``):

    - ``rawhttp``: run() was decorated with ``@rawhttp``: its first parameter gets the request
      object (:class:`AMLRequest`), whatever the method;
    - ``schema``: run() carries inference_schema's ``@input_schema``: every parameter (but
      ``request_headers``) is looked up by name in the JSON body of a POST (content type JSON
      only) or the query string of a GET, falling back to its default; inference_schema's wrapper
      then converts and checks the values (its ValueError is run() raising, a 500, as on Azure ML);
    - ``plain``: the first parameter gets the body as text (a GET: its query parameters as a JSON
      object's text).

    A parameter named ``request_headers`` gets the request's headers as a dict. Azure ML refuses to
    start a run() with positional-only parameters, ``*args`` or ``**kwargs``; this worker calls
    those positionally instead (the agent's behaviour before it matched Azure ML's server).
    """

    def __init__(self, run: Callable[..., Any]) -> None:
        self.run = run
        self.mode = "plain"
        self.swagger: dict[str, Any] | None = None
        self.params: list[inspect.Parameter] = []
        self.wants_headers = False
        self.positional = False
        try:
            params = list(inspect.signature(run).parameters.values())
        except (TypeError, ValueError):  # a builtin or C callable: no signature to look at
            self.positional = True
            return
        self.wants_headers = any(p.name == "request_headers" for p in params)
        params = [p for p in params if p.name != "request_headers"]
        self.params = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not params:
            raise UserScriptError("run() needs to accept an argument for input data.")
        if params[0].kind in (params[0].POSITIONAL_ONLY, params[0].VAR_POSITIONAL) or not self.params:
            self.positional = True
        raw = _raw_http_requested()
        decorated = _schema_util() is not None and bool(_schema_util().is_schema_decorated(run))
        if raw and decorated:
            raise UserScriptError("run() cannot be decorated with both @rawhttp and @input_schema")
        self.mode = "rawhttp" if raw else "schema" if decorated else "plain"

    @property
    def first(self) -> str:
        return self.params[0].name if self.params else ""

    def arguments(self, req: Request) -> dict[str, Any]:
        """run()'s arguments for ``req`` (Azure ML's ``input_parsers.py``); raises InputError."""
        if self.mode == "rawhttp":
            return {self.first: req.aml_request()}
        if req.method == "GET":
            query = _parse_get_parameters(req.query)
            if self.mode == "plain":
                return {self.first: json.dumps(query)}
            return self._extract(query)
        if req.method != "POST":
            if req.method == "OPTIONS":  # answered without run() (CORS preflights)
                raise InputError(200, "")
            raise InputError(405, "Method not allowed")
        if self.mode == "plain":
            try:
                return {self.first: str(req.body, "utf-8")}
            except UnicodeDecodeError as exc:
                raise InputError(400, f"Input cannot be decoded as UTF-8: {exc}") from None
        if not req.is_json():
            raise InputError(415, "Expects Content-Type to be application/json")
        try:
            doc = json.loads(req.body)
        except json.JSONDecodeError as exc:
            if req.body:
                raise InputError(400, f"POST body could not be decoded as JSON: {exc}") from None
            raise InputError(400, "POST body is empty. Expecting a JSON dictionary.") from None
        if not isinstance(doc, dict):
            raise InputError(400, "POST body should be a JSON dictionary.")
        return self._extract(doc)

    def _extract(self, doc: dict[str, Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for p in self.params:
            value = doc.get(p.name, p.default)
            if value is inspect.Parameter.empty:
                raise InputError(400, f"A value is not provided for the {p.name!r} parameter.")
            args[p.name] = value
        return args

    def call(self, args: dict[str, Any], headers: dict[str, str]) -> Any:
        if self.positional:
            extra = {"request_headers": headers} if self.wants_headers else {}
            return self.run(*args.values(), **extra)
        if self.wants_headers:
            return self.run(**args, request_headers=headers)
        return self.run(**args)


def _schema_util() -> Any:
    """inference_schema's schema_util if the script imported it (no decorator without it): not
    imported otherwise, so a script that does not use it does not pay for it."""
    return sys.modules.get("inference_schema.schema_util")


def _raw_http_requested() -> bool:
    """Whether ``@rawhttp`` ran: the flag of whichever ``aml_request`` module the script imported
    (ours, an image's own azureml-contrib-services, or azureml-inference-server-http's)."""
    names = ("azureml.contrib.services.aml_request", "azureml_inference_server_http.api.aml_request")
    return any(getattr(sys.modules.get(n), "_rawHttpRequested", False) for n in names)


def swagger_info(run: Callable[..., Any]) -> dict[str, Any]:
    """What the parent needs to build /swagger.json the way Azure ML does (``server/swagger.py``):
    the versions inference_schema supports for run() and its input and output schemas (None when
    run() is not decorated: the parent uses Azure ML's empty-object schemas)."""
    util = _schema_util()
    if util is None:
        return {"versions": ["2.0", "3.0", "3.1"], "input": None, "output": None}
    info: dict[str, Any] = {"versions": list(util.get_supported_versions(run)), "input": None, "output": None}
    if util.is_schema_decorated(run):
        info["input"] = util.get_input_schema(run)
        info["output"] = util.get_output_schema(run)
    return info


def load(image_dir: str, entry_script: str) -> tuple[Script, Callable[[], Any] | None]:
    """Import the entry script the way Azure ML does; return its run() and init()."""
    path = os.path.join(image_dir, entry_script)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {entry_script}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    run = getattr(module, "run", None)
    # Some Azure SDKs generate a driver module that forwards to the real script: Azure ML calls
    # the real script's run() (so its inference_schema decorators are seen), and the driver's init().
    driver = getattr(module, "driver_module", None)
    if isinstance(driver, types.ModuleType) and callable(getattr(driver, "run", None)):
        run = driver.run
    if not callable(run):
        raise AttributeError(f"{entry_script} does not define a run() function")
    init = getattr(module, "init", None)
    return Script(run), init if callable(init) else None


# --- requests and responses -------------------------------------------------------------------


def _parse_get_parameters(query: str) -> dict[str, Any]:
    """Query parameters as run()'s input (Azure ML's ``_parse_get_parameters``): each value parsed
    as JSON where it is JSON, else kept as text; a repeated parameter becomes a list."""
    lists: dict[str, list[str]] = {}
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        lists.setdefault(k, []).append(v)
    return {
        k: _parse_input(vs[0]) if len(vs) == 1 else [_parse_input(v) for v in vs] for k, vs in lists.items()
    }


def _parse_input(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


_shim: types.ModuleType | None = None


def shim_request_module() -> types.ModuleType:
    """Our ``aml_request`` (the request object and the header rules), loaded from its file under
    a private name: the public name may belong to an image's own azureml-contrib-services."""
    global _shim
    public = sys.modules.get("azureml.contrib.services.aml_request")
    if public is not None and getattr(public, "EDGE_SHIM", False):
        return public
    if _shim is None:
        path = os.path.join(SHIM_DIR, "azureml", "contrib", "services", "aml_request.py")
        spec = importlib.util.spec_from_file_location("_edge_aml_request", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _shim = module
    return _shim


class Request:
    """One request from the parent: the frame's header (method, path, query, headers...) and body."""

    def __init__(self, meta: dict[str, Any], body: bytes) -> None:
        self.meta = meta
        self.method = str(meta.get("method", "POST"))
        self.query = str(meta.get("query", ""))
        self.body = body
        self._request: Any = None

    def aml_request(self) -> Any:
        if self._request is None:
            self._request = shim_request_module().AMLRequest(self.meta, self.body)
        return self._request

    def headers(self) -> dict[str, str]:
        """``dict(request.headers)`` as Azure ML passes it as ``request_headers``."""
        return dict(self.aml_request().headers)

    def is_json(self) -> bool:
        return bool(self.aml_request().is_json)


def _to_builtin(obj: Any) -> Any:
    """``json.dumps`` default for what scoring scripts commonly return: numpy arrays and scalars
    (and anything else with ``tolist``/``item``, e.g. torch tensors). Azure ML itself answers 500
    for these; converting them only makes scripts work that would fail there."""
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_FAILED = "x-ms-run-function-failed"
# Made once: json.dumps with arguments builds an encoder per call, a measurable share of a request.
#: run()'s result: json.dumps' defaults (so bytes for bytes what Azure ML sends), numpy converted.
_RESULT_JSON = json.JSONEncoder(default=_to_builtin)
#: frame headers: ASCII, so one line whatever the user's strings contain
_HEADER_JSON = json.JSONEncoder(ensure_ascii=True, default=_to_builtin)


def encode(result: Any, run_ms: float) -> tuple[dict[str, Any], bytes]:
    """run()'s return value as Azure ML's ``handle_score`` sends it: an HTTP response object
    (``AMLResponse``, ``flask.Response``) as it is, with ``x-ms-run-function-failed: True`` if its
    status is 5xx; anything else through ``json.dumps`` (a str included: a script returning
    ``json.dumps(x)`` answers a JSON *string*, exactly as on Azure ML; None is ``{}``). Both get
    ``x-ms-run-fn-exec-ms``. Raises what ``json.dumps`` raises for what it cannot encode."""
    status = getattr(result, "status_code", None)
    get_data = getattr(result, "get_data", None)
    if isinstance(status, int) and callable(get_data):
        items = getattr(getattr(result, "headers", None), "items", None)
        headers = [[str(k), str(v)] for k, v in (items() if callable(items) else ())]
        data = get_data()
        body = data.encode() if isinstance(data, str) else bytes(data)
        if status >= 500:
            if any(k.lower() == _FAILED for k, _ in headers):
                headers = [[k, "True" if k.lower() == _FAILED else v] for k, v in headers]
            else:
                headers.append([_FAILED, "True"])
    else:
        body = ("{}" if result is None else _RESULT_JSON.encode(result)).encode()
        status = 200
        headers = [["Content-Type", "application/json"], [_FAILED, "False"]]
    headers.append(["x-ms-run-fn-exec-ms", f"{run_ms:.3f}"])
    return {"ok": True, "status": status, "headers": headers}, body


def collection_begin(req: Request) -> None:
    """A request starts: the data collectors forget the last one and learn this one's headers (the
    request id they correlate with). Free until a script imports one."""
    bridge = sys.modules.get(_COLLECT_BRIDGE)
    if bridge is not None:
        pairs = req.meta.get("headers")
        bridge.begin({str(k): str(v) for k, v in pairs} if isinstance(pairs, list) else {})


def with_collected(header: dict[str, Any]) -> dict[str, Any]:
    """The response header, with what the request's data collectors collected (``"collected"``)."""
    bridge = sys.modules.get(_COLLECT_BRIDGE)
    if bridge is not None and (records := bridge.drain()):
        header["collected"] = records
    return header


def _failure(kind: str, exc: BaseException) -> tuple[dict[str, Any], bytes]:
    return {"ok": False, "kind": kind, "error": describe(exc), "traceback": traceback_text(exc)}, b""


#: OPTIONS on a run() that is not @rawhttp: Azure ML answers ``AMLResponse("", 200)`` without run().
_OPTIONS = {
    "ok": True,
    "status": 200,
    "headers": [["Content-Type", "text/html; charset=utf-8"], [_FAILED, "False"]],
}


def handle(script: Script, req: Request) -> tuple[dict[str, Any], bytes]:
    """One request, as Azure ML's ``handle_score``: the frame to answer with."""
    try:
        args = script.arguments(req)
        headers = req.headers() if script.wants_headers else {}
    except InputError as exc:
        if exc.status == 200:
            return _OPTIONS, b""
        return {"ok": False, "kind": "input", "status": exc.status, "error": exc.message}, b""
    except Exception as exc:  # a body Azure ML fails on too (JSON that is not UTF-8): its 500
        return _failure("internal", exc)
    t0 = time.perf_counter()
    try:
        result = script.call(args, headers)
    except Exception as exc:  # BaseException (SystemExit...) ends the worker: the parent restarts it
        return _failure("user", exc)
    run_ms = (time.perf_counter() - t0) * 1000
    try:
        return encode(result, run_ms)
    except Exception as exc:  # what run() returned cannot be sent: Azure ML's 500 "internal error"
        return _failure("internal", exc)


def serve(chan: Channel, script: Script) -> int:
    while True:
        frame = chan.read()
        if frame is None:
            return 0
        nl = frame.find(b"\n")
        try:
            meta = json.loads(frame[:nl].decode()) if nl >= 0 else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            chan.write({"ok": False, "kind": "internal", "error": "request frame without a JSON header"})
            continue
        req = Request(meta, frame[nl + 1 :])
        collection_begin(req)
        header, body = handle(script, req)
        chan.write(with_collected(header), body)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} IMAGE_DIR ENTRY_SCRIPT", file=sys.stderr)
        return 2
    image_dir = os.path.abspath(argv[1])
    entry_script = argv[2]
    chan = Channel.take_over_stdio()
    # A segfault in native code (onnxruntime, a wheel) leaves a Python traceback on stderr, which
    # the parent logs and quotes when it reports the crash.
    faulthandler.enable()
    die_with_parent()
    # Running a script puts its own directory (agent/) first on sys.path, which would let the
    # user's `import log` or `import config` find the agent's modules; the image's root takes it.
    # The collector shim comes next: before site-packages, because the Azure packages themselves
    # cannot work here (they write through Azure ML's collection side-car).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [image_dir] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    # Last: whatever the image ships (its wheels are in its interpreter's site-packages) comes first.
    sys.path.append(SHIM_DIR)
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path[:] = [image_dir, COLLECTOR_SHIM, *rest]
    # The image directory is content-addressed and may be read-only: no __pycache__ inside it.
    sys.dont_write_bytecode = True
    os.environ["AZUREML_MODEL_DIR"] = os.path.join(image_dir, "models")
    t0 = time.monotonic()
    try:
        os.chdir(image_dir)
        script, init = load(image_dir, entry_script)
        if init is not None:
            init()
        swagger = swagger_info(script.run)
    except BaseException as exc:  # SystemExit in the script's top level is an init failure too
        chan.write({"ok": False, "error": describe(exc), "traceback": traceback_text(exc)})
        return 1
    ready = {
        "ok": True,
        "ready": True,
        "pid": os.getpid(),
        "python": sys.executable,
        "init_ms": round((time.monotonic() - t0) * 1000, 1),
        "mode": script.mode,
        "swagger": swagger,
    }
    try:
        json.dumps(swagger, default=_to_builtin)
    except (TypeError, ValueError) as exc:  # a schema that cannot be sent: served without its swagger
        print(f"swagger.json is not available: {describe(exc)}", file=sys.stderr)
        ready["swagger"] = None
    chan.write(ready)
    return serve(chan, script)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
