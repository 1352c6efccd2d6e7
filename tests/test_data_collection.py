"""Azure ML's data collector on the edge, on real parts: a real agent process serves score.py scripts
that use ``azureml.ai.monitoring.Collector`` and the legacy ``azureml.monitoring.ModelDataCollector``
(the agent's shims: no Azure package is installed), and its uploader writes what they collect, and the
scoring API's own request/response payloads, to Azurite in Azure ML's blob layouts. Each test reads
the blobs back as a user's monitoring job would, and counts and checks them.

Requests carry ``x-request-id`` values chosen here, and sampling is a function of that id, so the
exact set of requests a sampled collection keeps is known in advance: the counts are compared with
it exactly, and with the rate within a tolerance.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
from conftest_blob import Azurite

from agent.serving.worker import WorkerPool
from agent.telemetry import collections as col
from agent.telemetry.buffer import Buffer
from agent.telemetry.uploader import Uploader
from agent.update.state import StateDB
from cloud_sync.factory import open_backend
from deploy import collection as deploy_collection
from deploy.bundle import build_image
from edge_core import manifest as mf
from edge_core.errors import ControlPlaneError, ScoreFailed
from simulators import models
from simulators.rig import AgentProcess, Rig, wait_until

DEV = "dev-dc"
CONTAINER = "mdc"
REPO = Path(__file__).resolve().parent.parent
SHIM = REPO / "agent" / "serving" / "collector_shim"

SCORE_V2 = """
import json, os, sys
import numpy as np
import onnxruntime as ort
from azureml.ai.monitoring import Collector
from azureml.ai.monitoring.context import BasicCorrelationContext

def init():
    global sess, inputs_collector, outputs_collector, unused_collector, fragile_collector
    sess = ort.InferenceSession(os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx"),
                                providers=["CPUExecutionProvider"])
    inputs_collector = Collector(name="model_inputs")
    outputs_collector = Collector(name="model_outputs")
    unused_collector = Collector(name="debug_features")  # the deployment does not enable it

    def give_up(exc):
        raise RuntimeError("on_error gave up too")

    fragile_collector = Collector(name="model_inputs", on_error=give_up)

def run(raw_data):
    req = json.loads(raw_data)
    if req.get("poison"):
        fragile_collector.collect(object())  # not JSON: on_error runs, and raises
    rows = req["data"]
    own = BasicCorrelationContext(id=req["context"]) if req.get("context") else None
    context = inputs_collector.collect([dict(zip("abcd", r)) for r in rows], own)
    unused_collector.collect(rows)
    y = sess.run(None, {"x": np.asarray(rows, dtype=np.float32)})[0]
    outputs_collector.collect(y, context)  # a numpy array, correlated with the inputs
    return {"y": y.tolist(), "context": context.get_id(), "pandas_imported": "pandas" in sys.modules}
"""

SCORE_LEGACY = """
import json, os
import numpy as np
import onnxruntime as ort
from azureml.monitoring import ModelDataCollector

def init():
    global sess, inputs_dc, prediction_dc
    sess = ort.InferenceSession(os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx"),
                                providers=["CPUExecutionProvider"])
    inputs_dc = ModelDataCollector("mlp", designation="inputs", feature_names=["a", "b", "c", "d"])
    prediction_dc = ModelDataCollector("mlp", designation="predictions", feature_names=["y0", "y1"])

def run(raw_data):
    rows = np.asarray(json.loads(raw_data)["data"], dtype=np.float32)
    correlations = inputs_dc.collect(rows)  # a 2-D array: one CSV row per row
    y = sess.run(None, {"x": rows})[0]
    prediction_dc.collect(prediction_dc.add_correlations(y, correlations))
    return {"y": y.tolist()}
