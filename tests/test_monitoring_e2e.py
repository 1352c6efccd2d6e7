"""Monitor and collect, end to end: a real agent captures every scoring request (rate 1.0) with its
lineage into its SQLite buffer, samples system and inference metrics, sends heartbeats over the real
broker, and its uploader ships gzip JSON Lines blobs to a local-directory blob store."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from deploy.bundle import build_image
from simulators import models
from simulators.rig import AgentProcess, Rig, wait_until

DEV = "dev-mon"


def read_blobs(root: Path, cls: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted(root.glob(f"{DEV}/{cls}/*/*/*/*.jsonl.gz")):
        out += [json.loads(line) for line in gzip.decompress(p.read_bytes()).splitlines()]
    return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig(tmp_path_factory.mktemp("mon")) as r:
        yield r


def test_captures_metrics_and_heartbeats_reach_storage(rig: Rig) -> None:
    outbox = rig.workdir / "outbox"
    outbox.mkdir()  # a configured directory must exist (like a mounted disk)
    agent: AgentProcess = rig.add_device(DEV, {
        "telemetry": {"interval": 0.5, "flush_interval": 0.05},
        "sync": {"url": outbox.as_uri(), "interval": 0.3, "max_batch_age": 0.5, "batch_max_records": 50},
    }).start()  # fmt: skip
    model = models.mlp(rig.workdir / "m" / "mlp.onnx", sizes=(4, 8, 2))
    b = build_image(rig.bundles_dir / "mon-1.tar", "mon", "1", {"mlp": model}).path
    doc = rig.manifest(DEV, b, 1, data_collection={"enabled": True, "sample_rate": 1.0, "capture": "both"})
    rig.deploy(DEV, doc)
    status = rig.wait_active(DEV, 1)
    n = 120
    x = np.random.default_rng(1).standard_normal((n, 4)).astype(np.float32)
    ids = set()
    with httpx.Client(base_url=status["runtime"]["api"]) as c:
        for i in range(n):
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x[i].tolist()}]}
            r = c.post(
                "/v2/models/mlp/infer", json=body, headers={"x-request-id": f"req-{i}"} if i % 2 else {}
            )
            assert r.status_code == 200
            ids.add(r.headers["x-request-id"])
    assert len(ids) == n and "req-1" in ids

    assert wait_until(lambda: len(read_blobs(outbox, "capture")) >= n, timeout=30), len(
        read_blobs(outbox, "capture")
    )
    caps = read_blobs(outbox, "capture")
    assert len(caps) == n and {c["request_id"] for c in caps} == ids  # each exactly once
    first = caps[0]
    assert first["lineage"] == {
        "device_id": DEV,
        "deployment_id": "dep-1",
        "rollout_id": None,
        "generation": 1,
        "image": {"name": "mon", "version": "1", "sha256": doc["image"]["sha256"]},
    }
    assert first["model"] == "mlp" and first["model_version"] == "1" and first["status"] == 200
    assert first["input"]["inputs"][0]["name"] == "x" and first["output"]["outputs"][0]["name"] == "y"
    by_id = {c["request_id"]: c for c in caps}
    np.testing.assert_allclose(by_id["req-1"]["input"]["inputs"][0]["data"], x[1], rtol=1e-6)

    def inference() -> list[dict[str, Any]]:
        return [m for rec in read_blobs(outbox, "inference") for m in rec["models"].values()]

    # The windows that count the last requests may reach storage a round after the first ones.
    assert wait_until(
        lambda: read_blobs(outbox, "system") and sum(m["requests"] for m in inference()) >= n, 30
    )
    sysrec = read_blobs(outbox, "system")[0]
    assert sysrec["agent"]["rss_bytes"] > 0 and "cpu_percent" in sysrec and sysrec["disk"]["free"] > 0
    inf = inference()
    assert sum(m["requests"] for m in inf) == n and all(m["p99_ms"] is not None for m in inf)

    beat = rig.op.wait_for(DEV, lambda h: "buffer" in h, kind="heartbeat", timeout=10)
    assert beat["sync"]["records"] > 0 and beat["sync"]["last_error"] is None
    assert "dropped" in json.dumps(beat["buffer"])
    # the heartbeat's counters account for every record
    beat = rig.op.wait_for(
        DEV, lambda h: h["sync"]["records_per_class"].get("capture", 0) >= n, kind="heartbeat"
    )
    cap = beat["buffer"]["classes"]["capture"]
    assert cap["records"] == 0 and cap["acked"]["records"] == n  # nothing left behind, nothing twice
    text = httpx.get(status["runtime"]["api"] + "/metrics").text
    assert f'edge_sync_uploaded_records{{cls="capture"}} {float(n)}' in text
    assert 'edge_buffer_records{cls="capture"} 0.0' in text and "edge_buffer_bytes " in text
    assert agent.running


def test_a_broker_outage_stops_neither_serving_nor_collection(rig: Rig) -> None:
    """With the broker gone, local scoring, capture and uploads go on; heartbeats are skipped (never
    queued stale) and resume, and the control channel takes the next deployment."""
    outbox = rig.workdir / "outbox-2"
    outbox.mkdir()
    dev = "dev-mon-2"
    rig.add_device(dev, {
        "telemetry": {"interval": 0.3, "flush_interval": 0.05},
        "sync": {"url": outbox.as_uri(), "interval": 0.2, "max_batch_age": 0.2},
    }).start()  # fmt: skip
    model = models.mlp(rig.workdir / "m2" / "mlp.onnx", sizes=(4, 8, 2))
    b = build_image(rig.bundles_dir / "mon2-1.tar", "mon2", "1", {"mlp": model}).path
    rig.deploy(dev, rig.manifest(dev, b, 1, data_collection={"enabled": True, "sample_rate": 1.0}))
    api = rig.wait_active(dev, 1)["runtime"]["api"]

    rig.broker.stop()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    with httpx.Client(base_url=api) as c:
        for i in range(40):
            assert (
                c.post("/v2/models/mlp/infer", json=body, headers={"x-request-id": f"off-{i}"}).status_code
                == 200
            )

    def uploaded() -> set[str]:
        return {r["request_id"] for p in outbox.glob(f"{dev}/capture/*/*/*/*.jsonl.gz")
                for r in map(json.loads, gzip.decompress(p.read_bytes()).splitlines())}  # fmt: skip

    assert wait_until(lambda: {f"off-{i}" for i in range(40)} <= uploaded(), timeout=20)
    time.sleep(1.0)  # several heartbeat intervals with no broker
    rig.broker.start()
    rig.op.wait_for(dev, lambda h: h["ts"] > time.time() - 5, kind="heartbeat", timeout=40)
    rig.deploy(dev, rig.manifest(dev, b, 2, data_collection={"enabled": True, "sample_rate": 1.0}))
    rig.wait_active(dev, 2, timeout=40)
