"""Azure ML compatibility, measured: the same score.py files answer the same requests under
Microsoft's azureml-inference-server-http 1.5.1 and under the edge agent, answer by answer.

Both sides are real: the peer is ``azmlinfsrv`` started as a user starts it (``cd <dir with
score.py> && AZUREML_MODEL_DIR=... azmlinfsrv --entry_script score.py --port N``) from the
``.venv-azureml`` that ``bash dev.sh setup`` creates; the agent is a real agent process
(simulators/rig.py) to which each script is deployed as an image built by ``build_image``, with the
inference-schema wheels dev.sh downloads. The model is the same ONNX file on both sides, run by
onnxruntime in the script. Each request goes to both with an httpx client's default settings; the
status, content type, body, and Azure ML's headers (``x-ms-run-function-failed``,
``x-ms-run-fn-exec-ms``, the request ids, ``TraceId``, the headers an AMLResponse adds) must be the
same. Where the agent differs on purpose the case says so, with the reason, and the test checks
that it really differs there (so a stale excuse fails too).

Without ``.venv-azureml`` (``bash dev.sh setup`` not run) the side-by-side cases are skipped; the
agent-only checks at the end still run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.bundle import build_image
from edge_core.errors import BuildError
from simulators import models
from simulators.rig import AgentProcess, Rig, wait_until

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).with_name("azureml_scripts")
AML_VENV = Path(os.environ.get("EDGE_AZUREML_VENV") or REPO / ".venv-azureml")
AZMLINFSRV = AML_VENV / "bin" / "azmlinfsrv"
IMAGE_WHEELS = AML_VENV / "image-wheels"
DEV = "dev-aml"
#: the scripts that import inference_schema: their images ship its wheels
SCHEMA_SCRIPTS = {"schema_numpy", "schema_std"}

peer_available = AZMLINFSRV.exists() and any(IMAGE_WHEELS.glob("inference_schema-*.whl"))
needs_peer = pytest.mark.skipif(
    not peer_available,
    reason=f"{AML_VENV} has no azmlinfsrv or image-wheels/: run `bash dev.sh setup`, which creates it",
)

#: Differences on every answer, with the reason a user accepts them.
ALWAYS_DIFFERENT = {
    "x-ms-server-version": "names the server that answered: edge-agent/<version>, not azmlinfsrv/1.5.1",
    "error code": 'errors carry the agent\'s stable "code" next to Azure ML\'s "message" (an extra field)',
}
SWAGGER_INFO = (
    "the swagger's info names the image and its version where Azure ML's local server says "
    '"ML service" 1.0 (its cloud deployments put the service\'s name there)'
)
#: Headers compared value for value (ids are compared as relations, exec-ms as a number).
SAME_HEADERS = ("x-ms-run-function-failed", "traceid", "x-model", "allow")
ID_HEADERS = ("x-request-id", "x-ms-request-id", "x-ms-client-request-id")


@dataclass(frozen=True)
class Case:
    script: str
    name: str
    method: str = "POST"
    path: str = "/score"
    json: Any = None
    content: bytes | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    data: Mapping[str, str] | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: aspect (``status``, ``content-type``, ``body``, ``body.<key>``, a header name) -> why the
    #: agent answers differently there on purpose
    differs: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.script}-{self.name}"


X1 = [[1.0, 2.0, 3.0, 4.0]]
X2 = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.1, 0.2, 0.3]]
NUMPY_DIFF = (
    "the agent writes numpy arrays and scalars with tolist()/item(), where Azure ML's json.dumps fails "
    "(500): a script that fails there works here, and one that works there answers the same"
)


def _cases() -> list[Case]:
    c: list[Case] = []
    s = "plain"
    c += [
        Case(s, "post-json", json={"data": X2}),
        Case(s, "post-not-json", content=b"not json"),
        Case(s, "post-not-utf8", content=b"\xff\xfe"),
        Case(s, "get-without-query", "GET"),
        Case(s, "get-query", "GET", "/score?data=[[1,2,3,4]]"),
        Case(s, "options", "OPTIONS"),
        Case(s, "head", "HEAD"),
        Case(s, "put", "PUT", json={"data": X1}),
        Case(s, "liveness", "GET", "/"),
        Case(s, "liveness-head", "HEAD", "/"),
        Case(s, "liveness-post", "POST", "/", content=b"x"),
        Case(s, "liveness-options", "OPTIONS", "/"),
        Case(s, "swagger-options", "OPTIONS", "/swagger.json"),
        Case(s, "swagger-post", "POST", "/swagger.json", json={}),
        Case(s, "unknown-route", "GET", "/nope"),
        Case(s, "unknown-route-put", "PUT", "/nope"),
        Case(s, "swagger-default", "GET", "/swagger.json", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-3", "GET", "/swagger.json?version=3", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-3.1", "GET", "/swagger.json?version=3.1", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-2.0", "GET", "/swagger.json?version=2.0", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-invalid", "GET", "/swagger.json?version=7"),
        Case(s, "swagger-empty", "GET", "/swagger.json?version="),
        Case(
            s,
            "ids-given",
            json={"data": X1},
            headers=[("x-request-id", "req-1"), ("x-ms-client-request-id", "cli-1")],
        ),
        Case(s, "ids-legacy", json={"data": X1}, headers=[("x-ms-request-id", "legacy-1")]),
        Case(
            s,
            "ids-both-legacy",
            json={"data": X1},
            headers=[("x-ms-request-id", "l"), ("x-ms-client-request-id", "c")],
        ),
        Case(s, "id-too-long", json={"data": X1}, headers=[("x-request-id", "r" * 101)]),
        Case(s, "id-100", json={"data": X1}, headers=[("x-request-id", "r" * 100)]),
        Case(s, "legacy-id-too-long", json={"data": X1}, headers=[("x-ms-request-id", "l" * 101)]),
        Case(s, "client-id-too-long", json={"data": X1}, headers=[("x-ms-client-request-id", "c" * 101)]),
        Case(s, "liveness-id-too-long", "GET", "/", headers=[("x-request-id", "r" * 101)]),
        Case(s, "trace-id", json={"data": X1}, headers=[("TraceId", "trace-1")]),
    ]
    s = "odd"
    c += [
        Case(s, f"returns-{kind}", json={"return": kind})
        for kind in ("none", "bytes", "string", "json_string", "raise")
    ]
    c += [
        Case(
            s,
            "returns-numpy",
            json={"return": "numpy"},
            differs={"status": NUMPY_DIFF, "body": NUMPY_DIFF, "x-ms-run-fn-exec-ms": NUMPY_DIFF},
        ),
        Case(
            s,
            "request-headers",
            json={"return": "headers"},
            headers=[("X-Custom-A", "1"), ("x-custom-b", "2"), ("X-Custom-Dup", "a"), ("X-Custom-Dup", "b")],
        ),
        Case(s, "request-header-with-underscore", json={"return": "headers"}, headers=[("x_custom_u", "u")]),
        Case(s, "text-body", content=b"plain text"),
        Case(s, "empty-body", content=b""),
        Case(s, "get-query-types", "GET", "/score?a=1&b=[1,2]&c=a&d=null&foo=x&foo=y&e=&f=%7B%22k%22%3A1%7D"),
        Case(s, "post-with-query", "POST", "/score?q=1", json={"return": "echo"}),
        Case(s, "unicode", json={"text": "h\u00e9llo \u2603"}),
    ]
    s = "schema_numpy"
    c += [
        Case(s, "post", json={"data": X2}),
        Case(s, "wrong-shape", json={"data": [[1, 2, 3]]}),
        Case(s, "not-a-list", json={"data": "text"}),
        Case(s, "missing-parameter", json={"other": 1}),
        Case(s, "not-an-object", json=[1]),
        Case(s, "empty-body", content=b"", headers=[("content-type", "application/json")]),
        Case(s, "bad-json", content=b"{bad", headers=[("content-type", "application/json")]),
        Case(s, "json-not-utf8", content=b'{"data": "\xff"}', headers=[("content-type", "application/json")]),
        Case(s, "no-content-type", content=json.dumps({"data": X1}).encode()),
        Case(
            s, "text-content-type", content=b'{"data": [[1,2,3,4]]}', headers=[("content-type", "text/plain")]
        ),
        Case(
            s,
            "vendor-json-content-type",
            content=b'{"data": [[1,2,3,4]]}',
            headers=[("content-type", "application/vnd.edge+json; charset=utf-8")],
        ),
        Case(s, "get-query", "GET", "/score?data=[[1,2,3,4]]"),
        Case(s, "get-without-query", "GET"),
        Case(s, "options", "OPTIONS"),
        Case(s, "head", "HEAD"),
        Case(s, "swagger-2", "GET", "/swagger.json?version=2", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-3", "GET", "/swagger.json?version=3", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-3.1", "GET", "/swagger.json?version=3.1", differs={"body.info": SWAGGER_INFO}),
    ]
    s = "schema_std"
    c += [
        Case(s, "post-default-parameter", json={"Inputs": {"data": X1}}),
        Case(
            s, "post-both-parameters", json={"Inputs": {"data": X2}, "GlobalParameters": {"method": "argmax"}}
        ),
        Case(s, "wrong-type", json={"Inputs": X1}),
        Case(s, "missing-parameter", json={"GlobalParameters": {"method": "argmax"}}),
        Case(s, "get-query", "GET", '/score?Inputs={"data":[[1,2,3,4]]}'),
        Case(s, "swagger-2", "GET", "/swagger.json", differs={"body.info": SWAGGER_INFO}),
        Case(s, "swagger-3", "GET", "/swagger.json?version=3", differs={"body.info": SWAGGER_INFO}),
    ]
    s = "rawhttp"
    c += [
        Case(
            s,
            "get-request",
            "GET",
            "/score?mode=request&a=1&a=2&b=%20x",
            headers=[("X-Custom-Header", "hdr")],
        ),
        Case(s, "get-full-path", "GET", "/score?k=v"),
        Case(s, "get-without-query", "GET"),
        Case(s, "options", "OPTIONS"),
        Case(s, "post-aml-response", json={"data": X2}),
        Case(s, "returns-503", "POST", "/score?mode=fail", json={}),
        Case(s, "returns-bytes", "POST", "/score?mode=bytes", content=b"\x00\xffraw"),
        Case(s, "returns-none", "POST", "/score?mode=none", json={}),
        Case(s, "raises", "POST", "/score?mode=raise", json={}),
        Case(s, "returns-dict", "POST", "/score?mode=dict", content=b"abc"),
        Case(s, "get-json-refuses-text", content=b"not json"),
        Case(
            s,
            "multipart",
            "POST",
            "/score?mode=form",
            files={"image": ("cat.png", b"\x89PNG\r\n\x00" * 10, "image/png")},
            data={"note": "h\u00e9"},
        ),
        Case(s, "urlencoded-form", "POST", "/score?mode=form", data={"a": "1", "b": "two words"}),
        Case(s, "put", "PUT", json={}),
    ]
    return c


CASES = _cases()


# --- the two servers -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """azmlinfsrv serving one script, started as its docs say."""

    def __init__(self, workdir: Path, script: str, model_dir: Path) -> None:
        self.app = workdir / f"peer-{script}"
        self.app.mkdir(parents=True, exist_ok=True)
        shutil.copy(SCRIPTS / f"{script}.py", self.app / "score.py")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "AZUREML_MODEL_DIR": str(model_dir)}
        env.pop("PYTHONPATH", None)  # nothing of the agent's checkout may leak into Microsoft's server
        self.log = self.app / "azmlinfsrv.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(AZMLINFSRV), "--entry_script", "score.py", "--port", str(self.port)],
                cwd=self.app,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"azmlinfsrv did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class World:
    """One real agent, to which one script after the other is deployed, and the peer of the moment."""

    def __init__(self, rig: Rig, agent: AgentProcess, model: Path) -> None:
        self.rig, self.agent, self.model = rig, agent, model
        self.generation = 0
        self.script: str | None = None
        self.peer: Peer | None = None
        self.api = ""

    def deploy(self, script: str | None, **manifest: Any) -> str:
        """Deploy ``script`` (None: an image without score.py) to the agent; its API's URL."""
        self.generation += 1
        name = f"aml-{(script or 'model').replace('_', '-')}"
        out = self.rig.bundles_dir / f"{name}-{self.generation}.tar"
        wheels = sorted(IMAGE_WHEELS.glob("*.whl")) if script in SCHEMA_SCRIPTS else []
        score = SCRIPTS / f"{script}.py" if script else None
        build_image(out, name, str(self.generation), {"mlp": self.model}, score=score, wheels=wheels)
        self.rig.deploy(DEV, self.rig.manifest(DEV, out, self.generation, **manifest))
        status = self.rig.wait_active(DEV, self.generation, timeout=120)
        self.api = str(status["runtime"]["api"])
        return self.api

    def serving(self, script: str) -> tuple[str, str]:
        """(peer URL, agent URL) serving ``script``."""
        if self.script != script:
            if self.peer is not None:
                self.peer.stop()
                self.peer = None
            self.script = None
            self.deploy(script)
            self.peer = Peer(self.rig.workdir, script, self.model.parent)
            self.script = script
        assert self.peer is not None
        return self.peer.url, self.api

    def close(self) -> None:
        if self.peer is not None:
            self.peer.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Rig(tmp_path_factory.mktemp("aml")) as rig:
        outbox = rig.workdir / "outbox"  # where captured requests are uploaded (a local blob store)
        outbox.mkdir()
        agent = rig.add_device(DEV, {
            "runtime": {"workers": 1, "request_timeout": 20},
            "telemetry": {"interval": 0.5, "flush_interval": 0.05},
            "sync": {"url": outbox.as_uri(), "interval": 0.3, "max_batch_age": 0.5, "batch_max_records": 50},
        }).start()  # fmt: skip
        models_dir = rig.workdir / "models"
        model = models.mlp(models_dir / "mlp.onnx", sizes=(4, 8, 3))
        w = World(rig, agent, model)
        try:
            yield w
        finally:
            w.close()


