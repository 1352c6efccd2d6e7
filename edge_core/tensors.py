"""Tensors as Open Inference Protocol (KServe v2) JSON, and the tolerant comparison of responses.

Pure functions over numpy, shared by the two sides of an image's smoke test: ``edge-deploy image
build`` runs the sample request through onnxruntime before it ships the image (so an operator cannot
ship a smoke test that can never pass), and the device's scoring API serves the same requests and
checks the same expected response. Both sides using these functions is what makes "passed at build
time" mean "passes on the device" for the same model.

A v2 tensor is ``{"name": str, "datatype": "FP32", "shape": [2, 4], "data": [...]}`` with ``data``
in row-major order (flat; nested lists are accepted and flattened). The same tensors travel as raw
bytes after the JSON with the binary tensor data extension (``from_binary``, ``to_binary``, at the end).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

#: onnxruntime's type strings (``NodeArg.type``) for the tensor types v2 can carry. Anything else
#: (bfloat16, float8, complex, sequences, maps) has no v2 datatype.
ONNX_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: The numpy dtype each v2 datatype decodes to. BYTES is an object array of ``str``: what
#: onnxruntime takes and returns for ``tensor(string)``.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

_NUMPY_TO_V2 = {dt: name for name, dt in V2_TO_NUMPY.items() if name != "BYTES"}


def v2_datatype(onnx_type: str) -> str | None:
    """The v2 datatype for an onnxruntime type string, or None when v2 cannot carry it."""
    return ONNX_TO_V2.get(onnx_type)


def v2_datatype_of(dtype: np.dtype[Any]) -> str:
    """The v2 datatype of a numpy dtype; strings, bytes and object arrays are BYTES."""
    if dtype.kind in "OUS":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def _flatten(data: Any, out: list[Any]) -> list[Any]:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)
    return out


def _shape(tensor: Mapping[str, Any], label: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"{label}: shape must be a list of non-negative integers, got {shape!r}")
    return shape


def to_numpy(tensor: Any, label: str = "tensor") -> Array:
    """Decode one v2 JSON tensor into an array of its datatype and shape.

    Refuses (ValueError naming ``label``) what would otherwise be converted silently: floats or
    strings for an integer datatype, integers out of the datatype's range, a data length that does
    not fill the shape.
    """
    if not isinstance(tensor, Mapping):
        raise ValueError(f"{label}: expected an object with name, datatype, shape and data")
    datatype = tensor.get("datatype")
    if datatype not in V2_TO_NUMPY:
        raise ValueError(f"{label}: unknown datatype {datatype!r}; one of {', '.join(V2_TO_NUMPY)}")
    shape = _shape(tensor, label)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ValueError(f"{label}: data must be a list")
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        flat = _flatten(data, [])
        if not all(isinstance(x, str) for x in flat):
            raise ValueError(f"{label}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
    else:
        arr = _numeric(data, dtype, datatype, label)
    count = math.prod(shape)
    if arr.size != count:
        raise ValueError(f"{label}: shape {shape} holds {count} elements, data has {arr.size}")
    return arr.reshape(shape)


def _numeric(data: list[Any], dtype: np.dtype[Any], datatype: str, label: str) -> Array:
    try:
        raw = np.asarray(data)
    except ValueError:
        raise ValueError(f"{label}: data is a ragged nested list") from None
    raw = raw.reshape(-1)
    if raw.size == 0:
        return raw.astype(dtype)
    kind = raw.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise ValueError(f"{label}: BOOL data must be true/false")
        return raw
    if dtype.kind == "f":
        if kind not in "iuf":
            raise ValueError(f"{label}: {datatype} data must be numbers")
        return raw.astype(dtype)
    # Integer datatypes: numpy would truncate 1.5 to 1 or wrap 300 to 44 without a word.
    if kind in "iu":
        info = np.iinfo(dtype)
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise ValueError(f"{label}: {datatype} data out of range [{info.min}, {info.max}]")
        return raw.astype(dtype)
    # Mixed magnitudes (e.g. 1 and 2**63) make numpy fall back to float64 (rounding them) or object:
    # check each of the original values and convert those.
    flat = _flatten(data, [])
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise ValueError(f"{label}: {datatype} data must be integers")
    try:
        return np.array(flat, dtype=dtype)
    except OverflowError:
        raise ValueError(f"{label}: {datatype} data out of range") from None


def from_numpy(name: str, array: Array) -> dict[str, Any]:
    """Encode an array as a v2 JSON output tensor (flat, row-major data)."""
    datatype = v2_datatype_of(array.dtype)
    if datatype == "BYTES":
        data: list[Any] = []
        for x in array.reshape(-1).tolist():
            if isinstance(x, bytes):
                data.append(x.decode())
            elif isinstance(x, str):
                data.append(x)
            else:
                raise ValueError(f"{name}: BYTES output holds a {type(x).__name__}, not a string")
    else:
        data = array.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def shape_matches(shape: Sequence[int], declared: Sequence[int]) -> bool:
    """Whether a concrete shape fits a declared one, where -1 is any size."""
    return len(shape) == len(declared) and all(
        d == -1 or d == s for s, d in zip(shape, declared, strict=True)
    )


def decode_request(request: Any, inputs: Sequence[Mapping[str, Any]]) -> dict[str, Array]:
    """Feeds for a model from a v2 infer request, checked against the model's declared inputs
    (bundle.json's ``models[].inputs``): every input given once, known names, the declared datatype,
    a shape that fits the declared one."""
    if not isinstance(request, Mapping) or not isinstance(request.get("inputs"), list):
        raise ValueError('request: expected {"inputs": [...]}')
    declared = {spec["name"]: spec for spec in inputs}
    feeds: dict[str, Array] = {}
    for i, tensor in enumerate(request["inputs"]):
        label = f"inputs[{i}]"
        name = tensor.get("name") if isinstance(tensor, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(f"{label}: name must be a string")
        label = f"{label} ({name})"
        spec = declared.get(name)
        if spec is None:
            raise ValueError(f"{label}: the model has no such input; its inputs are {', '.join(declared)}")
        if name in feeds:
            raise ValueError(f"{label}: given twice")
        if spec.get("datatype") is None:
            raise ValueError(f"{label}: the input is {spec.get('onnx_type')}, which v2 cannot carry")
        if tensor.get("datatype") != spec["datatype"]:
            raise ValueError(
                f"{label}: datatype {tensor.get('datatype')!r}, the model takes {spec['datatype']}"
            )
        arr = to_numpy(tensor, label)
        if not shape_matches(arr.shape, spec["shape"]):
            raise ValueError(f"{label}: shape {list(arr.shape)} does not fit the model's {spec['shape']}")
        feeds[name] = arr
    missing = [n for n in declared if n not in feeds]
    if missing:
        raise ValueError(f"request: missing input {', '.join(missing)}")
    return feeds


def requested_outputs(request: Any, outputs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the outputs to compute: those the request's ``outputs`` lists, in its order, or
    else every output v2 can carry, in the model's order (a sequence or map output, such as
    skl2onnx's ZipMap, is left out rather than failing the whole request)."""
    declared = {spec["name"]: spec for spec in outputs}
    wanted = request.get("outputs") if isinstance(request, Mapping) else None
    if wanted is None:
        return [spec["name"] for spec in outputs if spec.get("datatype") is not None]
    if not isinstance(wanted, list):
        raise ValueError('request: outputs must be a list of {"name": ...}')
    names: list[str] = []
    for i, item in enumerate(wanted):
        name = item.get("name") if isinstance(item, Mapping) else None
        spec = declared.get(name) if isinstance(name, str) else None
        if spec is None or not isinstance(name, str):
            raise ValueError(f"outputs[{i}]: the model has no output {name!r}; it has {', '.join(declared)}")
        if spec.get("datatype") is None:
            raise ValueError(
                f"outputs[{i}] ({name}): the output is {spec.get('onnx_type')}, which v2 cannot carry"
            )
        if name in names:
            raise ValueError(f"outputs[{i}] ({name}): requested twice")
        names.append(name)
    return names


def encode_response(
    model_name: str, outputs: Iterable[tuple[str, Array]], model_version: str | None = None
) -> dict[str, Any]:
    """A v2 infer response: ``{"model_name", ["model_version",] "outputs": [...]}``."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    doc["outputs"] = [from_numpy(name, arr) for name, arr in outputs]
    return doc


# --- tolerant comparison ------------------------------------------------------------------------


def compare(expected: Any, actual: Any, rtol: float, atol: float) -> str | None:
    """None when ``actual`` matches ``expected``; else the first difference, e.g.
    ``"outputs[0].data[3]: expected 0.25, got 0.31"``.

    - Numbers match when ``|actual - expected| <= atol + rtol * |expected|`` (numpy's ``isclose``)
      if either is a float; two integers must be equal (labels and counts are not approximate).
      NaN matches NaN. Booleans, strings and null must be equal, and true is not 1.
    - Objects: every key of ``expected`` must be in ``actual`` and match; keys only in ``actual``
      are ignored, because responses carry fields the operator cannot know in advance (v2's
      ``id`` and ``model_version``, a script's timestamps).
    - Lists: same length, matched by position; except a top-level ``outputs`` list of named
      tensors (the v2 response), matched by ``name``, since v2 identifies outputs by name and
      does not fix their order; outputs ``expected`` does not list are ignored.
    """
    return _diff(expected, actual, "", rtol, atol)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _named(items: list[Any]) -> dict[str, Any] | None:
    if not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in items):
        return None
    by_name = {x["name"]: x for x in items}
    return by_name if len(by_name) == len(items) else None


def _diff(e: Any, a: Any, path: str, rtol: float, atol: float) -> str | None:
    where = path or "$"
    if _is_number(e) and _is_number(a):
        if isinstance(e, int) and isinstance(a, int):
            return None if e == a else f"{where}: expected {e}, got {a}"
        fe, fa = float(e), float(a)
        if math.isnan(fe) and math.isnan(fa):
            return None
        # Equality first (inf - inf is nan); an infinity matches nothing else, although
        # rtol * |inf| would accept any difference.
        if fe == fa or (math.isfinite(fe) and math.isfinite(fa) and abs(fa - fe) <= atol + rtol * abs(fe)):
            return None
        return f"{where}: expected {_show(e)}, got {_show(a)}"
    if isinstance(e, dict):
        if not isinstance(a, dict):
            return f"{where}: expected an object, got {_show(a)}"
        for key, ev in e.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                return f"{sub}: missing"
            d = _diff(ev, a[key], sub, rtol, atol)
            if d:
                return d
        return None
    if isinstance(e, list):
        if not isinstance(a, list):
            return f"{where}: expected a list, got {_show(a)}"
        if path == "outputs":
            e_named, a_named = _named(e), _named(a)
            if e_named is not None and a_named is not None:
                for i, (name, ev) in enumerate(e_named.items()):
                    if name not in a_named:
                        return f"{path}[{i}]: no output named {name!r} (got {', '.join(a_named) or 'none'})"
                    d = _diff(ev, a_named[name], f"{path}[{i}]", rtol, atol)
                    if d:
                        return d
                return None
        if len(e) != len(a):
            return f"{where}: expected {len(e)} items, got {len(a)}"
        for i, (ev, av) in enumerate(zip(e, a, strict=True)):
            d = _diff(ev, av, f"{path}[{i}]", rtol, atol)
            if d:
                return d
        return None
    # Strings, booleans, null, and a number against anything else: equal or not, type included.
    if type(e) is type(a) and e == a:
        return None
    return f"{where}: expected {_show(e)}, got {_show(a)}"


# --- the binary tensor data extension (Triton's, KServe's) --------------------------------------
#
# A tensor's binary data is its elements little-endian, row-major, without padding; BOOL one byte
# each (0 or 1); BYTES each element a 4-byte little-endian length then its bytes. The HTTP body is
# the JSON request (``Inference-Header-Content-Length`` bytes) followed by the binary inputs in the
# order the JSON lists them, each marked ``"parameters": {"binary_data_size": N}``.

#: Triton's model configuration names (model_config.proto ``DataType``) of the v2 datatypes: the
#: ``data_type`` of ``GET /v2/models/{name}/config``. BYTES is TYPE_STRING there.
V2_TO_CONFIG: dict[str, str] = {
    name: ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}") for name in V2_TO_NUMPY
}

_U32 = struct.Struct("<I")


class BinarySizeError(ValueError):
    """Binary tensor data of the wrong size: its ``binary_data_size`` is not what its shape and
    datatype take, or a BYTES element's length runs past the tensor's data."""


def from_binary(datatype: str, shape: Sequence[int], data: memoryview, label: str = "tensor") -> Array:
    """Decode one tensor's binary data. Fixed-size datatypes are a view of ``data`` (no copy: the
    array is read-only and keeps ``data``'s buffer alive); BYTES become an object array of ``str``,
    the only form onnxruntime takes for ``tensor(string)`` (bytes objects it would stringify)."""
    if datatype not in V2_TO_NUMPY:
        raise ValueError(f"{label}: unknown datatype {datatype!r}; one of {', '.join(V2_TO_NUMPY)}")
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(data, count, label).reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    want = count * dtype.itemsize
    if len(data) != want:
        raise BinarySizeError(
            f"{label}: shape {list(shape)} of {datatype} is {want} bytes, binary_data_size is {len(data)}"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(data, dtype=np.uint8, count=count)
        # numpy and onnxruntime would take any non-zero byte; 2..255 is a sender's bug, not a value
        if count and int(raw.max()) > 1:
            raise ValueError(f"{label}: BOOL binary data must be bytes 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    arr = np.frombuffer(data, dtype=dtype.newbyteorder("<"), count=count)
    if not arr.dtype.isnative:  # a big-endian host: the wire is little-endian whatever the CPU
        arr = arr.astype(dtype)
    return arr.reshape(shape)


def _bytes_elements(data: memoryview, count: int, label: str) -> Array:
    out = np.empty(count, dtype=object)
    off, end = 0, len(data)
    for i in range(count):
        if off + 4 > end:
            raise BinarySizeError(f"{label}: binary data ends before element {i} of {count}")
        (n,) = _U32.unpack_from(data, off)
        off += 4
        if off + n > end:
            raise BinarySizeError(f"{label}: element {i} is {n} bytes long, past the tensor's data")
        try:
            out[i] = str(data[off : off + n], "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{label}: element {i} is not UTF-8, which ONNX strings must be") from None
        off += n
    if off != end:
        raise BinarySizeError(f"{label}: {end - off} bytes left after its {count} elements")
    return out


def to_binary(array: Array) -> memoryview | bytes:
    """One tensor's binary data: for fixed-size datatypes a byte view of the array's own buffer (no
    copy when it is C-contiguous and little-endian, as onnxruntime's outputs are here); BYTES are
    serialized (4-byte length, then the UTF-8 of each element)."""
    if v2_datatype_of(array.dtype) == "BYTES":
        parts: list[bytes] = []
        for x in array.reshape(-1).tolist():
            b = x.encode() if isinstance(x, str) else bytes(x)
            parts += (_U32.pack(len(b)), b)
        return b"".join(parts)
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.byteorder == ">" or (flat.dtype.byteorder == "=" and sys.byteorder == "big"):
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    return flat.data.cast("B")


def raw_input_shape(datatype: str, declared: Sequence[int], nbytes: int, label: str = "input") -> list[int]:
    """The shape of the single input of a raw binary request (``Inference-Header-Content-Length: 0``:
    the body is that input's data, there is no JSON), deduced as Triton does: the declared shape with
    its one dynamic dimension, if it has one, sized from the body; for BYTES, ``[1]`` (the whole body is
    one element). ValueError when the declared shape allows no such deduction; BinarySizeError when
    the body's size does not fit it."""
    if datatype == "BYTES":
        if not shape_matches([1], declared):
            raise ValueError(f"{label}: a raw BYTES request is one element, the model takes {list(declared)}")
        return [1]
    dynamic = [i for i, d in enumerate(declared) if d < 0]
    if len(dynamic) > 1:
        raise ValueError(
            f"{label}: shape {list(declared)} has {len(dynamic)} dynamic dimensions; a raw binary "
            "request can size at most one: send a JSON header with the shape"
        )
    unit = math.prod(d for d in declared if d >= 0) * V2_TO_NUMPY[datatype].itemsize
    shape = list(declared)
    if not dynamic:
        if nbytes != unit:
            raise BinarySizeError(
                f"{label}: shape {shape} of {datatype} is {unit} bytes, the body is {nbytes}"
            )
        return shape
    if (unit == 0 and nbytes) or (unit and nbytes % unit):
        raise BinarySizeError(
            f"{label}: the body's {nbytes} bytes are not a whole number of {shape} {datatype} rows "
            f"({unit} bytes each)"
        )
    shape[dynamic[0]] = nbytes // unit if unit else 0
    return shape
