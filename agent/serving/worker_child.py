"""A score.py worker: runs one image's Azure ML scoring script in a process of its own.

Started by the pool in ``agent/serving/worker.py`` as
``<python> /abs/path/agent/serving/worker_child.py <image_dir> <entry_script>``, possibly under the
image's own virtual environment (``agent/serving/pyenv.py``), whose interpreter need not see the
``agent`` package: so this file imports nothing but the standard library, and keeps its own side of
the protocol instead of sharing ``agent/serving/worker_protocol.py``.

What the scoring script sees is what Azure ML's inference server (azureml-inference-server-http)
gives it: ``AZUREML_MODEL_DIR`` names the image's ``models/`` directory, the working directory is the
image, the image's root is first on ``sys.path``, the script is imported as module ``entry_module``,
``init()`` is called once, then ``run(raw_data)`` once per request with the request body decoded
as UTF-8 text.

Protocol, on the process's original stdin and stdout (fd 0 and 1 are then pointed at /dev/null
and stderr, so nothing the user's code prints or reads can interleave with it). Every message is
a frame: a 4-byte big-endian length, then that many bytes.

- parent -> child: the raw request body.
- child -> parent: a JSON header (one line: JSON escapes newlines), ``\\n``, then the response body.
  The first frame is ``{"ok": true, "ready": true, ...}`` once ``init()`` returned, or
  ``{"ok": false, "error": "Type: message", "traceback": "..."}`` if the import or ``init()``
  failed (the process then exits). Then one frame per request: ``{"ok": true, "status": 200,
  "content_type": "application/json"}`` + the body, or ``{"ok": false, "kind": "user" | "bad_input",
  "error": ..., "traceback": ...}`` with an empty body. Either header may carry ``"collected": [...]``:
  what the script's Azure ML data collectors (``collector_shim/``) collected during that request.

The body travels as raw bytes after the header rather than as a JSON string inside it: no second
round of escaping for large results, and a script that returns a raw ``AMLResponse`` can send bytes.

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
from collections.abc import Callable
from typing import Any

#: Set by the parent to its pid, so the child can tell it was orphaned before it could arrange to die.
PARENT_PID_ENV = "EDGE_WORKER_PARENT_PID"
#: Azure ML's module name for the entry script (``user_script.py: load_script``).
MODULE_NAME = "entry_module"
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
        head = json.dumps(header, ensure_ascii=True).encode()
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


def load(image_dir: str, entry_script: str) -> tuple[Callable[[str], Any], Callable[[], Any] | None]:
    """Import the entry script the way Azure ML does; return a one-argument ``run`` and ``init``."""
    path = os.path.join(image_dir, entry_script)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {entry_script}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    run = getattr(module, "run", None)
    if not callable(run):
        raise AttributeError(f"{entry_script} does not define a run() function")
    init = getattr(module, "init", None)
    return adapt_run(run), init if callable(init) else None


def adapt_run(run: Callable[..., Any]) -> Callable[[str], Any]:
    """Call ``run`` as Azure ML does: the input by the name of its first parameter, and
    ``request_headers`` if it declares one (we have no HTTP headers to give: an empty dict)."""
    try:
        params = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: no signature to look at
        return run
    wants_headers = any(p.name == "request_headers" for p in params)
    data = next((p for p in params if p.name != "request_headers"), None)
    if data is None or data.kind in (data.POSITIONAL_ONLY, data.VAR_POSITIONAL):
        if wants_headers:
            return lambda raw: run(raw, request_headers={})
        return run
    name = data.name
    if wants_headers:
        return lambda raw: run(**{name: raw, "request_headers": {}})
    return lambda raw: run(**{name: raw})


def _to_builtin(obj: Any) -> Any:
    """``json.dumps`` default for what scoring scripts commonly return: numpy arrays and scalars
    (and anything else with ``tolist``/``item``, e.g. torch tensors). Azure ML itself answers 500
    for these; converting them only makes scripts work that would fail there."""
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def encode(result: Any) -> tuple[dict[str, Any], bytes]:
    """Turn run()'s return value into a response the way azureml-inference-server-http does
    (``server/routes.py: wrap_response`` -> ``api/aml_response.py: AMLResponse(json_str=True)``):
    everything, a str included, goes through ``json.dumps`` (so a script returning
    ``json.dumps(x)`` answers a JSON *string*, exactly as on Azure ML), and None becomes ``{}``.
    A returned HTTP response object (``AMLResponse`` / ``flask.Response``) is passed through with
    its status, content type and bytes."""
    status = getattr(result, "status_code", None)
    get_data = getattr(result, "get_data", None)
    if isinstance(status, int) and callable(get_data):
        headers = getattr(result, "headers", None)
        ctype = headers.get("Content-Type") if headers is not None else None
        data = get_data()
        body = data.encode() if isinstance(data, str) else bytes(data)
        return {"ok": True, "status": status, "content_type": ctype or "application/octet-stream"}, body
    text = "{}" if result is None else json.dumps(result, default=_to_builtin)
    return {"ok": True, "status": 200, "content_type": "application/json"}, text.encode()


def collection_begin() -> None:
    """A request starts: the data collectors forget the last one. Free until a script imports one."""
    bridge = sys.modules.get(_COLLECT_BRIDGE)
    if bridge is not None:
        bridge.begin()


def with_collected(header: dict[str, Any]) -> dict[str, Any]:
    """The response header, with what the request's data collectors collected (``"collected"``)."""
    bridge = sys.modules.get(_COLLECT_BRIDGE)
    if bridge is not None and (records := bridge.drain()):
        header["collected"] = records
    return header


def serve(chan: Channel, run: Callable[[str], Any]) -> int:
    while True:
        raw = chan.read()
        if raw is None:
            return 0
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Azure ML answers 400 too (input_parsers.py: JsonStringInput).
            chan.write(
                {"ok": False, "kind": "bad_input", "error": f"Input cannot be decoded as UTF-8: {exc}"}
            )
            continue
        collection_begin()
        try:
            header, body = encode(run(text))
        except Exception as exc:  # BaseException (SystemExit...) ends the worker: the parent restarts it
            chan.write(
                with_collected(
                    {"ok": False, "kind": "user", "error": describe(exc), "traceback": traceback_text(exc)}
                )
            )
            continue
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
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path[:] = [image_dir, COLLECTOR_SHIM, *rest]
    # The image directory is content-addressed and may be read-only: no __pycache__ inside it.
    sys.dont_write_bytecode = True
    os.environ["AZUREML_MODEL_DIR"] = os.path.join(image_dir, "models")
    t0 = time.monotonic()
    try:
        os.chdir(image_dir)
        run, init = load(image_dir, entry_script)
        if init is not None:
            init()
    except BaseException as exc:  # SystemExit in the script's top level is an init failure too
        chan.write({"ok": False, "error": describe(exc), "traceback": traceback_text(exc)})
        return 1
    chan.write(
        {
            "ok": True,
            "ready": True,
            "pid": os.getpid(),
            "python": sys.executable,
            "init_ms": round((time.monotonic() - t0) * 1000, 1),
        }
    )
    return serve(chan, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
