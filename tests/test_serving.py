"""Images and local inference, end to end through the real broker: an image built from a model made
with onnx.helper is deployed, scored over HTTP through both APIs and compared with onnxruntime
called directly; v2 replaces it while a client scores continuously, with zero failed requests; bad
requests get the right status and a JSON error, and the next good request succeeds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from deploy import bundle
from deploy.bundle import SmokeTest
from simulators import models
from simulators.rig import AgentProcess, Rig

DEV = "dev-serve"
X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)


def direct(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(["y"], {"x": x})[0]
    return out


def v2_request(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


class Env:
    def __init__(self, rig: Rig, agent: AgentProcess) -> None:
        self.rig = rig
        self.agent = agent
        self.gen = 0
        self.models: dict[str, Path] = {}
        self.http: httpx.Client | None = None

    def image(self, version: str, seed: int, smoke_expected: Any = None) -> Path:
        src = self.rig.workdir / "models" / f"mlp-{version}.onnx"
        models.mlp(src, seed=seed)
        self.models[version] = src
        y = direct(src, X[:1])
        expected = smoke_expected or {
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 10], "data": y.ravel().tolist()}]
        }
        out = self.rig.bundles_dir / f"mlp-{version}.tar"
        if smoke_expected is None:
            bundle.build_image(
                out, "mlp", version, {"mlp": src}, smoke_test=SmokeTest(v2_request(X[:1]), expected)
            )
        else:  # a smoke test that cannot pass: the builder refuses those, so write bundle.json by hand
            bundle.build_image(out, "mlp", version, {"mlp": src})
            meta = bundle.read_metadata(out)
            meta["smoke_test"] = {
                "model": "mlp",
                "request": v2_request(X[:1]),
                "expected": expected,
                "rtol": 1e-4,
                "atol": 1e-6,
            }
            files = {name: self.rig.workdir / "src-hack" / name for name in meta["files"]}
            import tarfile

            with tarfile.open(out) as tar:
                tar.extractall(self.rig.workdir / "src-hack", filter="data")
            bundle.build(
                out,
                "mlp",
                version,
                files,
                extra={k: v for k, v in meta.items() if k not in ("format", "name", "version", "files")},
            )
        return out

    def deploy(self, b: Path) -> dict[str, Any]:
        self.gen += 1
        self.rig.deploy(DEV, self.rig.manifest(DEV, b, self.gen))
        return self.rig.wait_status(
            DEV,
            lambda s: (
                s.get("generation") == self.gen and s.get("state") in ("active", "failed", "rolled_back")
            ),
            timeout=60,
        )

    @property
    def client(self) -> httpx.Client:
        if self.http is None:
            status = self.rig.op.report(DEV) or {}
            self.http = httpx.Client(base_url=status["runtime"]["api"], timeout=10)
        return self.http


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Rig(tmp_path_factory.mktemp("serve")) as rig:
        agent = rig.add_device(DEV, {"api": {"listen": "127.0.0.1:0", "max_body_bytes": 64 * 1024}}).start()
        e = Env(rig, agent)
        status = e.deploy(e.image("1", seed=1))
        assert status["state"] == "active", status
        yield e
        if e.http is not None:
            e.http.close()


def test_both_apis_answer_what_onnxruntime_answers(env: Env) -> None:
    want = direct(env.models["1"], X)
    r = env.client.post("/v2/models/mlp/infer", json=v2_request(X))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [2, 10])
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 10), want, rtol=1e-6)
    assert r.json()["model_version"] == "1"

    r = env.client.post("/score", json={"data": X.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["y"]), want, rtol=1e-6)

    meta = env.client.get("/v2/models/mlp").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert env.client.get("/v2/health/live").status_code == 200
    assert env.client.get("/v2/health/ready").status_code == 200
    assert env.client.get("/v2/models/mlp/ready").status_code == 200


def test_status_and_inventory_report_provider_and_threads(env: Env) -> None:
    status = env.rig.op.report(DEV) or {}
    image = status["runtime"]["image"]
    assert image["models"]["mlp"]["provider"] == "CPUExecutionProvider"
    assert image["intra_op_num_threads"] == 1 and image["inter_op_num_threads"] == 1
    inv = env.rig.op.report(DEV, "inventory") or {}
    assert inv["runtime"]["intra_op_num_threads"] == 1


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v2/models/mlp/infer", b"{not json", 400, "malformed_json"),
        ("/score", b"[1, 2", 400, "malformed_json"),
        (
            "/v2/models/mlp/infer",
            {"inputs": [{"name": "x", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]},
            400,
            "wrong_shape",
        ),
        (
            "/v2/models/mlp/infer",
            {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]},
            400,
            "wrong_datatype",
        ),
        (
            "/v2/models/mlp/infer",
            {"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [0]}]},
            400,
            "unknown_input",
        ),
        ("/score", {"data": [[1.0, 2.0]]}, 400, "wrong_shape"),
        ("/v2/models/nope/infer", v2_request(X), 404, "unknown_model"),
        (
            "/v2/models/mlp/infer",
            {"inputs": [{"name": "x", "shape": [1000, 64], "datatype": "FP32", "data": [0.5] * 64000}]},
            413,
            "body_too_large",
        ),
    ],
    ids=[
        "malformed-v2",
        "malformed-score",
        "shape",
        "dtype",
        "unknown-input",
        "score-shape",
        "unknown-model",
        "too-large",
    ],
)
def test_bad_requests_get_a_clear_error_and_the_next_good_one_succeeds(
    env: Env, path: str, body: Any, status: int, code: str
) -> None:
    r = env.client.post(path, content=body) if isinstance(body, bytes) else env.client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    # /v2 errors have the Open Inference Protocol's shape, /score ones Azure ML's
    assert r.json()["code"] == code and r.json()["error" if path.startswith("/v2") else "message"]
    ok = env.client.post("/v2/models/mlp/infer", json=v2_request(X[:1]))
    assert ok.status_code == 200


def test_metrics_count_requests_errors_and_latency(env: Env) -> None:
    env.client.post("/v2/models/mlp/infer", json=v2_request(X[:1]))
    env.client.post("/v2/models/mlp/infer", content=b"{")
    text = env.client.get("/metrics").text
    assert 'edge_scoring_requests_total{model="mlp",status="200",version="1"}' in text
    assert 'edge_scoring_errors_total{model="mlp",status="400",version="1"}' in text
    assert 'edge_scoring_latency_seconds_bucket{le="0.0001",model="mlp",version="1"}' in text
    assert "edge_agent_process_resident_memory_bytes" in text
    assert 'edge_runtime_image_info{name="mlp"' in text


def test_swap_under_load_fails_no_request_and_answers_change(env: Env) -> None:
    current = env.rig.op.report(DEV)["active"]["version"]  # type: ignore[index]
    nxt = str(int(current) + 1)
    b = env.image(nxt, seed=int(nxt))
    want_old = direct(env.models[current], X[:1])
    want_new = direct(env.models[nxt], X[:1])
    # one list per client: each client's requests are sequential, so its answers are in time order
    per_client: list[list[tuple[int, str, np.ndarray | None]]] = [[], []]
    stop = threading.Event()

    def load(results: list[tuple[int, str, np.ndarray | None]]) -> None:
        with httpx.Client(base_url=env.client.base_url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v2/models/mlp/infer", json=v2_request(X[:1]))
                except httpx.HTTPError as exc:
                    results.append((0, repr(exc), None))
                    continue
                if r.status_code != 200:
                    results.append((r.status_code, r.text, None))
                    continue
                doc = r.json()
                results.append(
                    (200, doc["model_version"], np.array(doc["outputs"][0]["data"]).reshape(1, 10))
                )

    threads = [threading.Thread(target=load, args=(results,)) for results in per_client]
    for t in threads:
        t.start()
    time.sleep(0.3)
    status = env.deploy(b)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert status["state"] == "active", status
    results = per_client[0] + per_client[1]
    failures = [r for r in results if r[0] != 200]
    assert failures == [], failures[:5]
    for answers in per_client:
        versions = [r[1] for r in answers]
        assert versions[0] == current and versions[-1] == nxt
        switch = versions.index(nxt)
        assert set(versions[switch:]) == {nxt}  # no old answer after the first new one
    for _, v, y in results:
        np.testing.assert_allclose(y, want_new if v == nxt else want_old, rtol=1e-6)  # type: ignore[arg-type]


def test_a_failed_smoke_test_keeps_the_old_image_serving(env: Env) -> None:
    before = env.rig.op.report(DEV)["active"]  # type: ignore[index]
    wrong = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 10], "data": [0.0] * 10}]}
    status = env.deploy(env.image("99", seed=99, smoke_expected=wrong))
    assert status["state"] == "rolled_back", status
    assert status["error"]["code"] == "smoke_test_failed"
    assert "outputs" in status["error"]["message"]  # says where the answer differed
    assert status["active"]["sha256"] == before["sha256"] == env.agent.current_image()
    r = env.client.post("/v2/models/mlp/infer", json=v2_request(X[:1]))
    assert r.status_code == 200 and r.json()["model_version"] == before["version"]


def test_the_manifest_runtime_section_sets_threads_for_that_deployment(env: Env) -> None:
    current = env.rig.op.report(DEV)["active"]["version"]  # type: ignore[index]
    nxt = str(int(current) + 1)
    b = env.image(nxt, seed=int(nxt))
    env.gen += 1
    doc = env.rig.manifest(DEV, b, env.gen, runtime={"intra_op_num_threads": 2, "inter_op_num_threads": 1})
    env.rig.deploy(DEV, doc)
    status = env.rig.wait_active(DEV, env.gen)
    assert status["runtime"]["image"]["intra_op_num_threads"] == 2
    assert env.client.post("/v2/models/mlp/infer", json=v2_request(X[:1])).json()["model_version"] == nxt


def test_ragged_input_is_a_400_not_a_crash(env: Env) -> None:
    r = env.client.post("/score", json={"data": [[1.0, 2.0], [3.0]]})
    assert r.status_code == 400 and r.json()["code"] == "bad_tensor", r.text
    assert env.client.post("/v2/models/mlp/infer", json=v2_request(X[:1])).status_code == 200