# --- comparing answers --------------------------------------------------------------------------------


def send(base: str, case: Case) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as client:
        kwargs: dict[str, Any] = {"headers": case.headers}
        if case.json is not None:
            kwargs["json"] = case.json
        elif case.content is not None:
            kwargs["content"] = case.content
        if case.files is not None:
            kwargs["files"] = case.files
        if case.data is not None:
            kwargs["data"] = case.data
        return client.request(case.method, case.path, **kwargs)


def _body(r: httpx.Response) -> Any:
    try:
        return json.loads(r.content)
    except ValueError:
        return r.content


def _ids(r: httpx.Response, sent: Mapping[str, str]) -> dict[str, str | None]:
    """The id headers, with an id the server generated (not sent) written as ``<generated>``: its
    value is random, what matters is which headers carry it."""
    out: dict[str, str | None] = {h: r.headers.get(h) for h in ID_HEADERS}
    generated = r.headers.get("x-request-id")
    if generated is not None and "x-request-id" not in sent:
        assert re.fullmatch(r"[0-9a-f-]{36}", generated), generated  # a uuid4, as Azure ML's
        out = {h: "<generated>" if v == generated else v for h, v in out.items()}
    return out


def _listed(r: httpx.Response, name: str) -> Any:
    """Every header of that name, in order: an AMLResponse's ``{"X-Model": "a, b"}`` is two headers.
    Flask's automatic ``Allow`` lists its methods in set order (random per process): compared as a
    set, with the number of header lines."""
    values = r.headers.get_list(name)
    if name == "allow" and values:
        return len(values), sorted(r.headers.get_list(name, split_commas=True))
    return values or None