"""

FOUR = ("model_inputs", "model_outputs", "request", "response")
V2_FIELDS = {
    "specversion", "id", "source", "type", "datacontenttype", "time", "data", "correlationid",
    "xrequestid", "modelversion", "collectdatatype", "agent", "contentrange",
}  # fmt: skip


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    server.create_container(CONTAINER)
    yield server
    server.stop()


class Device:
    """One real agent uploading to Azurite; each test deploys its own image (its own endpoint name,
    so its own blob prefix) as the next generation."""

    def __init__(self, rig: Rig, agent: AgentProcess, url: str, workdir: Path) -> None:
        self.rig, self.agent, self.url, self.workdir = rig, agent, url, workdir
        self.generation = 0
        self.model = models.mlp(workdir / "mlp.onnx", sizes=(4, 8, 2))

    def deploy(self, name: str, score: str | None, data_collection: dict[str, Any]) -> str:
        script = None
        if score is not None:
            script = self.workdir / f"{name}.py"
            script.write_text(score)
        built = build_image(
            self.rig.bundles_dir / f"{name}-1.tar", name, "1", {"mlp": self.model}, score=script
        )
        self.generation += 1
        self.rig.deploy(
            DEV, self.rig.manifest(DEV, built.path, self.generation, data_collection=data_collection)
        )
        api: str = self.rig.wait_active(DEV, self.generation, timeout=60)["runtime"]["api"]
        return api

    def blobs(self, prefix: str) -> dict[str, bytes]:
        backend = open_backend(self.url, retries=0)
        try:
            return {n: backend.get(n) for n in backend.list(prefix)}
        finally:
            backend.close()

    def events(self, prefix: str) -> dict[str, list[dict[str, Any]]]:
        """Every JSON Lines record under ``prefix``, by collection, each with the blob it is in."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, data in self.blobs(prefix).items():
            for line in data.splitlines():
                rec = json.loads(line)
                rec["_blob"] = name
                out.setdefault(name[len(prefix) :].split("/")[0], []).append(rec)
        return out

    def wait_events(
        self, prefix: str, want: dict[str, int], timeout: float = 30
    ) -> dict[str, list[dict[str, Any]]]:
        def arrived() -> bool:
            got = self.events(prefix)
            return all(len(got.get(k, [])) >= n for k, n in want.items())

        assert wait_until(arrived, timeout, interval=0.2), {k: len(v) for k, v in self.events(prefix).items()}
        time.sleep(0.6)  # a few more upload rounds: nothing more may appear
        return self.events(prefix)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[Device]:
    workdir = tmp_path_factory.mktemp("dc")
    with Rig(workdir / "rig") as rig:
        url = azurite.container_url(CONTAINER)
        agent = rig.add_device(DEV, {
            "telemetry": {"interval": 0.5, "flush_interval": 0.05},
            # small batches: several uploads per test, so the CSV files are appended to
            "sync": {"url": url, "interval": 0.2, "max_batch_age": 0.2, "batch_max_records": 40},
        }).start()  # fmt: skip
        yield Device(rig, agent, url, workdir)


