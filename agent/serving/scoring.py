"""Scoring, independent of HTTP: the API and the smoke test call the same functions, so an image
that passes its smoke test has been exercised through the path that will serve it.

The v2 functions return ``(http_status, json_bytes)``, errors as JSON ``{"error", "code"}`` (the
Open Inference Protocol's shape); /score returns an :class:`~agent.serving.azureml.Answer` with
status, headers and body as Azure ML's inference server would send them, errors as
``{"message", "code"}``: 400 malformed input, 404 unknown model, 500 the scoring code raised, 503
no worker available, 504 the scoring code timed out.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from agent.serving import azureml
from agent.serving.azureml import Answer
from agent.serving.runtime import LoadedImage, Model, TensorSpec
from agent.serving.worker_protocol import HttpRequest
from edge_core.errors import ErrorCode, ModelLoadError, RequestRefused, ScoringError
from edge_core.tensors import compare, shape_matches, to_numpy, v2_datatype_of

# numpy arrays are written by orjson directly; non-string keys occur in non-tensor outputs (ZipMap)
_NUMPY_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _bad(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> RequestRefused:
    return RequestRefused(400, code, message)


def _parse(body: bytes) -> Any:
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

    def infer(self, img: LoadedImage, model_name: str, body: bytes) -> tuple[int, bytes]:
        try:
            model = img.models[model_name]
            req = _parse(body)
            if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
                raise _bad(
                    'expected an inference request: {"inputs": [{"name", "shape", "datatype", "data"}]}'
                )
            specs = {s.name: s for s in model.inputs}
            feeds: dict[str, np.ndarray] = {}
            for inp in req["inputs"]:
                if not isinstance(inp, dict) or "name" not in inp or "data" not in inp:
                    raise _bad("each input needs at least a name and data")
                spec = specs.get(inp["name"])
                if spec is None:
                    raise _bad(
                        f"model {model_name!r} has no input {inp['name']!r} (it has {sorted(specs)})",
                        ErrorCode.UNKNOWN_INPUT,
                    )
                feeds[spec.name] = _tensor(spec, inp["data"], inp.get("shape"), inp.get("datatype"))
            missing = sorted(set(specs) - set(feeds))
            if missing:
                raise _bad(f"missing input(s) {missing}", ErrorCode.MISSING_INPUT)
            outputs = self._timed(img, model, feeds)
            wanted = [o["name"] for o in req.get("outputs") or [] if isinstance(o, dict) and "name" in o]
            names = [n for n in model.output_names if not wanted or n in wanted]
            doc: dict[str, Any] = {
                "model_name": model_name,
                "model_version": img.version,
                "outputs": [_output(n, outputs[n]) for n in names],
            }
            if "id" in req:
                doc["id"] = req["id"]
            return 200, orjson.dumps(doc, option=_NUMPY_OPTS)
        except RequestRefused as exc:
            return exc.status, orjson.dumps({"error": exc.message, "code": str(exc.code)})

    # --- Azure ML /score -------------------------------------------------------------------

    def score(self, img: LoadedImage, body: bytes) -> tuple[int, bytes]:
        """``POST /score`` of a JSON ``body``: see :meth:`score_request`."""
        answer = self.score_request(img, HttpRequest(body=body))
        return answer.status, answer.body

    def score_request(self, img: LoadedImage, req: HttpRequest) -> Answer:
        """score.py images: run() in a worker, called as Azure ML calls it (POST, GET with query
        parameters, OPTIONS; ``@rawhttp`` gets any of them). Without score.py: ``{"data": ...}``
        goes to the model's single input (or ``{"inputs": {name: ...}}`` to several) and the answer
        maps each output name to its value; a GET's query parameters are that document, parsed as
        Azure ML parses them for run()."""
        if img.worker is not None:
            try:
                result = img.worker.score(req)
            except ScoringError as exc:
                return azureml.scoring_error(exc, img.worker.timeout_s)
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
        detail = ""
        if img.entry_script:
            answer = self.score_request(img, HttpRequest(body=body))
            status, out, detail = answer.status, answer.body, answer.detail
        else:
            status, out = self.infer(img, st.get("model") or next(iter(img.models)), body)
        elapsed = time.perf_counter() - t0
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
