"""The Open Inference Protocol's binary tensor data extension and the Triton calls around it, on a
real ApiServer (uvicorn, loopback port) serving an installed image, driven by NVIDIA's own client
(``tritonclient[http]``) and by raw HTTP for what that client never sends. Every answer is compared
with onnxruntime run directly on the same model file."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.serving.api import ApiServer, ScoringApp
from agent.serving.runtime import CPU, LoadedImage, Runtime, RuntimeSettings
from agent.serving.scoring import Scorer
from agent.telemetry.capture import Capturer, CaptureSettings
from agent.telemetry.metrics import Metrics
from agent.update.store import BundleStore
from deploy.bundle import build_image
from edge_core.tensors import from_binary
from simulators import models

VERSION = "3"


def types_model(path: Path) -> Path:
    """One input per datatype JSON handles badly or not at all, each through a real operator:
    FP16 ``h`` (Cast to FP32 ``hf``, and back out as ``h2 = h + h``), INT64 ``i`` (``i2 = i * i``),
    BOOL ``b`` (``nb = not b``) and STRING ``s`` (``s2 = Identity(s)``)."""
    import onnx
    from onnx import TensorProto, helper

    t = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["h", "h"], ["h2"]),
            helper.make_node("Mul", ["i", "i"], ["i2"]),
            helper.make_node("Not", ["b"], ["nb"]),
            helper.make_node("Identity", ["s"], ["s2"]),
        ],
        "types",
        [t("h", TensorProto.FLOAT16, ["n", 4]), t("i", TensorProto.INT64, ["n", 3]),
         t("b", TensorProto.BOOL, ["n", 2]), t("s", TensorProto.STRING, ["n"])],
        [t("hf", TensorProto.FLOAT, ["n", 4]), t("h2", TensorProto.FLOAT16, ["n", 4]),
         t("i2", TensorProto.INT64, ["n", 3]), t("nb", TensorProto.BOOL, ["n", 2]),
         t("s2", TensorProto.STRING, ["n"])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT, as tritonclient wants it
    img: LoadedImage
    mlp: ort.InferenceSession
    types: ort.InferenceSession


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("v2bin")
    mlp = models.mlp(tmp / "mlp.onnx", sizes=(8, 16, 3), seed=5)
    typed = types_model(tmp / "types.onnx")
    built = build_image(tmp / "img.tar", "v2bin", VERSION, {"mlp": mlp, "types": typed})
    store = BundleStore(tmp / "store")
    store.install(built.sha256, built.path, "v2bin", VERSION)
    rt = Runtime(RuntimeSettings((CPU,), 1, 1))
    img = rt.load(store.image_dir(built.sha256))
    rt.swap(img)
    app = ScoringApp(rt, Scorer(), Metrics(), max_body=8 << 20, token=None, executor=ThreadPoolExecutor(2))
    srv = ApiServer(app, "127.0.0.1:0")
    srv.start()
    sessions = [ort.InferenceSession(str(p), providers=[CPU]) for p in (mlp, typed)]
    try:
        yield Served(srv.url, srv.url.removeprefix("http://"), img, *sessions)
    finally:
        srv.stop()
        rt.close()


@pytest.fixture
def client(served: Served) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(served.host)
    try:
        yield c
    finally:
        c.close()


X = np.random.default_rng(11).standard_normal((5, 8)).astype(np.float32)


def direct(sess: ort.InferenceSession, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    out: np.ndarray = sess.run([name], feeds)[0]
    return out


def mlp_input(binary: bool, x: np.ndarray = X) -> triton.InferInput:
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def output_params(result: Any, name: str) -> dict[str, Any]:
    (out,) = [o for o in result.get_response()["outputs"] if o["name"] == name]
    return dict(out)


# --- inference through tritonclient ------------------------------------------------------------


def test_tritonclient_defaults_binary_inputs_and_binary_outputs(client: Any, served: Served) -> None:
    # No outputs named: tritonclient sends binary_data_output = true, and the input in binary.
    result = client.infer("mlp", [mlp_input(True)])
    out = output_params(result, "y")
    assert out["parameters"] == {"binary_data_size": 5 * 3 * 4} and "data" not in out
    got = result.as_numpy("y")
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got, direct(served.mlp, "y", {"x": X}), rtol=1e-6, atol=1e-7)
    assert result.get_response()["model_version"] == VERSION


def test_json_inputs_binary_outputs(client: Any, served: Served) -> None:
    result = client.infer(
        "mlp", [mlp_input(False)], outputs=[triton.InferRequestedOutput("y", binary_data=True)]
    )
    assert output_params(result, "y")["parameters"]["binary_data_size"] == 60
    np.testing.assert_allclose(result.as_numpy("y"), direct(served.mlp, "y", {"x": X}), rtol=1e-6, atol=1e-7)


def test_binary_inputs_json_outputs(client: Any, served: Served) -> None:
    result = client.infer(
        "mlp",
        [mlp_input(True)],
        outputs=[triton.InferRequestedOutput("y", binary_data=False)],
        request_id="r7",
    )
    out = output_params(result, "y")
    assert "parameters" not in out and len(out["data"]) == 15
    assert result.get_response()["id"] == "r7"
    np.testing.assert_allclose(result.as_numpy("y"), direct(served.mlp, "y", {"x": X}), rtol=1e-6, atol=1e-7)


def test_versioned_infer_and_a_large_binary_output(client: Any, served: Served) -> None:
    # 8192 x 3 float32 = 96 KiB of output: past the single-write size, so written from the array itself
    big = np.random.default_rng(3).standard_normal((8192, 8)).astype(np.float32)
    result = client.infer("mlp", [mlp_input(True, big)], model_version=VERSION)
    np.testing.assert_allclose(
        result.as_numpy("y"), direct(served.mlp, "y", {"x": big}), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(InferenceServerException) as ei:
        client.infer("mlp", [mlp_input(True)], model_version="99")
    assert ei.value.status() == "404"


def types_inputs(binary: bool) -> tuple[list[triton.InferInput], dict[str, Any]]:
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, 4)).astype(np.float16)
    i = np.array(
        [[1, -2, 3], [2**40, -(2**40), 7]], dtype=np.int64
    )  # beyond float64's exact range when squared
    b = np.array([[True, False], [False, True]])
    s = np.array(["hello", "wörld ✓"], dtype=object)  # UTF-8 of more than one byte per character
    feeds = {"h": h, "i": i, "b": b, "s": s}
    inputs = []
    for name, dt, arr in (("h", "FP16", h), ("i", "INT64", i), ("b", "BOOL", b), ("s", "BYTES", s)):
        inp = triton.InferInput(name, list(arr.shape), dt)
        if dt == "BYTES" and binary:
            inp.set_data_from_numpy(np.array([x.encode() for x in s], dtype=object), binary_data=True)
        else:
            inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return inputs, feeds


@pytest.mark.parametrize(
    ("binary_in", "binary_out"),
    [(True, True), (True, False), (False, True)],  # JSON both ways is test_serving's ground
    ids=["binary-in-binary-out", "binary-in-json-out", "json-in-binary-out"],
)
def test_fp16_int64_bool_bytes(client: Any, served: Served, binary_in: bool, binary_out: bool) -> None:
    inputs, feeds = types_inputs(binary_in)
    names = ["hf", "h2", "i2", "nb", "s2"]
    result = client.infer(
        "types", inputs, outputs=[triton.InferRequestedOutput(n, binary_data=binary_out) for n in names]
    )
    want = dict(zip(names, served.types.run(names, feeds), strict=True))
    for n in names:
        assert ("parameters" in output_params(result, n)) is binary_out
    np.testing.assert_array_equal(result.as_numpy("hf"), want["hf"])
    h2 = result.as_numpy("h2")
    assert h2.dtype == np.float16
    np.testing.assert_array_equal(h2, want["h2"])
    i2 = result.as_numpy("i2")
    assert i2.dtype == np.int64 and i2.tolist() == want["i2"].tolist()  # exact: 2**80 wraps identically
    np.testing.assert_array_equal(result.as_numpy("nb"), want["nb"])
    s2 = result.as_numpy("s2")
    assert [x.decode() if isinstance(x, bytes) else x for x in s2.tolist()] == ["hello", "wörld ✓"]
    assert want["s2"].tolist() == ["hello", "wörld ✓"]


# --- metadata, configuration, health -----------------------------------------------------------


def test_health_and_metadata_as_tritonclient_reads_them(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", VERSION)
    assert not client.is_model_ready("nope") and not client.is_model_ready("mlp", "99")
    server = client.get_server_metadata()
    assert server["name"] == "edge-agent" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("types")
    assert meta["versions"] == [VERSION] and meta["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("h", "FP16", [-1, 4]), ("i", "INT64", [-1, 3]), ("b", "BOOL", [-1, 2]), ("s", "BYTES", [-1]),
    ]  # fmt: skip
    assert client.get_model_metadata("mlp", VERSION)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 3]}
    ]
    with pytest.raises(InferenceServerException) as ei:
        client.get_model_metadata("nope")
    assert ei.value.status() == "404" and "unknown model" in ei.value.message()


def test_model_config(client: Any) -> None:
    cfg = client.get_model_config("mlp")
    assert cfg == {
        "name": "mlp", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 0,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 8]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 3]}],
    }  # fmt: skip
    typed = client.get_model_config("types", VERSION)
    assert [(i["name"], i["data_type"]) for i in typed["input"]] == [
        ("h", "TYPE_FP16"), ("i", "TYPE_INT64"), ("b", "TYPE_BOOL"), ("s", "TYPE_STRING"),
    ]  # fmt: skip
    assert [o["data_type"] for o in typed["output"]] == [
        "TYPE_FP32",
        "TYPE_FP16",
        "TYPE_INT64",
        "TYPE_BOOL",
        "TYPE_STRING",
    ]
    for bad, status in (("nope", "404"), ("mlp", "404")):
        with pytest.raises(InferenceServerException) as ei:
            client.get_model_config(bad, "99" if bad == "mlp" else "")
        assert ei.value.status() == status


# --- the wire format, and refusals, in raw HTTP ------------------------------------------------


def framed(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def x_input(size: int, shape: list[int] | None = None, datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": "x",
        "shape": shape or [1, 8],
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


def test_response_framing(served: Served) -> None:
    x = X[:2]
    body, headers = framed(
        {"inputs": [x_input(64, [2, 8])], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        x.tobytes(),
    )
    with httpx.Client(base_url=served.url) as c:
        r = c.post("/v2/models/mlp/infer", content=body, headers=headers)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        n = int(r.headers["inference-header-content-length"])
        doc = json.loads(r.content[:n])
        assert doc["outputs"][0]["parameters"] == {"binary_data_size": 24} and len(r.content) == n + 24
        y = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, 3)
        np.testing.assert_allclose(y, direct(served.mlp, "y", {"x": x}), rtol=1e-6, atol=1e-7)
        # binary input, JSON output: a plain JSON answer, no header (Triton's rule)
        body, headers = framed({"inputs": [x_input(64, [2, 8])]}, x.tobytes())
        r = c.post("/v2/models/mlp/infer", content=body, headers=headers)
        assert r.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in r.headers
        assert len(r.json()["outputs"][0]["data"]) == 6
        # a header length equal to the body: all JSON, with the extension's header present
        plain = json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
        )
        r = c.post(
            "/v2/models/mlp/infer",
            content=plain,
            headers={"Inference-Header-Content-Length": str(len(plain))},
        )
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"


def test_raw_binary_request(served: Served) -> None:
    """``Inference-Header-Content-Length: 0``: the body is the single input's bytes, the batch
    dimension comes from its size, and every output goes back binary."""
    x = X[:3]
    with httpx.Client(base_url=served.url) as c:
        r = c.post(
            "/v2/models/mlp/infer", content=x.tobytes(), headers={"Inference-Header-Content-Length": "0"}
        )
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        assert json.loads(r.content[:n])["outputs"][0]["shape"] == [3, 3]
        y = np.frombuffer(r.content[n:], dtype="<f4").reshape(3, 3)
        np.testing.assert_allclose(y, direct(served.mlp, "y", {"x": x}), rtol=1e-6, atol=1e-7)
        r = c.post(
            "/v2/models/mlp/infer", content=x.tobytes()[:-4], headers={"Inference-Header-Content-Length": "0"}
        )
        assert r.status_code == 400 and r.json()["code"] == "binary_size_mismatch"
        r = c.post(
            "/v2/models/types/infer", content=b"\0" * 8, headers={"Inference-Header-Content-Length": "0"}
        )
        assert r.status_code == 400 and r.json()["code"] == "bad_request" and "one input" in r.json()["error"]


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def types_header(s_size: int, **override: dict[str, Any]) -> dict[str, Any]:
    """A JSON header for ``types``: h, i, b as JSON, s binary (``s_size`` bytes); ``override`` updates
    an input by name, and a ``"data": None`` there drops its data."""
    inputs: list[dict[str, Any]] = [
        {"name": "h", "shape": [1, 4], "datatype": "FP16", "data": [1, 2, 3, 4]},
        {"name": "i", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
        {"name": "b", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]},
        {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": s_size}},
    ]
    for inp in inputs:
        inp.update(override.get(inp["name"], {}))
        if inp.get("data", 0) is None:
            del inp["data"]
    return {"inputs": inputs}


GOOD_X = X[:1].tobytes()
AUTO = "auto"  # Inference-Header-Content-Length: the JSON's real length


def case(
    name: str,
    code: str,
    header: dict[str, Any],
    binary: bytes = GOOD_X,
    *,
    model: str = "mlp",
    hlen: str | None = AUTO,
) -> Any:
    """One refusal: POST ``header`` + ``binary`` to ``model`` with ``hlen`` as the header (None: none)."""
    return pytest.param(model, header, binary, hlen, code, id=name)


SHM = {"shared_memory_region": "r", "shared_memory_byte_size": 32}
REFUSALS = [
    case("header-beyond-body", "bad_header_length", {"inputs": [x_input(32)]}, hlen="99999"),
    case("header-not-a-number", "bad_header_length", {"inputs": [x_input(32)]}, hlen="12abc"),
    case("header-negative", "bad_header_length", {"inputs": [x_input(32)]}, hlen="-5"),
    case("binary-without-header", "bad_header_length", {"inputs": [x_input(32)]}, b"", hlen=None),
    case("size-not-the-shape", "binary_size_mismatch", {"inputs": [x_input(28)]}, GOOD_X[:28]),
    case("size-past-the-body", "binary_size_mismatch", {"inputs": [x_input(64)]}),
    case("bytes-after-the-inputs", "binary_size_mismatch", {"inputs": [x_input(32)]}, GOOD_X + b"\0" * 4),
    case("unknown-datatype", "wrong_datatype", {"inputs": [x_input(32, datatype="FP8")]}),
    case("other-datatype", "wrong_datatype", {"inputs": [x_input(32, [1, 4], "FP64")]}),
    case("wrong-shape", "wrong_shape", {"inputs": [x_input(32, [2, 4])]}),
    case("negative-size", "bad_request", {"inputs": [x_input(-1)]}),
    case("data-and-binary", "bad_request", {"inputs": [x_input(32) | {"data": [0.0] * 8}]}),
    case(
        "binary-output-not-bool",
        "bad_request",
        {"inputs": [x_input(32)], "parameters": {"binary_data_output": "yes"}},
    ),
    case(
        "shared-memory-input",
        "unsupported_parameter",
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "parameters": SHM}]},
        b"",
    ),
    case(
        "classification",
        "unsupported_parameter",
        {"inputs": [x_input(32)], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
    ),
    case("json-cut-short", "malformed_json", {"inputs": [x_input(32)]}, hlen="20"),
    case(
        "bool-byte-not-0-or-1",
        "bad_tensor",
        types_header(9, b={"data": None, "parameters": {"binary_data_size": 2}}),
        b"\x01\x02" + bytes_elements(b"hello"),
        model="types",
    ),
    case("bytes-not-utf8", "bad_tensor", types_header(6), bytes_elements(b"\xff\xfe"), model="types"),
    case(
        "bytes-length-past-end",
        "binary_size_mismatch",
        types_header(9),
        struct.pack("<I", 50) + b"hello",
        model="types",
    ),
    case(
        "bytes-too-few-elements",
        "binary_size_mismatch",
        types_header(9, s={"shape": [2]}),
        bytes_elements(b"hello"),
        model="types",
    ),
]


@pytest.mark.parametrize(("model", "header", "binary", "hlen", "code"), REFUSALS)
def test_refusals(
    served: Served, model: str, header: dict[str, Any], binary: bytes, hlen: str | None, code: str
) -> None:
    body, headers = framed(header, binary)
    if hlen is None:
        del headers["Inference-Header-Content-Length"]
    elif hlen != AUTO:
        headers["Inference-Header-Content-Length"] = hlen
    with httpx.Client(base_url=served.url) as c:
        r = c.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        doc = r.json()
        assert doc["code"] == code and isinstance(doc["error"], str) and doc["error"], doc
        # the next good request on the same connection is served
        good, good_headers = framed({"inputs": [x_input(32)]}, GOOD_X)
        assert c.post("/v2/models/mlp/infer", content=good, headers=good_headers).status_code == 200


def test_tritonclient_sees_the_refusal_message(client: Any) -> None:
    inp = triton.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as ei:
        client.infer("mlp", [inp])
    assert ei.value.status() == "400" and "shape [1, 4], the model expects ['?', 8]" in ei.value.message()


# --- zero copy, and data capture ---------------------------------------------------------------


def test_binary_inputs_are_views_of_the_body() -> None:
    body = b"\0" * 5 + np.arange(6, dtype="<f4").tobytes()
    arr = from_binary("FP32", [2, 3], memoryview(body)[5:], "x")
    assert np.shares_memory(arr, np.frombuffer(body, dtype=np.uint8)) and not arr.flags.writeable
    assert arr.tolist() == [[0, 1, 2], [3, 4, 5]]


class ListSink:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def put(self, cls: Any, payload: bytes, priority: int | None = None, ts: float | None = None) -> bool:
        self.records.append(payload)
        return True


def test_a_captured_binary_exchange_is_recorded_as_json(client: Any, served: Served) -> None:
    sink = ListSink()
    served.img.capturer = Capturer(sink, CaptureSettings(enabled=True, sample_rate=1.0), {"device_id": "d"})
    try:
        result = client.infer("mlp", [mlp_input(True)])
    finally:
        served.img.capturer = None
    (rec,) = [json.loads(r) for r in sink.records]
    (inp,) = rec["input"]["inputs"]
    assert inp["datatype"] == "FP32" and inp["shape"] == [5, 8]
    np.testing.assert_array_equal(np.asarray(inp["data"], dtype=np.float32).reshape(5, 8), X)
    (out,) = rec["output"]["outputs"]
    np.testing.assert_array_equal(
        np.asarray(out["data"], dtype=np.float32).reshape(5, 3), result.as_numpy("y")
    )
    assert rec["input"]["parameters"] == {"binary_data_output": True}