def differences(case: Case, peer: httpx.Response, agent: httpx.Response) -> dict[str, str]:
    """Every aspect in which the agent's answer is not the peer's, with both values."""
    diffs: dict[str, str] = {}

    def check(aspect: str, p: Any, a: Any) -> None:
        if p != a:
            diffs[aspect] = f"Azure ML: {p!r}, agent: {a!r}"

    check("status", peer.status_code, agent.status_code)
    check("content-type", peer.headers.get("content-type"), agent.headers.get("content-type"))
    pb, ab = _body(peer), _body(agent)
    if isinstance(pb, dict) and isinstance(ab, dict):
        if set(pb) == {"message"} and "message" in ab:  # an error: the agent adds its code (ALWAYS_DIFFERENT)
            assert isinstance(ab.get("code"), str) and ab["code"], ab
            ab = {k: v for k, v in ab.items() if k != "code"}
        for key in [k for k in case.differs if k.startswith("body.")]:
            check(key, pb.pop(key[5:], None), ab.pop(key[5:], None))
    check("body", pb, ab)
    sent = {k.lower(): v for k, v in case.headers}
    check("ids", _ids(peer, sent), _ids(agent, sent))
    for h in SAME_HEADERS:
        check(h, _listed(peer, h), _listed(agent, h))
    exec_ms = [r.headers.get("x-ms-run-fn-exec-ms") for r in (peer, agent)]
    for v in exec_ms:
        assert v is None or re.fullmatch(r"\d+\.\d{3}", v), v  # milliseconds, 3 decimals, as Azure ML's
    check("x-ms-run-fn-exec-ms", exec_ms[0] is not None, exec_ms[1] is not None)
    # ALWAYS_DIFFERENT: both name themselves where Azure ML does
    check(
        "x-ms-server-version present",
        "x-ms-server-version" in peer.headers,
        "x-ms-server-version" in agent.headers,
    )
    if "x-ms-server-version" in agent.headers:
        assert agent.headers["x-ms-server-version"].startswith("edge-agent/")
    return diffs


