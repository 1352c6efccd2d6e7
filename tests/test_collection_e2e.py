"""Every captured record reaches the user's Azure Blob container exactly once, across a cloud outage,
a broker restart and a SIGKILL of the agent in the middle of an upload.

Real parts only: Azurite behind a fault-injecting HTTP proxy (the "cloud" goes away by resetting or
stalling every request), a mosquitto broker, a real agent process with its SQLite buffer.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest_blob import Azurite, FaultProxy

from agent.telemetry.uploader import Uploader
from cloud_sync.factory import open_backend
from deploy.bundle import build_image
from simulators import models
from simulators.rig import AgentProcess, Rig, wait_until

DEV = "dev-collect"
CONTAINER = "telemetry"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    server.create_container(CONTAINER)
    yield server
    server.stop()


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    p = FaultProxy(("127.0.0.1", azurite.port), stall_s=60).start()
    yield p
    p.stop()


def stored_captures(url: str) -> list[dict[str, Any]]:
    backend = open_backend(url, retries=0)
    try:
        names = [n for n in backend.list(f"{DEV}/capture/") if n.endswith(".jsonl.gz")]
        return [json.loads(line) for n in names for line in gzip.decompress(backend.get(n)).splitlines()]
    finally:
        backend.close()


class Client:
    def __init__(self, api: str) -> None:
        self.api = api
        self.sent: list[str] = []
        self.x = np.random.default_rng(2).standard_normal((1, 4)).astype(np.float32).ravel().tolist()

    def score(self, n: int, tag: str) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": self.x}]}
        with httpx.Client(base_url=self.api, timeout=10) as c:
            for i in range(n):
                rid = f"{tag}-{i}"
                r = c.post("/v2/models/mlp/infer", json=body, headers={"x-request-id": rid})
                assert r.status_code == 200, r.text
                self.sent.append(rid)


def heartbeat(rig: Rig, pred: Any, timeout: float = 20) -> dict[str, Any]:
    return rig.op.wait_for(DEV, pred, kind="heartbeat", timeout=timeout)


def test_every_capture_lands_exactly_once(tmp_path: Path, azurite: Azurite, proxy: FaultProxy) -> None:
    with Rig(tmp_path / "rig") as rig:
        url = azurite.container_url(CONTAINER, base=proxy.origin)
        overrides: dict[str, dict[str, Any]] = {
            "telemetry": {"interval": 0.3, "flush_interval": 0.05},
            "sync": {"url": url, "interval": 0.2, "max_batch_age": 0.2, "batch_max_records": 40, "retries": 1,
                     "backoff_min": 0.05, "backoff_max": 0.2},
        }  # fmt: skip
        agent: AgentProcess = rig.add_device(DEV, overrides).start()
        model = models.mlp(tmp_path / "mlp.onnx", sizes=(4, 8, 2))
        b = build_image(rig.bundles_dir / "col-1.tar", "col", "1", {"mlp": model}).path
        rig.deploy(DEV, rig.manifest(DEV, b, 1, data_collection={"enabled": True, "sample_rate": 1.0}))
        client = Client(rig.wait_active(DEV, 1)["runtime"]["api"])

        client.score(100, "before")
        assert wait_until(lambda: len(stored_captures(azurite.container_url(CONTAINER))) >= 100, timeout=30)

        # 1. the cloud goes away: every storage request is reset
        proxy.fault = lambda method, path: "reset"
        client.score(80, "outage")
        beat = heartbeat(rig, lambda h: h["sync"]["last_error"] is not None)
        assert beat["sync"]["last_error"]["code"] == "blob_unavailable", beat["sync"]
        assert agent.running

        # 2. the broker restarts; the agent reconnects and keeps serving and buffering
        rig.broker.restart()
        client.score(60, "broker")
        heartbeat(rig, lambda h: h["buffer"]["classes"]["capture"]["records"] >= 140)  # committed to disk

        # 3. the cloud answers again but hangs every upload: the agent is SIGKILLed mid-upload
        proxy.fault = lambda method, path: "stall" if method == "PUT" else None
        assert wait_until(lambda: proxy.count("PUT") > 0, timeout=20)
        agent.kill()

        # 4. the cloud is back; the agent restarts and finishes the job
        proxy.fault = lambda method, path: None
        agent.start()
        old_api = client.api  # the restarted agent listens on a new port (port 0 in the rig's config)
        status = rig.wait_status(DEV, lambda s: s["runtime"] is not None and s["runtime"]["api"] != old_api)
        client.api = status["runtime"]["api"]
        client.score(50, "after")
        expected = set(client.sent)
        assert len(expected) == 290

        def complete() -> bool:
            return {c["request_id"] for c in stored_captures(azurite.container_url(CONTAINER))} >= expected

        assert wait_until(complete, timeout=60)
        time.sleep(0.5)  # an extra upload round: nothing more may appear
        stored = stored_captures(azurite.container_url(CONTAINER))
        ids = [c["request_id"] for c in stored]
        assert len(ids) == len(set(ids)) == len(expected), "a record was stored twice or lost"
        assert set(ids) == expected
        assert all(c["lineage"]["deployment_id"] == "dep-1" for c in stored)
        beat = heartbeat(rig, lambda h: h["sync"]["last_error"] is None)
        assert beat["buffer"]["dropped"] == {}  # nothing was evicted: the budget was never reached


def test_an_upload_that_landed_but_was_not_acknowledged_is_not_duplicated(
    azurite: Azurite, tmp_path: Path
) -> None:
    """The agent dies after the storage stored a blob but before it deleted the records: the next
    run uploads the same records under the same name (an overwrite), never a second blob."""
    from agent.telemetry.buffer import Buffer, RecordClass
    from agent.update.state import StateDB

    url = azurite.container_url(CONTAINER)
    buf = Buffer(tmp_path / "buf.db", budget_bytes=64 << 20, flush_interval_s=0.01)
    buf.start()
    for i in range(30):
        assert buf.put(RecordClass.EVENT, {"i": i, "device": "dev-ack"})
    assert buf.flush(5)
    db = StateDB(tmp_path / "agent.db")
    backend = open_backend(url, retries=0)

    class DiesAfterPut:
        def put(self, name: str, data: bytes, content_type: str = "") -> None:
            backend.put(name, data, content_type)
            raise KeyboardInterrupt("the process dies here")  # not an Exception: nothing catches it

        def list(self, prefix: str = "") -> list[str]:
            return backend.list(prefix)

    with pytest.raises(KeyboardInterrupt):
        Uploader(buf, DiesAfterPut(), "dev-ack", db, max_batch_age_s=0).run_once(force=True)
    assert buf.stats()["classes"]["event"]["records"] == 30  # not acknowledged: still buffered
    for i in range(30, 40):  # more records arrive before the restart: the retried batch must not grow
        assert buf.put(RecordClass.EVENT, {"i": i, "device": "dev-ack"})
    assert buf.flush(5)
    assert Uploader(buf, backend, "dev-ack", db, max_batch_age_s=0).run_once(force=True) == 2
    names = backend.list("dev-ack/event/")
    assert len(names) == 2
    stored = [json.loads(x)["i"] for n in names for x in gzip.decompress(backend.get(n)).splitlines()]
    assert sorted(stored) == list(range(40))  # every record once: the first blob was overwritten, not doubled
    assert buf.stats()["classes"]["event"]["records"] == 0
    buf.close()
    backend.close()
    db.close()


@pytest.mark.parametrize(
    ("make_url", "code", "words"),
    [
        (lambda az: az.container_url(CONTAINER, expiry=timedelta(hours=-1)), "blob_access_denied", "expired"),
        (lambda az: az.container_url("no-such-container"), "blob_container_not_found", "no-such-container"),
    ],
    ids=["expired-sas", "missing-container"],
)
def test_storage_refusals_are_a_clear_status_and_keep_the_records(
    tmp_path: Path, azurite: Azurite, make_url: Any, code: str, words: str
) -> None:
    with Rig(tmp_path / "rig") as rig:
        agent = rig.add_device(DEV, {
            "telemetry": {"interval": 0.3, "flush_interval": 0.05},
            "sync": {"url": make_url(azurite), "interval": 0.2, "max_batch_age": 0.1, "retries": 1},
        }).start()  # fmt: skip
        beat = heartbeat(rig, lambda h: h["sync"]["last_error"] is not None)
        err = beat["sync"]["last_error"]
        assert err["code"] == code and words in err["message"], err
        assert "sig=" not in json.dumps(beat)  # the SAS signature never leaks into reports
        kept = heartbeat(rig, lambda h: h["buffer"]["classes"]["system"]["records"] >= 2)
        assert kept["buffer"]["dropped"] == {} and kept["sync"]["records"] == 0
        assert agent.running
