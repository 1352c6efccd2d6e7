"""The Azure ML scoring contract end to end: an image with score.py (and a pinned wheel it imports)
is deployed through the real broker to a real agent; run() raising, hanging past its timeout, or
killing its worker process each get the right HTTP status with a JSON error, the agent stays up,
and the next good request succeeds."""

from __future__ import annotations

import base64
import hashlib
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from deploy.bundle import SmokeTest, build_image
from simulators import models
from simulators.rig import AgentProcess, Rig

DEV = "dev-score"
X = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)

SCORE_PY = """
import json, os, time
import numpy as np
import onnxruntime as ort
import edgehelper  # from the wheel shipped in the image

def init():
    global sess
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    print("init done")  # must not disturb the protocol

def run(raw_data):
    req = json.loads(raw_data)
    mode = req.get("mode")
    if mode == "raise":
        raise ValueError("the caller asked for an error")
    if mode == "hang":
        time.sleep(60)
    if mode == "exit":
        os._exit(3)
    y = sess.run(None, {"x": np.asarray(req["data"], dtype=np.float32)})[0]
    return {"y": y.tolist(), "helper": edgehelper.VERSION}
"""


def make_wheel(out_dir: Path) -> Path:
    """A tiny pure-Python wheel, built by hand: the device installs it offline into the image's env."""
    whl = out_dir / "edgehelper-1.2.3-py3-none-any.whl"
    files = {
        "edgehelper/__init__.py": b'VERSION = "1.2.3"\n',
        "edgehelper-1.2.3.dist-info/METADATA": b"Metadata-Version: 2.1\nName: edgehelper\nVersion: 1.2.3\n",
        "edgehelper-1.2.3.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append("edgehelper-1.2.3.dist-info/RECORD,,")
        z.writestr("edgehelper-1.2.3.dist-info/RECORD", "\n".join(record) + "\n")
    return whl


class Env:
    def __init__(self, rig: Rig, agent: AgentProcess, client: httpx.Client, want: np.ndarray) -> None:
        self.rig, self.agent, self.client, self.want = rig, agent, client, want

    def good(self) -> None:
        r = self.client.post("/score", json={"data": X.tolist()})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["helper"] == "1.2.3"
        np.testing.assert_allclose(np.array(doc["y"]), self.want, rtol=1e-5)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with Rig(tmp_path_factory.mktemp("score")) as rig:
        agent = rig.add_device(DEV, {"runtime": {"request_timeout": 1.5, "workers": 1}}).start()
        src = rig.workdir / "src"
        src.mkdir()
        model = models.mlp(src / "mlp.onnx", seed=5)
        (src / "score.py").write_text(SCORE_PY)
        want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
        smoke = SmokeTest({"data": X[:1].tolist()}, {"y": want[:1].tolist(), "helper": "1.2.3"})
        b = rig.bundles_dir / "scored-1.tar"
        build_image(
            b,
            "scored",
            "1",
            {"mlp": model},
            score=src / "score.py",
            wheels=[make_wheel(src)],
            smoke_test=smoke,
        )
        rig.deploy(DEV, rig.manifest(DEV, b, 1))
        status = rig.wait_active(DEV, 1, timeout=90)
        with httpx.Client(base_url=status["runtime"]["api"], timeout=30) as client:
            yield Env(rig, agent, client, want)


def test_score_py_answers_through_its_worker(env: Env) -> None:
    env.good()
    assert env.client.get("/v2/health/ready").status_code == 200
    assert "init done" in env.agent.log_text()  # the script's print went to the log


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"mode": "raise"}, 500, "score_failed"),
        ({"mode": "hang"}, 504, "score_timeout"),
        ({"mode": "exit"}, 503, "worker_unavailable"),
        ({"data": "not a tensor"}, 500, "score_failed"),
    ],
    ids=["raises", "hangs", "exits", "bad-data"],
)
def test_user_code_failures_are_contained(env: Env, body: dict[str, Any], status: int, code: str) -> None:
    t0 = time.monotonic()
    r = env.client.post("/score", json=body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["message"]
    assert r.headers["x-ms-run-function-failed"] == "True"  # Azure ML's flag for a failed run()
    if code == "score_timeout":
        assert time.monotonic() - t0 < 10  # the request timeout is 1.5 s
        assert r.json()["message"] == "Scoring timeout after 1500 ms"
    if code == "score_failed":
        # Azure ML's words to the client; the exception and its traceback are in the agent's log
        assert r.json()["message"].startswith("An unexpected error occurred in scoring script.")
        if body.get("mode") == "raise":
            assert "the caller asked for an error" not in r.text
            assert "the caller asked for an error" in env.agent.log_text()
    assert env.agent.running
    deadline = time.monotonic() + 20  # a killed worker is replaced; meanwhile the API answers 503
    while True:
        r = env.client.post("/score", json={"data": X.tolist()})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 503 and r.json()["code"] == "worker_unavailable", r.text
        time.sleep(0.1)
    env.good()


def test_the_image_env_has_the_wheel_and_the_agent_env_packages(env: Env) -> None:
    envs = list((env.agent.state_dir / "store" / "envs").iterdir())
    assert any((e / "bin" / "python").exists() for e in envs), envs
    env.good()  # score.py imported both edgehelper (the wheel) and numpy/onnxruntime (the agent's)