def test_before_any_image_score_is_503_in_azure_mls_shape(world: World) -> None:
    """First in this file: the agent has no image yet."""
    status = world.rig.wait_status(DEV, lambda st: bool((st.get("runtime") or {}).get("api")), timeout=30)
    with httpx.Client(base_url=str(status["runtime"]["api"]), timeout=30) as c:
        r = c.post("/score", json={"data": X1}, headers={"x-request-id": "early"})
        assert r.status_code == 503, r.text
        assert r.json() == {"message": "no image is active on this device", "code": "no_image"}
        assert r.headers["x-request-id"] == "early" and r.headers["x-ms-run-function-failed"] == "False"
        assert c.get("/").text == "Healthy"  # alive, even without an image
        assert c.get("/swagger.json").status_code == 503


@needs_peer
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_agent_answers_as_azure_ml_does(world: World, case: Case) -> None:
    peer_url, agent_url = world.serving(case.script)
    peer, agent = send(peer_url, case), send(agent_url, case)
    diffs = differences(case, peer, agent)
    unexplained = {k: v for k, v in diffs.items() if k not in case.differs}
    assert not unexplained, f"{case.id}: the agent answers differently: {unexplained}"
    stale = sorted(set(case.differs) - set(diffs))
    assert not stale, f"{case.id}: declared differences that are not there (any more): {stale}"
    assert world.agent.running


