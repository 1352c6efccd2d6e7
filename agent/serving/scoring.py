"""Scoring, independent of HTTP: the API and the smoke test call the same functions, so an image
that passes its smoke test has been exercised through the path that will serve it.

The v2 functions return ``(http_status, json_bytes)``, errors as JSON ``{"error", "code"}`` (the
Open Inference Protocol's shape); /score returns an :class:`~agent.serving.azureml.Answer` with
status, headers and body as Azure ML's inference server would send them, errors as
``{"message", "code"}``: 400 malformed input, 404 unknown model, 500 the scoring code raised, 503
no worker available, 504 the scoring code timed out.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from agent.serving import azureml
from agent.serving.azureml import Answer
from agent.serving.runtime import LoadedImage, Model, TensorSpec
from agent.serving.worker_protocol import HttpRequest
from edge_core.errors import ErrorCode, ModelLoadError, RequestRefused, ScoringError
from edge_core.tensors import (
    V2_TO_CONFIG,
    V2_TO_NUMPY,
    BinarySizeError,
    compare,
    from_binary,
    raw_input_shape,
    shape_matches,
    to_binary,
    to_numpy,
    v2_datatype_of,
)

# numpy arrays are written by orjson directly; non-string keys occur in non-tensor outputs (ZipMap)
_NUMPY_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_U32 = struct.Struct("<I")  # a BYTES element's length prefix


def _bad(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> RequestRefused:
    return RequestRefused(400, code, message)


def _parse(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}", ErrorCode.MALFORMED_JSON) from None


def _tensor(spec: TensorSpec, data: Any, shape: Any, datatype: str | None) -> np.ndarray:
    """Decode one input and check it against the model's signature, naming what does not fit."""
    want = spec.datatype
    if want is None:
        raise _bad(
            f"input {spec.name!r} is a {spec.onnx_type}, which JSON tensors cannot carry",
            ErrorCode.WRONG_DATATYPE,
        )
    if datatype is not None and datatype != want:
        raise _bad(
            f"input {spec.name!r}: datatype {datatype}, the model expects {want}", ErrorCode.WRONG_DATATYPE
        )
    if not isinstance(data, list):
        data = [data]
    try:
        if shape is None:
            shape = list(np.shape(data))  # raises ValueError for ragged nested lists
        arr = to_numpy({"datatype": want, "shape": shape, "data": data}, f"input {spec.name!r}")
    except ValueError as exc:
        raise _bad(str(exc), ErrorCode.BAD_TENSOR) from None
    if not shape_matches(arr.shape, spec.shape):
        expected = ["?" if d < 0 else d for d in spec.shape]
        raise _bad(
            f"input {spec.name!r}: shape {list(arr.shape)}, the model expects {expected}",
            ErrorCode.WRONG_SHAPE,
        )
    return arr


