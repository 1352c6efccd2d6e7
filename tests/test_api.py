"""The scoring API's transport and access options on a real server: a Unix socket, a bearer token,
the body cap, and execution-provider selection with fallback."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.serving.api import ApiServer, ScoringApp
from agent.serving.runtime import CPU, Runtime, RuntimeSettings, choose_providers, load_model
from agent.serving.scoring import Scorer
from agent.telemetry.metrics import Metrics
from agent.update.store import BundleStore
from deploy.bundle import build_image
from simulators import models


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    tmp = tmp_path_factory.mktemp("api")
    model = models.mlp(tmp / "mlp.onnx", sizes=(8, 16, 3))
    built = build_image(tmp / "mlp-1.tar", "mlp", "1", {"mlp": model})
    store = BundleStore(tmp / "store")
    store.install(built.sha256, built.path, "mlp", "1")
    rt = Runtime(RuntimeSettings((CPU,), 1, 1))
    rt.swap(rt.load(store.image_dir(built.sha256)))
    yield rt
    rt.close()


def serve(runtime: Runtime, listen: str, token: str | None = None, max_body: int = 1 << 20) -> ApiServer:
    app = ScoringApp(
        runtime, Scorer(), Metrics(), max_body=max_body, token=token, executor=ThreadPoolExecutor(2)
    )
    srv = ApiServer(app, listen)
    srv.start()
    return srv


BODY = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}


def test_unix_socket(runtime: Runtime, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "api.sock"
    srv = serve(runtime, f"unix:{sock}")
    try:
        assert sock.stat().st_mode & 0o777 == 0o660
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent") as c:
            r = c.post("/v2/models/mlp/infer", json=BODY)
            assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 3]
    finally:
        srv.stop()
    assert not sock.exists()


def test_bearer_token(runtime: Runtime) -> None:
    srv = serve(runtime, "127.0.0.1:0", token="s3cret-token")
    try:
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/v2/health/ready").status_code == 200  # probes need no token
            r = c.post("/v2/models/mlp/infer", json=BODY)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            bad = c.post("/v2/models/mlp/infer", json=BODY, headers={"Authorization": "Bearer wrong"})
            assert bad.status_code == 401
            assert c.get("/metrics").status_code == 401
            ok = c.post("/v2/models/mlp/infer", json=BODY, headers={"Authorization": "Bearer s3cret-token"})
            assert ok.status_code == 200
    finally:
        srv.stop()


def test_body_cap_is_enforced_while_streaming(runtime: Runtime) -> None:
    srv = serve(runtime, "127.0.0.1:0", max_body=2048)
    try:
        with httpx.Client(base_url=srv.url) as c:

            def chunks() -> Iterator[bytes]:
                yield b'{"inputs": ['
                for _ in range(1000):
                    yield b" " * 1024

            r = c.post("/v2/models/mlp/infer", content=chunks())
            assert r.status_code == 413 and r.json()["code"] == "body_too_large"
        with httpx.Client(base_url=srv.url) as c:
            assert c.post("/v2/models/mlp/infer", json=BODY).status_code == 200
    finally:
        srv.stop()


def test_loopback_by_default() -> None:
    from agent.config import ApiConfig

    assert ApiConfig().listen.startswith("127.0.0.1:")


def test_provider_choice_and_fallback(tmp_path: Path) -> None:
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU], [CPU]) == [CPU]
    assert choose_providers(["CUDAExecutionProvider"], ["CUDAExecutionProvider", CPU]) == [
        "CUDAExecutionProvider",
        CPU,
    ]
    assert choose_providers([], ["X", CPU]) == [CPU]  # CPU is always the last resort
    model = models.mlp(tmp_path / "m.onnx", sizes=(4, 2))
    m = load_model(
        "m", model, RuntimeSettings(("NoSuchExecutionProvider", "CUDAExecutionProvider", CPU), 1, 1)
    )
    assert m.provider == CPU
    out = m.infer({"x": np.ones((1, 4), dtype=np.float32)})
    assert out["y"].shape == (1, 2)


def test_a_model_that_is_not_onnx_is_a_clear_load_error(tmp_path: Path) -> None:
    from edge_core.errors import ModelLoadError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError) as ei:
        load_model("bad", bad, RuntimeSettings((CPU,), 1, 1))
    assert ei.value.code == "model_load_failed" and "bad.onnx" in ei.value.message