@needs_peer
def test_every_script_mode_was_compared() -> None:
    """The cases cover each way Azure ML calls run(), and each comparison can fail (above: a
    difference not declared fails, a declared one that is not there fails)."""
    assert {c.script for c in CASES} == {"plain", "odd", "schema_numpy", "schema_std", "rawhttp"}


# --- the agent alone: what Azure ML's server has no counterpart for ----------------------------------


def test_score_without_score_py_speaks_azure_ml(world: World) -> None:
    """An image without score.py: /score takes ``{"data": ...}`` by POST or as a GET's query
    parameters, with Azure ML's headers and error shape; /v2 keeps its own."""
    world.script = None  # the next side-by-side case deploys its script again
    capture = {"enabled": True, "sample_rate": 1.0, "capture": "both"}
    with httpx.Client(base_url=world.deploy(None, data_collection=capture), timeout=30) as c:
        post = c.post("/score", json={"data": X1}, headers={"x-ms-client-request-id": "cli"})
        assert post.status_code == 200 and set(post.json()) == {"y"}, post.text
        assert post.headers["x-ms-client-request-id"] == post.headers["x-ms-request-id"] == "cli"
        given = c.post("/score", json={"data": X2}, headers={"x-request-id": "given-1"})
        assert given.headers["x-request-id"] == "given-1"
        assert post.headers["x-ms-run-function-failed"] == "False"
        assert float(post.headers["x-ms-run-fn-exec-ms"]) >= 0
        get = c.get("/score", params={"data": json.dumps(X1)})
        assert get.status_code == 200 and get.json() == post.json()
        bad = c.post("/score", content=b"{")
        assert bad.status_code == 400 and bad.json()["code"] == "malformed_json" and bad.json()["message"]
        assert set(bad.json()) == {"message", "code"}
        assert c.options("/score").status_code == 200
        assert c.get("/").text == "Healthy"
        doc = c.get("/swagger.json").json()
        assert doc["swagger"] == "2.0" and doc["info"]["title"] == "aml-model"
        # /v2 keeps the Open Inference Protocol's error shape
        v2 = c.post("/v2/models/mlp/infer", json={"inputs": "not a list"})
        assert v2.status_code == 400 and set(v2.json()) == {"error", "code"}
        assert c.get("/v2/nope").json()["code"] == "not_found"
    # The capture records carry the request id the client got back, generated or given.
    want = {post.headers["x-request-id"], given.headers["x-request-id"]}

    def captured() -> set[str]:
        ids = set()
        for p in (world.rig.workdir / "outbox").glob(f"{DEV}/capture/*/*/*/*.jsonl.gz"):
            ids |= {json.loads(line)["request_id"] for line in gzip.decompress(p.read_bytes()).splitlines()}
        return ids

    assert wait_until(lambda: want <= captured(), timeout=30), (want, captured())


def test_image_build_requires_the_inference_schema_wheel(tmp_path: Path) -> None:
    """A score.py that imports inference_schema cannot run on a device without its wheel: refused
    at build time with the command that fetches the wheels."""
    model = models.mlp(tmp_path / "mlp.onnx", sizes=(4, 3))
    with pytest.raises(BuildError) as e:
        build_image(tmp_path / "x.tar", "x", "1", {"mlp": model}, score=SCRIPTS / "schema_numpy.py")
    assert "inference_schema" in e.value.message and "--wheel" in e.value.message
    assert "pip download" in e.value.message
    # the shim's modules need nothing: a @rawhttp script builds without wheels
    build_image(tmp_path / "raw.tar", "raw", "1", {"mlp": model}, score=SCRIPTS / "rawhttp.py")