def _run_model(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    try:
        return model.infer(feeds)
    except Exception as exc:  # onnxruntime's errors for inputs that passed our checks (e.g. a value range)
        raise RequestRefused(
            400, ErrorCode.INFERENCE_FAILED, f"model {model.name!r} refused the input: {exc}"
        ) from None


def _output(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, np.ndarray):
        dt = v2_datatype_of(value.dtype)
        flat = value.ravel()
        return {
            "name": name,
            "datatype": dt,
            "shape": list(value.shape),
            "data": flat if dt != "BYTES" else flat.tolist(),
        }
    # non-tensor outputs (e.g. a sequence of maps): passed through as JSON
    return {
        "name": name,
        "datatype": None,
        "shape": [len(value)] if hasattr(value, "__len__") else [],
        "data": value,
    }


@dataclass(frozen=True, slots=True)
class BinaryReply:
    """The answer to a v2 request that used the binary tensor data extension (binary inputs, binary
    outputs, or both), framed as Triton frames it: ``header`` is the response's JSON; ``tensors`` are
    the binary outputs' bytes in the order the JSON lists them, each a view of its array's buffer
    (empty when every output went back as JSON: then ``header`` is the whole body)."""

    header: bytes
    tensors: tuple[memoryview | bytes, ...]
    #: The request and the response as plain v2 JSON, every tensor's ``data`` inline: data capture
    #: records JSON whatever travelled on the wire. Rendered only for a request that is captured.
    as_json: Callable[[], tuple[bytes, bytes]]

    def __len__(self) -> int:
        return len(self.header) + sum(len(t) for t in self.tensors)


def _params(obj: dict[str, Any], label: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad(f"{label}: parameters must be an object")
    return params


def _flag(params: dict[str, Any], key: str, label: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{label}: parameters.{key} must be true or false, not {value!r}")
    return value


def _no_shared_memory(params: dict[str, Any], label: str) -> None:
    # Triton's shared-memory extensions need regions registered with the server, which this one has not.
    if "shared_memory_region" in params:
        raise _bad(
            f"{label}: shared memory (parameters.shared_memory_region) is not supported; send the "
            "tensor in the body (binary_data_size) or as JSON",
            ErrorCode.UNSUPPORTED_PARAMETER,
        )


def _header_length(value: str, size: int) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise _bad(
            f"Inference-Header-Content-Length {value!r} is not a byte count", ErrorCode.BAD_HEADER_LENGTH
        )
    n = int(text)
    if n > size:
        raise _bad(
            f"Inference-Header-Content-Length {n} is beyond the body's {size} bytes",
            ErrorCode.BAD_HEADER_LENGTH,
        )
    return n


def _split(model: Model, body: bytes, header_length: str | None) -> tuple[Any, memoryview | None]:
    """The request's JSON, parsed, and the binary data after it (None without the extension's header).
    Slices of the body are memoryviews: binary inputs are decoded from the body's own buffer."""
    if header_length is None:
        return _parse(body), None
    n = _header_length(header_length, len(body))
    view = memoryview(body)
    if n:
        return _parse(view[:n]), view[n:]
    # A raw binary request: no JSON at all; the body is the data of the model's only input, and every
    # output goes back binary (Triton's rules).
    if len(model.inputs) != 1:
        raise _bad(
            f"a raw binary request (Inference-Header-Content-Length: 0) needs a model with one input; "
            f"{model.name!r} has {len(model.inputs)}: send a JSON header"
        )
    spec = model.inputs[0]
    if spec.datatype is None:
        raise _bad(
            f"input {spec.name!r} is a {spec.onnx_type}, which v2 cannot carry", ErrorCode.WRONG_DATATYPE
        )
    try:
        shape = raw_input_shape(spec.datatype, spec.shape, len(body), f"input {spec.name!r}")
    except BinarySizeError as exc:
        raise _bad(str(exc), ErrorCode.BINARY_SIZE_MISMATCH) from None
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if spec.datatype == "BYTES":  # the body is the element itself, without its length prefix
        view = memoryview(_U32.pack(len(body)) + body)
    inp = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
    req = {"inputs": [{**inp, "parameters": {"binary_data_size": len(view)}}]}
    return req | {"parameters": {"binary_data_output": True}}, view


def _binary_size(
    inp: dict[str, Any], params: dict[str, Any], binary: memoryview | None, offset: int, label: str
) -> int:
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"{label}: binary_data_size must be a byte count, not {size!r}")
    if "data" in inp:
        raise _bad(f"{label} has both data and binary_data_size: send one")
    if binary is None:
        raise _bad(
            f"{label} has binary_data_size but the request has no Inference-Header-Content-Length "
            "header to say where its JSON ends",
            ErrorCode.BAD_HEADER_LENGTH,
        )
    if offset + size > len(binary):
        raise _bad(
            f"{label}: binary_data_size {size}, but only {len(binary) - offset} bytes of binary data "
            "are left after the JSON",
            ErrorCode.BINARY_SIZE_MISMATCH,
        )
    return size


def _binary_tensor(spec: TensorSpec, data: memoryview, shape: Any, datatype: Any) -> np.ndarray:
    """Decode one binary input (a view of the request body where the datatype allows) and check it
    against the model's signature, as ``_tensor`` does for JSON data."""
    want = spec.datatype
    label = f"input {spec.name!r}"
    if want is None:
        raise _bad(f"{label} is a {spec.onnx_type}, which v2 tensors cannot carry", ErrorCode.WRONG_DATATYPE)
    if datatype != want:
        what = "no datatype" if datatype is None else f"datatype {datatype}"
        if datatype is not None and datatype not in V2_TO_NUMPY:
            what = f"unknown datatype {datatype!r}"
        raise _bad(f"{label}: {what}, the model expects {want}", ErrorCode.WRONG_DATATYPE)
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(
            f"{label}: shape must be a list of non-negative integers, got {shape!r}", ErrorCode.BAD_TENSOR
        )
    if not shape_matches(shape, spec.shape):
        expected = ["?" if d < 0 else d for d in spec.shape]
        raise _bad(f"{label}: shape {shape}, the model expects {expected}", ErrorCode.WRONG_SHAPE)
    try:
        return from_binary(want, shape, data, label)
    except BinarySizeError as exc:
        raise _bad(str(exc), ErrorCode.BINARY_SIZE_MISMATCH) from None
    except ValueError as exc:
        raise _bad(str(exc), ErrorCode.BAD_TENSOR) from None


def _requested_outputs(req: dict[str, Any], default_binary: bool) -> dict[str, bool]:
    """The outputs the request lists (none: all of them), each with whether it goes back binary: its
    ``binary_data``, else the request's ``binary_data_output`` (the protocol's rule; tritonclient
    always sets one or the other). Names the model lacks are ignored, as they always were here."""
    wanted: dict[str, bool] = {}
    for out in req.get("outputs") or []:
        if not isinstance(out, dict) or "name" not in out:
            continue
        label = f"output {out['name']!r}"
        params = _params(out, label)
        _no_shared_memory(params, label)
        if "classification" in params:
            raise _bad(
                f"{label}: the classification extension (parameters.classification) is not supported",
                ErrorCode.UNSUPPORTED_PARAMETER,
            )
        wanted[out["name"]] = (
            _flag(params, "binary_data", label) if "binary_data" in params else default_binary
        )
    return wanted


def _v2_answer(
    img: LoadedImage,
    model_name: str,
    req: dict[str, Any],
    feeds: dict[str, np.ndarray],
    outputs: dict[str, Any],
    names: list[str],
    as_binary: dict[str, bool],
    binary_request: bool,
) -> tuple[int, bytes | BinaryReply]:
    doc: dict[str, Any] = {"model_name": model_name, "model_version": img.version}
    if "id" in req:
        doc["id"] = req["id"]
    entries: list[dict[str, Any]] = []
    tensors: list[memoryview | bytes] = []
    for n in names:
        value = outputs[n]
        # A non-tensor output (a sequence of maps: ZipMap) has no binary form: it stays JSON.
        if as_binary[n] and isinstance(value, np.ndarray):
            data = to_binary(value)
            entries.append({
                "name": n, "datatype": v2_datatype_of(value.dtype), "shape": list(value.shape),
                "parameters": {"binary_data_size": len(data)},
            })  # fmt: skip
            if len(data):  # as Triton: an empty tensor has its size (0) and no bytes
                tensors.append(data)
        else:
            entries.append(_output(n, value))
    header = orjson.dumps(doc | {"outputs": entries}, option=_NUMPY_OPTS)
    if not binary_request and not any(as_binary.values()):
        return 200, header  # plain JSON both ways: the path every JSON client took before the extension

    def as_json() -> tuple[bytes, bytes]:
        request = {k: v for k, v in req.items() if k != "inputs"}
        request["inputs"] = [_output(name, arr) for name, arr in feeds.items()]
        response = doc | {"outputs": [_output(n, outputs[n]) for n in names]}
        return orjson.dumps(request, option=_NUMPY_OPTS), orjson.dumps(response, option=_NUMPY_OPTS)

    return 200, BinaryReply(header, tuple(tensors), as_json)


def model_config(img: LoadedImage, name: str) -> dict[str, Any]:
    """Triton's model configuration (``GET /v2/models/{name}/config``, tritonclient's
    ``get_model_config``), as much of it as an ONNX model here says truthfully: no batching by the
    server (``max_batch_size`` 0, so ``dims`` are the model's full shapes, ``-1`` dynamic), the
    platform, and the tensors with their model-configuration datatypes. Non-tensor inputs or outputs
    (sequences, maps), which a Triton configuration cannot express, are left out."""
    m = img.models[name]

    def io(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "data_type": V2_TO_CONFIG[s.datatype], "dims": list(s.shape)}
            for s in specs
            if s.datatype is not None
        ]

    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": io(m.inputs),
        "output": io(m.outputs),
    }