def post(api: str, path: str, body: Any, rid: str | None) -> httpx.Response:
    headers = {"x-request-id": rid} if rid else {}
    r = httpx.post(api + path, json=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r


# --- end to end --------------------------------------------------------------------------------


def test_collector_records_reach_blob_storage_in_azure_ml_layout(device: Device) -> None:
    api = device.deploy("mdc-v2", SCORE_V2, {
        "collections": {c: {"enabled": True} for c in FOUR},
        "rolling_rate": "Hour",
    })  # fmt: skip
    x = np.random.default_rng(5).standard_normal((20, 4)).astype(np.float32)
    sent: dict[str, dict[str, Any]] = {}
    for i in range(20):
        rid = f"req-{i}" if i % 2 == 0 else None  # without one, the agent makes the id
        body: dict[str, Any] = {"data": [x[i].tolist()]}
        if i % 5 == 1:
            body["context"] = f"own-{i}"  # the script's own correlation context
        if i % 7 == 3:
            body["poison"] = True  # a collector fails, its on_error raises: the request is still 200
        r = post(api, "/score", body, rid)
        got_rid = r.headers["x-request-id"]
        assert rid is None or got_rid == rid
        assert r.json()["pandas_imported"] is False  # the shim never imports pandas itself
        sent[got_rid] = {"body": body, "answer": r.json(), "size": len(r.request.content)}

    prefix = "modelDataCollector/mdc-v2/dep-1/"
    ev = device.wait_events(prefix, {"model_inputs": 20, "model_outputs": 20, "request": 20, "response": 20})
    assert sorted(ev) == [
        "model_inputs",
        "model_outputs",
        "request",
        "response",
    ]  # debug_features: not enabled
    assert {k: len(v) for k, v in ev.items()} == {k: 20 for k in ev}  # each exactly once
    layout = re.compile(
        rf"{prefix}(model_inputs|model_outputs|request|response)/\d{{4}}/\d{{2}}/\d{{2}}/\d{{2}}/{DEV}-\d+-\d+-\d+\.jsonl"
    )
    for recs in ev.values():
        for rec in recs:
            assert layout.fullmatch(rec["_blob"]), rec["_blob"]
            assert rec["_blob"].split("/")[4:8] == time.strftime("%Y/%m/%d/%H", time.gmtime(
                mf.parse_time(rec["time"]).timestamp())).split("/")  # fmt: skip

    source = "/subscriptions/default/resourceGroups/default/providers/Microsoft.MachineLearningServices/"
    source += "workspaces/default/onlineEndpoints/mdc-v2/deployments/dep-1"
    inputs = {r["xrequestid"]: r for r in ev["model_inputs"]}
    outputs = {r["xrequestid"]: r for r in ev["model_outputs"]}
    requests = {r["xrequestid"]: r for r in ev["request"]}
    responses = {r["xrequestid"]: r for r in ev["response"]}
    assert set(inputs) == set(outputs) == set(requests) == set(responses) == set(sent)
    for rid, s in sent.items():
        inp, o, rq, rs = inputs[rid], outputs[rid], requests[rid], responses[rid]
        assert set(inp) >= V2_FIELDS and set(o) >= V2_FIELDS
        assert inp["specversion"] == "1.0" and inp["source"] == source and inp["modelversion"] == "1"
        assert (
            inp["type"] == "azureml.inference.model_inputs" and o["type"] == "azureml.inference.model_outputs"
        )
        assert inp["datacontenttype"] == "application/json"
        assert inp["collectdatatype"] == "builtins.list" and o["collectdatatype"] == "numpy.ndarray"
        assert inp["data"] == [dict(zip("abcd", s["body"]["data"][0], strict=True))]
        np.testing.assert_allclose(o["data"], s["answer"]["y"], rtol=1e-6)
        # inputs and outputs correlate: the script's own context, or else the request's (its id)
        want = s["body"].get("context") or rid
        assert inp["correlationid"] == o["correlationid"] == want
        assert rq["correlationid"] == rs["correlationid"] == rid
        assert rq["type"] == "azureml.inference.request" and rq["path"] == "/score" and rq["method"] == "POST"
        assert rq["data"] == s["body"]
        assert (
            rs["type"] == "azureml.inference.response"
            and rs["data"] == s["answer"]
            and rs["statuscode"] == 200
        )
        n = s["size"]
        assert rq["contentrange"] == f"bytes 0-{n - 1}/{n}"
    assert "on_error raised RuntimeError: on_error gave up too" in device.agent.log_text()


def test_sampling_rates_are_honoured_per_collection(device: Device) -> None:
    api = device.deploy("mdc-sampled", SCORE_V2, {
        "sampling_rate": 0.3,  # the default of every collection
        "collections": {
            "model_inputs": {"enabled": True},
            "model_outputs": {"enabled": True},
            "request": {"enabled": True},
            "response": {"enabled": True, "sampling_rate": 1.0},
            "debug_features": {"enabled": False, "sampling_rate": 1.0},
        },
    })  # fmt: skip
    n = 200
    rids = [f"smp-{i}" for i in range(n)]
    for rid in rids:
        post(api, "/score", {"data": [[0.1, 0.2, 0.3, 0.4]]}, rid)
    kept = {rid for rid in rids if col.sampled(0.3, rid)}
    assert 0.3 * n - 4 * (n * 0.3 * 0.7) ** 0.5 < len(kept) < 0.3 * n + 4 * (n * 0.3 * 0.7) ** 0.5
    want = {"model_inputs": len(kept), "model_outputs": len(kept), "request": len(kept), "response": n}
    ev = device.wait_events("modelDataCollector/mdc-sampled/dep-2/", want)
    assert {k: len(v) for k, v in ev.items()} == want
    # one request's collections are kept or dropped together: a sample of requests, not of records
    for c in ("model_inputs", "model_outputs", "request"):
        assert {r["xrequestid"] for r in ev[c]} == kept


def test_request_and_response_collections_need_no_score_py(device: Device) -> None:
    api = device.deploy("mdc-plain", None, {
        "collections": {"request": {"enabled": True}, "response": {"enabled": True}},
        "request_logging": {"capture_headers": ["x-client"]},
    })  # fmt: skip
    v2 = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    a = httpx.post(
        api + "/v2/models/mlp/infer", json=v2, headers={"x-request-id": "p-1", "x-client": "cam-7"}
    )
    b = httpx.post(api + "/score", content=b"not json", headers={"x-request-id": "p-2"})
    assert a.status_code == 200 and b.status_code == 400
    ev = device.wait_events("modelDataCollector/mdc-plain/dep-3/", {"request": 2, "response": 2})
    req = {r["xrequestid"]: r for r in ev["request"]}
    resp = {r["xrequestid"]: r for r in ev["response"]}
    assert req["p-1"]["path"] == "/v2/models/mlp/infer" and req["p-1"]["data"] == v2
    assert req["p-1"]["headers"] == {"x-client": "cam-7"}
    assert resp["p-1"]["data"] == a.json() and resp["p-1"]["statuscode"] == 200
    assert req["p-2"]["data"] == "not json" and req["p-2"]["datacontenttype"] == "text/plain"
    assert resp["p-2"]["statuscode"] == 400 and resp["p-2"]["data"]["code"] == "malformed_json"


def test_model_data_collector_writes_the_legacy_csv_layout(device: Device) -> None:
    api = device.deploy("mdc-legacy", SCORE_LEGACY, {
        "collect_model_data": True,
        "workspace": {"subscription_id": "sub-1", "resource_group": "rg-1", "name": "ws-1"},
    })  # fmt: skip
    x = np.random.default_rng(9).standard_normal((30, 2, 4)).astype(np.float32)
    for i in range(30):
        post(api, "/score", {"data": x[i].tolist()}, f"leg-{i}")
    day = time.strftime("%Y/%m/%d", time.gmtime())
    base = f"modeldata/sub-1/rg-1/ws-1/{DEV}/mlp/1"
    names = {d: f"{base}/{d}/{day}/data.csv" for d in ("inputs", "predictions")}

    def table(name: str) -> list[list[str]]:
        return list(csv.reader(io.StringIO(device.blobs(name).get(name, b"").decode())))

    assert wait_until(lambda: all(len(table(n)) == 61 for n in names.values()), 30, 0.2), [
        len(table(n)) for n in names.values()
    ]
    time.sleep(0.6)
    assert sorted(device.blobs("modeldata/")) == sorted(names.values())
    correlation = list(col_headers())
    inputs, predictions = table(names["inputs"]), table(names["predictions"])
    assert inputs[0] == ["a", "b", "c", "d", *correlation]  # one header, however many appends
    assert predictions[0] == ["y0", "y1", *correlation]
    assert len(inputs) == len(predictions) == 61  # every row once
    by_corr: dict[str, list[list[str]]] = {}
    for row in inputs[1:]:
        cell = dict(zip(inputs[0], row, strict=True))
        assert cell["$aml_workspace"] == "sub-1/rg-1/ws-1" and cell["$aml_service_name"] == DEV
        assert cell["$aml_model_name"] == "mlp" and cell["$aml_model_version"] == "1"
        assert cell["$aml_request_id"].startswith("leg-") and cell["$aml_dc_boundary"] == "1440"
        by_corr.setdefault(cell["$aml_dc_correlation_id"], []).append(row)
    assert len(by_corr) == 30 and all(len(v) == 2 for v in by_corr.values())  # a request's rows share one
    rid_of = {row[4]: row[-1] for row in inputs[1:]}
    assert sorted(rid_of.values()) == sorted(f"leg-{i}" for i in range(30))
    for row in predictions[1:]:
        assert rid_of[row[2]] == row[-1]  # predictions carry their inputs' correlation
    first = [float(v) for v in inputs[1][:4]]
    i = int(inputs[1][-1].split("-")[1])
    np.testing.assert_allclose(first, x[i][0], rtol=1e-6)


def col_headers() -> tuple[str, ...]:
    return (
        "$aml_dc_correlation_id", "$aml_dc_scoring_timestamp", "$aml_dc_boundary", "$aml_workspace",
        "$aml_service_name", "$aml_model_name", "$aml_model_version", "$aml_request_id",
    )  # fmt: skip


# --- exactly once across crashes, with the uploader alone ----------------------------------------


def test_a_crash_in_the_middle_of_an_upload_stores_every_record_once(
    azurite: Azurite, tmp_path: Path
) -> None:
    """The agent dies after some or all of a batch's blobs were written and before the records were
    acknowledged; the next run writes the same batch again: the JSON Lines blobs are overwritten under
    the same names, and the CSV file gets the batch's rows once, not twice."""
    url = azurite.container_url(CONTAINER)
    backend = open_backend(url, retries=0)
    buf = Buffer(tmp_path / "buf.db", budget_bytes=64 << 20, flush_interval_s=0.01)
    buf.start()
    db = StateDB(tmp_path / "agent.db")
    dc = mf.data_collector({"collections": {"request": {"enabled": True}}, "collect_model_data": True})
    c = col.Collections(buf, dc, device_id="dev-crash", endpoint="ep", deployment="dep", model_version="3")

    def serve(i: int) -> None:
        rid = f"c-{i}"
        row = {"kind": "csv", "model": "m", "designation": "inputs", "header": ["f", "$aml_request_id"],
               "rows": [[i, col.NO_REQUEST_ID]], "time": time.time()}  # fmt: skip
        c.record(request_id=rid, ts=time.time(), path="/score", method="POST", content_type=None, headers={},
                 body=json.dumps({"i": i}).encode(), status=200, out=b"{}", collected=[row])  # fmt: skip

    class DiesAfterPuts:
        def __init__(self, n: int) -> None:
            self.n = n

        def put(self, name: str, data: bytes, content_type: str = "") -> None:
            backend.put(name, data, content_type)
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt("the process dies here")  # not an Exception: nothing catches it

        def get(self, name: str) -> bytes:
            return backend.get(name)

        def list(self, prefix: str = "") -> list[str]:
            return backend.list(prefix)

    for i in range(10):
        serve(i)
    assert buf.flush(5)
    with pytest.raises(KeyboardInterrupt):  # dies after the first of the batch's two blobs
        Uploader(buf, DiesAfterPuts(1), "dev-crash", db, max_batch_age_s=0).run_once(force=True)
    for i in range(10, 15):  # more records arrive before the restart: the repeated batch must not grow
        serve(i)
    assert buf.flush(5)
    assert Uploader(buf, backend, "dev-crash", db, max_batch_age_s=0).run_once(force=True) == 2
    for i in range(15, 20):
        serve(i)
    assert buf.flush(5)
    with pytest.raises(KeyboardInterrupt):  # both blobs written, the records not acknowledged
        Uploader(buf, DiesAfterPuts(2), "dev-crash", db, max_batch_age_s=0).run_once(force=True)
    assert Uploader(buf, backend, "dev-crash", db, max_batch_age_s=0).run_once(force=True) == 1
    assert buf.stats()["classes"]["collection"]["records"] == 0

    day = time.strftime("%Y/%m/%d", time.gmtime())
    (csv_name,) = backend.list("modeldata/default/default/default/dev-crash/")
    assert csv_name == f"modeldata/default/default/default/dev-crash/m/3/inputs/{day}/data.csv"
    rows = list(csv.reader(io.StringIO(backend.get(csv_name).decode())))
    assert rows[0] == ["f", "$aml_request_id"]
    assert sorted(rows[1:], key=lambda r: int(r[0])) == [[str(i), f"c-{i}"] for i in range(20)]
    names = backend.list("modelDataCollector/ep/dep/request/")
    assert len(names) == 3  # one per batch: the repeated ones overwrote their blob
    ids = [json.loads(line)["xrequestid"] for n in names for line in backend.get(n).splitlines()]
    assert sorted(ids) == sorted(f"c-{i}" for i in range(20))
    buf.close()
    backend.close()
    db.close()


# --- the parts ---------------------------------------------------------------------------------


def _bridge() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "edge_collect_bridge", SHIM / "azureml" / "_edge_collect.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_worker_and_the_agent_sample_the_same_requests() -> None:
    bridge = _bridge()
    for rate in (0.0, 0.01, 0.3, 0.5, 0.99, 1.0):
        for i in range(500):
            key = f"id-{i}"
            assert bridge.sampled(rate, key) == col.sampled(rate, key)
    assert sum(col.sampled(0.25, f"k{i}") for i in range(4000)) in range(850, 1150)


def test_a_worker_returns_what_its_collectors_collected(tmp_path: Path) -> None:
    """The frame protocol's side: records ride on the response header, only for enabled collections,
    also when run() raised after collecting; a worker without collectors pays nothing."""
    (tmp_path / "score.py").write_text(
        "from azureml.ai.monitoring import Collector\n"
        "def init():\n"
        "    global a, b\n"
        "    a = Collector(name='kept'); b = Collector(name='other')\n"
        "def run(raw):\n"
        "    ctx = a.collect({'raw': raw}); b.collect([1])\n"
        "    if raw == 'fail':\n"
        "        raise ValueError('after collecting')\n"
        "    return ctx.get_id()\n"
    )
    env = col.child_env(mf.data_collector({"collections": {"kept": {"enabled": True}}}), "dev-x", "7")
    with WorkerPool(tmp_path, env=env) as pool:
        ok = pool.score(b"hello")
        (rec,) = ok.collected
        assert rec["collection"] == "kept" and json.loads(rec["data"]) == {"raw": "hello"}
        assert rec["correlationid"] == json.loads(ok.body) and rec["pending_id"] is True
        with pytest.raises(ScoreFailed) as failed:
            pool.score(b"fail")
        (rec,) = failed.value.collected
        assert json.loads(rec["data"]) == {"raw": "fail"}
    with WorkerPool(tmp_path) as pool:  # the deployment collects nothing
        assert pool.score(b"hello").collected == ()


def test_dataframes_are_collected_as_azure_ml_rows(tmp_path: Path) -> None:
    pytest.importorskip("pandas")  # an image that ships pandas; the agent itself does not depend on it
    (tmp_path / "score.py").write_text(
        "import pandas as pd\n"
        "from azureml.ai.monitoring import Collector\n"
        "from azureml.monitoring import ModelDataCollector\n"
        "c = Collector(name='model_inputs')\n"
        "m = ModelDataCollector('m', designation='inputs')\n"
        "def run(raw):\n"
        "    df = pd.DataFrame({'a': [1, 2], 'b': [0.5, None]})\n"
        "    c.collect(df); m.collect(df)\n"
        "    return 'ok'\n"
    )
    env = col.child_env(
        mf.data_collector({"collections": {"model_inputs": {"enabled": True}}, "collect_model_data": True}),
        "dev-x",
        "7",
    )
    with WorkerPool(tmp_path, env=env) as pool:
        v2, legacy = pool.score(b"x").collected
    assert v2["collectdatatype"] == "pandas.core.frame.DataFrame"
    assert json.loads(v2["data"]) == [{"a": 1, "b": 0.5}, {"a": 2, "b": None}]
    assert legacy["header"] == ["a", "b", *col_headers()] and len(legacy["rows"]) == 2


def test_the_manifest_section_keeps_its_old_keys_and_takes_azure_ml_s() -> None:
    old = {"enabled": True, "sample_rate": 0.1, "capture": "both", "max_payload_bytes": 65536}
    assert mf.data_collector(old).active is False
    new = {
        **old,
        "sampling_rate": 0.5,
        "rolling_rate": "day",
        "collections": {
            "model_inputs": {"enabled": True},
            "model_outputs": {"enabled": True, "sampling_rate": 0.2, "data": {"name": "x", "version": 1}},
            "request": {"enabled": False},
            "zero": {"enabled": True, "sampling_rate": 0},
        },
    }
    dc = mf.data_collector(new)
    assert dc.collections == {"model_inputs": 0.5, "model_outputs": 0.2} and dc.rolling_rate == "Day"

    def refused(section: dict[str, Any]) -> str | None:
        doc = {"schema_version": 1, "device_id": "d", "deployment_id": "x", "generation": 1,
               "issued_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
               "image": {"name": "i", "version": "1", "sha256": "0" * 64, "size": 1, "urls": ["file:///x"]},
               "data_collection": section}  # fmt: skip
        return mf.schema_error(doc)

    assert refused(old) is None and refused(new) is None
    assert refused({"rolling_rate": "Week"}) is not None
    assert refused({"collections": {"a": {"enabled": "True"}}}) is not None  # JSON booleans only
    assert refused({"collections": {"a": {"sampling_rate": 2}}}) is not None
    assert refused({"collections": {"../x": {"enabled": True}}}) is not None  # a blob path segment
    assert refused({"collections": {"a": {"enabled": True, "typo": 1}}}) is not None
    assert refused({"workspace": {"name": "a/b"}}) is not None


def test_edge_deploy_takes_an_azure_ml_deployment_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    yml = tmp_path / "deployment.yml"
    yml.write_text(
        "$schema: https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json\n"
        "name: blue\nendpoint_name: my-endpoint\n"
        "data_collector:\n"
        "  collections:\n"
        "    model_inputs:\n      enabled: 'True'\n"
        "    model_outputs:\n      enabled: 'True'\n      sampling_rate: 0.5\n"
        "    request:\n      enabled: 'False'\n"
        "  rolling_rate: Minute\n"
    )
    section = deploy_collection.load(yml)
    assert section == {
        "collections": {
            "model_inputs": {"enabled": True},
            "model_outputs": {"enabled": True, "sampling_rate": 0.5},
            "request": {"enabled": False},
        },
        "rolling_rate": "Minute",
        "endpoint_name": "my-endpoint",
        "deployment_name": "blue",
    }
    sections = {
        "runtime": {"intra_op_num_threads": 2},
        "data_collection": {"enabled": True, "rolling_rate": "Day"},
    }
    merged = deploy_collection.merge(sections, section)
    assert merged["runtime"] == sections["runtime"]
    assert merged["data_collection"] == {"enabled": True, **section}  # the file's rolling_rate wins
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"collections": {"model_inputs": {"enabled": True}}, "rolling_rate": "Week"}))
    with pytest.raises(ControlPlaneError, match="rolling_rate"):
        deploy_collection.load(bad)

    bundle = build_image(
        tmp_path / "b.tar", "img", "1", {"mlp": models.mlp(tmp_path / "m.onnx", sizes=(4, 2))}
    )
    r = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "manifest", "create", "--device", "d1",
         "--bundle", str(bundle.path), "--url", "file:///b.tar", "--data-collection", str(yml)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["data_collection"] == section and mf.schema_error(doc) is None
