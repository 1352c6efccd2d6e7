"""edge_core/tensors.py: v2 JSON tensors <-> numpy, request checks against a signature, and the tolerant
comparison the smoke test uses on both sides (build and device)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from edge_core import tensors
from edge_core.tensors import compare, decode_request, from_numpy, requested_outputs, to_numpy


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("BOOL", [True, False, True, False], np.bool_),
        ("UINT8", [0, 1, 254, 255], np.uint8),
        ("UINT16", [0, 1, 2, 65535], np.uint16),
        ("UINT32", [0, 1, 2, 2**32 - 1], np.uint32),
        ("UINT64", [0, 1, 2, 2**64 - 1], np.uint64),
        ("INT8", [-128, 0, 1, 127], np.int8),
        ("INT16", [-1, 0, 1, 2], np.int16),
        ("INT32", [-1, 0, 1, 2], np.int32),
        ("INT64", [-(2**63), 0, 1, 2**63 - 1], np.int64),
        ("FP16", [0.5, 1, -2.0, 3.25], np.float16),
        ("FP32", [0.5, 1, -2.0, 3.25], np.float32),
        ("FP64", [0.1, 1, -2.0, 3.25], np.float64),
        ("BYTES", ["a", "", "ü", "d"], object),
    ],
)
def test_every_datatype_round_trips(datatype: str, data: list[Any], dtype: Any) -> None:
    arr = to_numpy({"name": "x", "datatype": datatype, "shape": [2, 2], "data": data})
    assert arr.dtype == np.dtype(dtype) and arr.shape == (2, 2)
    assert arr.reshape(-1).tolist() == data
    assert from_numpy("y", arr) == {"name": "y", "datatype": datatype, "shape": [2, 2], "data": data}


def test_nested_data_is_row_major_and_empty_tensors_work() -> None:
    arr = to_numpy({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]})
    assert arr.tolist() == [[1, 2], [3, 4]]
    empty = to_numpy({"name": "x", "datatype": "INT64", "shape": [0, 4], "data": []})
    assert empty.shape == (0, 4) and empty.dtype == np.int64


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "INT64", "shape": [2], "data": [1, 2.5]}, "INT64 data must be integers"),
        ({"datatype": "UINT8", "shape": [1], "data": [256]}, "out of range"),
        ({"datatype": "INT8", "shape": [1], "data": [-129]}, "out of range"),
        ({"datatype": "UINT64", "shape": [2], "data": [-1, 2**63]}, "out of range"),
        ({"datatype": "BOOL", "shape": [1], "data": [1]}, "true/false"),
        ({"datatype": "FP32", "shape": [1], "data": ["1"]}, "must be numbers"),
        ({"datatype": "FP32", "shape": [1], "data": [True]}, "must be numbers"),
        ({"datatype": "BYTES", "shape": [1], "data": [1]}, "must be strings"),
        ({"datatype": "FP32", "shape": [3], "data": [1, 2]}, "shape [3] holds 3 elements, data has 2"),
        ({"datatype": "FP32", "shape": [2], "data": [[1, 2], [3]]}, "ragged"),
        ({"datatype": "FP8", "shape": [1], "data": [1]}, "unknown datatype"),
        ({"datatype": "FP32", "shape": [-1], "data": [1]}, "non-negative integers"),
        ({"datatype": "FP32", "shape": [1], "data": 1}, "data must be a list"),
    ],
)
def test_to_numpy_refuses_silent_conversions(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        to_numpy({"name": "x", **tensor}, "inputs[0] (x)")
    assert str(err.value).startswith("inputs[0] (x): ")


def test_from_numpy_scalars_bytes_and_unsupported() -> None:
    assert from_numpy("s", np.float32(2.5) * np.ones((), np.float32)) == {
        "name": "s",
        "datatype": "FP32",
        "shape": [],
        "data": [2.5],
    }
    assert from_numpy("b", np.array([b"ab", "c"], dtype=object))["data"] == ["ab", "c"]
    assert from_numpy("u", np.array(["x", "yz"]))["datatype"] == "BYTES"
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        from_numpy("c", np.array([1j]))
    with pytest.raises(ValueError, match="not a string"):
        from_numpy("o", np.array([1, "a"], dtype=object))


def test_onnx_type_strings() -> None:
    assert tensors.v2_datatype("tensor(float)") == "FP32"
    assert tensors.v2_datatype("tensor(string)") == "BYTES"
    assert tensors.v2_datatype("seq(map(int64,tensor(float)))") is None
    assert tensors.v2_datatype("tensor(bfloat16)") is None


INPUTS: list[dict[str, Any]] = [
    {"name": "a", "datatype": "FP32", "shape": [-1, 3]},
    {"name": "b", "datatype": "INT64", "shape": [-1]},
]
OUTPUTS: list[dict[str, Any]] = [
    {"name": "probs", "datatype": "FP32", "shape": [-1, 3]},
    {"name": "zip", "datatype": None, "shape": None, "onnx_type": "seq(map(int64,tensor(float)))"},
    {"name": "label", "datatype": "INT64", "shape": [-1]},
]


def _req(*inputs: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": list(inputs)}


A = {"name": "a", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}
B = {"name": "b", "datatype": "INT64", "shape": [2], "data": [7, 8]}


def test_decode_request_checks_against_the_signature() -> None:
    feeds = decode_request(_req(B, A), INPUTS)
    assert feeds["a"].dtype == np.float32 and feeds["a"].shape == (2, 3)
    assert feeds["b"].tolist() == [7, 8]
    for request, message in [
        (_req(A), "missing input b"),
        (_req(A, B, A), "given twice"),
        (_req(A, B, {**B, "name": "c"}), "no such input; its inputs are a, b"),
        (_req(A, {**B, "datatype": "INT32"}), "datatype 'INT32', the model takes INT64"),
        (_req({**A, "shape": [3, 2]}, B), "shape [3, 2] does not fit the model's [-1, 3]"),
        ({"data": [1]}, "expected"),
    ]:
        with pytest.raises(ValueError) as err:
            decode_request(request, INPUTS)
        assert message in str(err.value), (message, str(err.value))


def test_requested_outputs() -> None:
    assert requested_outputs({}, OUTPUTS) == ["probs", "label"]  # the map output is left out
    assert requested_outputs({"outputs": [{"name": "label"}, {"name": "probs"}]}, OUTPUTS) == [
        "label",
        "probs",
    ]
    with pytest.raises(ValueError, match="which v2 cannot carry"):
        requested_outputs({"outputs": [{"name": "zip"}]}, OUTPUTS)
    with pytest.raises(ValueError, match="no output 'nope'"):
        requested_outputs({"outputs": [{"name": "nope"}]}, OUTPUTS)
    with pytest.raises(ValueError, match="requested twice"):
        requested_outputs({"outputs": [{"name": "label"}, {"name": "label"}]}, OUTPUTS)


def test_encode_response() -> None:
    doc = tensors.encode_response("iris", [("label", np.array([1, 2]))], model_version="3")
    assert doc == {
        "model_name": "iris",
        "model_version": "3",
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 2]}],
    }


def _v2(*outputs: tuple[str, list[Any]]) -> dict[str, Any]:
    return {"outputs": [{"name": n, "datatype": "FP32", "shape": [len(d)], "data": d} for n, d in outputs]}


def test_compare_numbers_within_tolerance() -> None:
    assert compare(1.0, 1.0 + 1e-7, 1e-4, 1e-6) is None
    assert compare(100.0, 100.009, 1e-4, 0) is None  # rtol scales with |expected|
    assert compare(100.0, 100.02, 1e-4, 0) == "$: expected 100.0, got 100.02"
    assert compare(0.0, 5e-7, 0, 1e-6) is None
    assert compare(1, 1.00001, 1e-4, 0) is None  # an int against a float is approximate
    assert compare(3, 4, 1.0, 1.0) == "$: expected 3, got 4"  # two ints are exact, whatever the tolerance
    assert compare(math.nan, math.nan, 0, 0) is None
    assert compare(math.inf, math.inf, 0, 0) is None
    assert compare(math.inf, -math.inf, 1, 1) is not None
    assert compare(True, 1, 0, 0) == "$: expected true, got 1"
    assert compare(1, True, 0, 0) == "$: expected 1, got true"
    assert compare("a", "a", 0, 0) is None and compare(None, None, 0, 0) is None
    assert compare("a", "b", 0, 0) == '$: expected "a", got "b"'
    assert compare(1.0, "1.0", 1, 1) == '$: expected 1.0, got "1.0"'


def test_compare_reports_the_first_difference_with_its_path() -> None:
    expected = _v2(("probs", [0.1, 0.2, 0.3, 0.25]))
    actual = _v2(("probs", [0.1, 0.2, 0.3, 0.31]))
    assert compare(expected, actual, 1e-4, 1e-6) == "outputs[0].data[3]: expected 0.25, got 0.31"
    assert compare({"a": {"b": [1, 2]}}, {"a": {"b": [1]}}, 0, 0) == "a.b: expected 2 items, got 1"
    assert compare({"a": 1}, {"b": 1}, 0, 0) == "a: missing"
    assert compare({"a": [1]}, {"a": {"0": 1}}, 0, 0) == 'a: expected a list, got {"0": 1}'
    assert compare({"a": 1}, [1], 0, 0) == "$: expected an object, got [1]"
    long = compare("x" * 100, "y", 0, 0)
    assert long is not None and len(long) < 100 and "..." in long


def test_compare_ignores_extra_keys_and_matches_v2_outputs_by_name() -> None:
    expected = _v2(("label", [1.0]), ("probs", [0.5, 0.5]))
    actual = {
        "model_name": "iris",
        "id": "42",
        **_v2(("probs", [0.5, 0.5]), ("extra", [9.0]), ("label", [1.0])),
    }
    assert compare(expected, actual, 0, 0) is None
    assert compare(_v2(("gone", [1.0])), actual, 0, 0) == (
        "outputs[0]: no output named 'gone' (got probs, extra, label)"
    )
    assert compare(expected, {**actual, **_v2(("label", [2.0]))}, 0, 0) is not None
    # Any other list, even of named objects, is positional and of the same length.
    assert compare({"items": [{"name": "a"}]}, {"items": [{"name": "a"}, {"name": "b"}]}, 0, 0) == (
        "items: expected 1 items, got 2"
    )