class Scorer:
    def __init__(self, inline_max_s: float = 0.005) -> None:
        self.inline_max_s = inline_max_s
        self._ewma: dict[tuple[str, str], float] = {}

    # --- where to run ----------------------------------------------------------------------

    def inline(self, img: LoadedImage, model: str | None) -> bool:
        """Run on the event loop only models that have been fast so far; score.py never."""
        if model is None:
            if img.entry_script:
                return False
            if len(img.models) != 1:
                return True  # the request will be refused without inference
            model = next(iter(img.models))
        return self._ewma.get((img.sha256, model), 0.0) < self.inline_max_s

    def _timed(self, img: LoadedImage, model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = _run_model(model, feeds)
        key = (img.sha256, model.name)
        self._ewma[key] = 0.8 * self._ewma.get(key, time.perf_counter() - t0) + 0.2 * (
            time.perf_counter() - t0
        )
        return out

    def ready(self, img: LoadedImage) -> bool:
        return img.worker is None or img.worker.alive() > 0

    # --- Open Inference Protocol v2 --------------------------------------------------------

    def infer(
        self, img: LoadedImage, model_name: str, body: bytes, header_length: str | None = None
    ) -> tuple[int, bytes | BinaryReply]:
        """A v2 infer request. ``header_length`` is the request's ``Inference-Header-Content-Length``
        (the binary tensor data extension): the JSON is that many bytes of ``body``, binary inputs
        follow; ``"0"`` is a raw binary request (the body is the model's single input). The answer
        is JSON bytes, or a :class:`BinaryReply` when the request or the response used binary data."""
        try:
            model = img.models[model_name]
            req, binary = _split(model, body, header_length)
            if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
                raise _bad(
                    'expected an inference request: {"inputs": [{"name", "shape", "datatype", "data"}]}'
                )
            default_binary = _flag(_params(req, "the request"), "binary_data_output", "the request")
            specs = {s.name: s for s in model.inputs}
            feeds: dict[str, np.ndarray] = {}
            offset = 0  # into ``binary``: inputs' bytes follow one another in the order of the JSON
            for inp in req["inputs"]:
                if not isinstance(inp, dict) or "name" not in inp:
                    raise _bad("each input needs a name, and data or parameters.binary_data_size")
                spec = specs.get(inp["name"])
                if spec is None:
                    raise _bad(
                        f"model {model_name!r} has no input {inp['name']!r} (it has {sorted(specs)})",
                        ErrorCode.UNKNOWN_INPUT,
                    )
                label = f"input {spec.name!r}"
                params = _params(inp, label)
                _no_shared_memory(params, label)
                if "binary_data_size" in params:
                    size = _binary_size(inp, params, binary, offset, label)
                    assert binary is not None
                    feeds[spec.name] = _binary_tensor(
                        spec, binary[offset : offset + size], inp.get("shape"), inp.get("datatype")
                    )
                    offset += size
                elif "data" in inp:
                    feeds[spec.name] = _tensor(spec, inp["data"], inp.get("shape"), inp.get("datatype"))
                else:
                    raise _bad(f"{label} has neither data nor parameters.binary_data_size")
            if binary is not None and offset != len(binary):
                raise _bad(
                    f"{len(binary) - offset} bytes of binary data follow the JSON beyond the inputs' "
                    f"binary_data_size ({offset} bytes)",
                    ErrorCode.BINARY_SIZE_MISMATCH,
                )
            missing = sorted(set(specs) - set(feeds))
            if missing:
                raise _bad(f"missing input(s) {missing}", ErrorCode.MISSING_INPUT)
            wanted = _requested_outputs(req, default_binary)  # checked before the model runs
            outputs = self._timed(img, model, feeds)
            names = [n for n in model.output_names if not wanted or n in wanted]
            as_binary = {n: wanted.get(n, default_binary) for n in names}
            return _v2_answer(img, model_name, req, feeds, outputs, names, as_binary, binary is not None)
        except RequestRefused as exc:
            return exc.status, orjson.dumps({"error": exc.message, "code": str(exc.code)})

    # --- Azure ML /score -------------------------------------------------------------------

    def score(
        self, img: LoadedImage, body: bytes, collected: list[dict[str, Any]] | None = None
    ) -> tuple[int, bytes]:
        """``POST /score`` of a JSON ``body``: see :meth:`score_request`."""
        answer = self.score_request(img, HttpRequest(body=body), collected)
        return answer.status, answer.body

    def score_request(
        self, img: LoadedImage, req: HttpRequest, collected: list[dict[str, Any]] | None = None
    ) -> Answer:
        """score.py images: run() in a worker, called as Azure ML calls it (POST, GET with query
        parameters, OPTIONS; ``@rawhttp`` gets any of them). Without score.py: ``{"data": ...}``
        goes to the model's single input (or ``{"inputs": {name: ...}}`` to several) and the answer
        maps each output name to its value; a GET's query parameters are that document, parsed as
        Azure ML parses them for run(). ``collected`` receives what score.py's Azure ML data
        collectors collected during the request (the smoke test passes none: it is not traffic)."""
        if img.worker is not None:
            try:
                result = img.worker.score(req)
            except ScoringError as exc:
                if collected is not None:
                    collected.extend(exc.collected)
                return azureml.scoring_error(exc, img.worker.timeout_s)
            if collected is not None:
                collected.extend(result.collected)
            return Answer(result.status, result.body, result.headers)
        if req.method == "OPTIONS":
            return Answer(200, b"", (("Content-Type", azureml.TEXT_HTML), (azureml.FAILED, "False")))
        if req.method not in ("GET", "POST"):
            return azureml.error(405, "Method not allowed", str(ErrorCode.BAD_REQUEST))
        t0 = time.perf_counter()
        try:
            doc = azureml.query_input(req.query) if req.method == "GET" else _parse(req.body)
            out = self._score_model(img, doc)
        except RequestRefused as exc:
            return azureml.error(exc.status, exc.message, str(exc.code))
        run_ms = f"{(time.perf_counter() - t0) * 1000:.3f}"
        headers = (
            ("Content-Type", "application/json"),
            (azureml.FAILED, "False"),
            ("x-ms-run-fn-exec-ms", run_ms),
        )
        return Answer(200, out, headers)

    def _score_model(self, img: LoadedImage, req: Any) -> bytes:
        if len(img.models) != 1:
            raise _bad(
                "this image has no score.py and several models: use /v2/models/{name}/infer",
                ErrorCode.AMBIGUOUS_MODEL,
            )
        model = next(iter(img.models.values()))
        if isinstance(req, dict) and isinstance(req.get("inputs"), dict):
            given = req["inputs"]
        elif isinstance(req, dict) and "data" in req and len(model.inputs) == 1:
            given = {model.inputs[0].name: req["data"]}
        else:
            raise _bad('expected {"data": [...]} (single-input model) or {"inputs": {"<name>": [...]}}')
        specs = {s.name: s for s in model.inputs}
        unknown = sorted(set(given) - set(specs))
        if unknown or set(specs) - set(given):
            raise _bad(
                f"inputs {sorted(given)} do not match the model's {sorted(specs)}",
                ErrorCode.UNKNOWN_INPUT,
            )
        feeds = {n: _tensor(specs[n], v, None, None) for n, v in given.items()}
        outputs = self._timed(img, model, feeds)
        return orjson.dumps(outputs, option=_NUMPY_OPTS)

    # --- smoke test ------------------------------------------------------------------------

    def smoke_test(self, img: LoadedImage) -> float | None:
        """Run the image's sample request through the serving path and compare the answer with the
        expected one within its tolerances. Returns the seconds it took, or None if the image has no
        smoke test; raises ModelLoadError(smoke_test_failed) with the difference it saw."""
        st = img.meta.get("smoke_test")
        if not st:
            return None
        body = orjson.dumps(st["request"])
        t0 = time.perf_counter()
        out: bytes | BinaryReply
        detail = ""
        if img.entry_script:
            answer = self.score_request(img, HttpRequest(body=body))
            status, out, detail = answer.status, answer.body, answer.detail
        else:
            status, out = self.infer(img, st.get("model") or next(iter(img.models)), body)
        elapsed = time.perf_counter() - t0
        if isinstance(out, BinaryReply):  # a sample request may ask for binary outputs: compare their values
            out = out.as_json()[1]
        if status != 200:
            # Azure ML's error message hides run()'s exception from clients; the operator gets it.
            raise ModelLoadError(
                ErrorCode.SMOKE_TEST_FAILED,
                f"sample request answered HTTP {status}: {out[:500]!r}" + (f" ({detail})" if detail else ""),
                "fix the image (score.py, model) or its sample request",
            )
        actual = orjson.loads(out)
        expected = st["expected"]
        if not img.entry_script and isinstance(expected, dict):
            actual = {k: actual[k] for k in expected if k in actual}
        diff = compare(expected, actual, float(st.get("rtol", 1e-4)), float(st.get("atol", 1e-6)))
        if diff is not None:
            raise ModelLoadError(
                ErrorCode.SMOKE_TEST_FAILED,
                f"sample request gave a different answer: {diff}",
                "the new image does not reproduce its expected response; the old image keeps serving",
            )
        return elapsed
