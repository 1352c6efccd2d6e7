"""What holds for captured requests across a SIGKILL, a SIGTERM and a buffer file that is lost
(docs/monitoring.md, "What survives what").

Real parts: real agent processes (simulators/rig.py) with their SQLite buffers, a real mosquitto
broker, Azurite behind a fault-injecting proxy (tests/conftest_blob.py) or a local-directory store,
and HTTP clients on loopback that keep the ``x-request-id`` of every answer they got. With
``telemetry.capture_commit = "before_answer"`` (the default) every answered request must be in storage
exactly once, whatever happened to the agent after it answered.

The API-level tests at the end run the scoring app in this process with a real buffer: an answer
leaves only once its record is in the file, and a wedged disk delays answers by the timeout at most.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest_blob import Azurite, FaultProxy

from agent.config import AgentConfig, ApiConfig, TelemetryConfig
from agent.serving.activation import Serving
from agent.telemetry.buffer import MIGRATIONS, Buffer, RecordClass
from agent.telemetry.capture import Capturer, CaptureSettings
from agent.telemetry.uploader import Uploader
from agent.update.state import StateDB
from cloud_sync.factory import open_backend
from deploy.bundle import build_image
from edge_core.errors import BlobError, ErrorCode
from simulators import models
from simulators.rig import AgentProcess, Rig, wait_until

DEV = "dev-durable"
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, -0.2, 0.3, 0.4]}]}
#: Uploads as soon as possible, in small batches, so that the agent is often in the middle of one.
FAST_SYNC = {"interval": 0.2, "max_batch_age": 0.2, "batch_max_records": 40, "retries": 1,
             "backoff_min": 0.05, "backoff_max": 0.2}  # fmt: skip


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield server
    server.stop()


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    p = FaultProxy(("127.0.0.1", azurite.port), stall_s=60).start()
    yield p
    p.stop()


class Load:
    """``clients`` keep-alive connections posting (``pause`` seconds apart), each until it has sent
    ``per_client`` requests, is stopped, or its connection fails (the agent was killed). ``answered``
    holds the ``x-request-id`` of every 200 answer that arrived whole."""

    def __init__(
        self, api: str, tag: str, clients: int = 4, per_client: int = 100, pause: float = 0.0
    ) -> None:
        self.api = api
        self.tag = tag
        self.per_client = per_client
        self.pause = pause
        self.clients = clients
        self.answered: list[str] = []
        self.failed = 0  # requests that got no answer (connection refused or cut)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _client(self, k: int) -> None:
        with httpx.Client(base_url=self.api, timeout=10) as c:
            for i in range(self.per_client):
                if self._stop.is_set():
                    return
                rid = f"{self.tag}-{k}-{i}"
                try:
                    r = c.post("/v2/models/mlp/infer", json=BODY, headers={"x-request-id": rid})
                except httpx.HTTPError:
                    with self._lock:
                        self.failed += 1
                    return
                assert r.status_code == 200, r.text
                assert r.headers["x-request-id"] == rid
                with self._lock:
                    self.answered.append(r.headers["x-request-id"])
                if self.pause:
                    time.sleep(self.pause)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def join(self, timeout: float = 30) -> Load:
        for t in self._threads:
            t.join(timeout)
        return self

    def stop(self) -> Load:
        self._stop.set()
        return self.join()


def stored(url: str) -> dict[str, list[str]]:
    """Every capture blob in the store: its name -> the request ids in it, in order."""
    backend = open_backend(url, retries=0)
    try:
        names = [n for n in backend.list(f"{DEV}/capture/") if n.endswith(".jsonl.gz")]
        return {
            n: [json.loads(line)["request_id"] for line in gzip.decompress(backend.get(n)).splitlines()]
            for n in names
        }
    finally:
        backend.close()


def all_ids(blobs: dict[str, list[str]]) -> list[str]:
    return [rid for ids in blobs.values() for rid in ids]


def assert_exactly_once(url: str, answered: list[str], timeout: float = 60) -> list[str]:
    """Waits until every answered request id is stored, then: each exactly once, nothing twice."""
    want = set(answered)
    assert len(want) == len(answered)
    assert wait_until(lambda: want <= set(all_ids(stored(url))), timeout=timeout, interval=0.2), (
        f"never stored: {sorted(want - set(all_ids(stored(url))))[:20]}"
    )
    time.sleep(0.6)  # more upload rounds: nothing may appear twice later either
    ids = all_ids(stored(url))
    counts: dict[str, int] = {}
    for rid in ids:
        counts[rid] = counts.get(rid, 0) + 1
    assert not {r: n for r, n in counts.items() if n > 1}, "stored twice"
    return ids


def start_agent(rig: Rig, url: str, **sections: dict[str, Any]) -> AgentProcess:
    cfg: dict[str, dict[str, Any]] = {"sync": {"url": url, **FAST_SYNC}, "telemetry": {"interval": 0.5}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return rig.add_device(DEV, cfg).start()


def deploy_capturing(rig: Rig, tmp: Path) -> str:
    """An MLP image with every request captured; returns the API's URL."""
    model = models.mlp(tmp / "mlp.onnx", sizes=(4, 8, 2))
    b = build_image(rig.bundles_dir / "dur-1.tar", "dur", "1", {"mlp": model}).path
    rig.deploy(DEV, rig.manifest(DEV, b, 1, data_collection={"enabled": True, "sample_rate": 1.0}))
    return str(rig.wait_active(DEV, 1)["runtime"]["api"])


def restart(rig: Rig, agent: AgentProcess, old_api: str) -> str:
    """Start the agent again; the API of the new process (port 0: a new port)."""
    agent.start()
    status = rig.wait_status(DEV, lambda s: (s.get("runtime") or {}).get("api") not in (None, old_api))
    return str(status["runtime"]["api"])


def kill_mid_load(agent: AgentProcess, load: Load, after: int) -> None:
    assert wait_until(lambda: load.count() >= after, timeout=30), "the load never got going"
    agent.kill()
    load.join()
    # The clients were still sending: the kill hit requests in flight, not an idle agent.
    assert load.failed > 0 and load.count() < load.clients * load.per_client


def buffer_counts(state_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(state_dir / "telemetry.db")
    try:
        return {str(c): db.execute(f"SELECT count(*) FROM records_{c}").fetchone()[0] for c in RecordClass}
    finally:
        db.close()


def read_intents(state_dir: Path) -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(state_dir / "agent.db")
    try:
        rows = db.execute("SELECT key, value FROM meta WHERE key LIKE 'sync.intent.%'").fetchall()
    finally:
        db.close()
    return {k.removeprefix("sync.intent."): json.loads(v) for k, v in rows if json.loads(v) is not None}


# --- a real agent -------------------------------------------------------------------------------


def test_sigkill_under_load_loses_no_answered_request(tmp_path: Path) -> None:
    """SIGKILL while clients are being answered: every request that got its 200 is stored, once."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    url = outbox.as_uri()
    with Rig(tmp_path / "rig") as rig:
        agent = start_agent(rig, url)  # capture_commit: the default, before_answer; flush_interval 0.2 s
        api = deploy_capturing(rig, tmp_path)
        load = Load(api, "a", clients=4, per_client=250, pause=0.005).start()
        kill_mid_load(agent, load, after=100)
        answered = list(load.answered)

        api = restart(rig, agent, api)
        after = Load(api, "b", clients=2, per_client=25).start().join()
        assert after.failed == 0
        ids = assert_exactly_once(url, answered + after.answered)
        assert set(answered + after.answered) <= set(ids)


def test_sigkill_during_a_failing_then_stalled_upload(
    tmp_path: Path, azurite: Azurite, proxy: FaultProxy
) -> None:
    """The storage fails every other upload, then hangs them; the agent is SIGKILLed under load while
    an upload hangs. After a restart every answered request is stored exactly once."""
    azurite.create_container("stalled")
    url = azurite.container_url("stalled", base=proxy.origin)
    direct = azurite.container_url("stalled")
    flip = itertools.count()
    proxy.fault = lambda method, path: "500" if method == "PUT" and next(flip) % 2 else None
    with Rig(tmp_path / "rig") as rig:
        agent = start_agent(rig, url)
        api = deploy_capturing(rig, tmp_path)
        load = Load(api, "a", clients=4, per_client=250, pause=0.02).start()
        assert wait_until(lambda: load.count() >= 60 and len(stored(direct)) > 0, timeout=30)
        puts = proxy.count("PUT")
        proxy.fault = lambda method, path: "stall" if method == "PUT" else None
        assert wait_until(lambda: proxy.count("PUT") > puts, timeout=20), "no upload started"
        kill_mid_load(agent, load, after=0)  # an upload is hanging in the proxy right now
        assert read_intents(agent.state_dir), "the upload that hung left no intent"
        answered = list(load.answered)

        proxy.fault = lambda method, path: None
        api = restart(rig, agent, api)
        after = Load(api, "b", clients=2, per_client=25).start().join()
        ids = assert_exactly_once(direct, answered + after.answered)
        assert set(answered + after.answered) <= set(ids)


def test_sigterm_uploads_everything_waiting(tmp_path: Path) -> None:
    """Nothing is due (the batches are far from full or old), and a clean stop ships it all."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    url = outbox.as_uri()
    with Rig(tmp_path / "rig") as rig:
        agent = start_agent(
            rig, url, sync={"interval": 3600, "max_batch_age": 3600, "batch_max_records": 5000}
        )
        api = deploy_capturing(rig, tmp_path)
        load = Load(api, "a", clients=4, per_client=40).start().join()
        assert load.failed == 0 and load.count() == 160
        assert stored(url) == {}  # the uploader has not shipped anything: only the drain will
        assert agent.stop() == 0
        assert_exactly_once(url, load.answered, timeout=5)
        assert buffer_counts(agent.state_dir) == {str(c): 0 for c in RecordClass}
        assert read_intents(agent.state_dir) == {}
        assert '"sync.drained"' in agent.log_text()


def test_a_new_buffer_file_gets_a_new_epoch_and_the_old_intent_is_dropped(
    tmp_path: Path, azurite: Azurite, proxy: FaultProxy
) -> None:
    """The buffer file is deleted between two runs while an upload intent of the first is pending:
    the second run's seqs start at 1 again, but under a new epoch. Every blob of the first run stays
    as it was, and the old intent is never applied to the new file's records. (Here the new file's
    first look at the captures finds none yet, which would make the old intent void anyway; with
    records waiting under its seqs: test_an_intent_is_applied_only_to_the_buffer_file_it_was_recorded_for.)"""
    azurite.create_container("epochs")
    url = azurite.container_url("epochs", base=proxy.origin)
    direct = azurite.container_url("epochs")
    with Rig(tmp_path / "rig") as rig:
        agent = start_agent(rig, url)
        api = deploy_capturing(rig, tmp_path)
        first = Load(api, "a", clients=2, per_client=60).start().join()
        assert first.failed == 0
        assert_exactly_once(direct, first.answered)
        run1 = stored(direct)
        epochs = {n.rsplit("/", 1)[1].split("-")[0] for n in run1}
        assert len(epochs) == 1
        (old_epoch,) = epochs
        assert any(n.rsplit("/", 1)[1].startswith(f"{old_epoch}-000000000001-") for n in run1)

        # an upload hangs and the agent dies: its intent (old epoch) stays in the state database
        puts = proxy.count("PUT", "/capture/")
        proxy.fault = lambda method, path: "stall" if method == "PUT" and "/capture/" in path else None
        Load(api, "lost", clients=1, per_client=50).start().join()
        assert wait_until(lambda: proxy.count("PUT", "/capture/") > puts, timeout=20)
        agent.kill()
        stale = read_intents(agent.state_dir)["capture"]
        assert stale["epoch"] == old_epoch

        for f in agent.state_dir.glob("telemetry.db*"):  # the buffer is lost (an operator, a bad disk)
            f.unlink()
        proxy.fault = lambda method, path: None
        api = restart(rig, agent, api)
        second = Load(api, "b", clients=2, per_client=60).start().join()
        assert second.failed == 0
        assert_exactly_once(direct, first.answered + second.answered)

        now = stored(direct)
        assert {n: now[n] for n in run1} == run1  # nothing of the first run was overwritten
        assert stale["name"] not in now  # the old intent was not applied
        run2 = {n: ids for n, ids in now.items() if n not in run1}
        new_epochs = {n.rsplit("/", 1)[1].split("-")[0] for n in run2}
        assert len(new_epochs) == 1 and old_epoch not in new_epochs
        assert set(all_ids(run2)) >= set(second.answered)
        assert not set(all_ids(run2)) & {r for r in all_ids(run1)}
        assert "sync.stale_intent" in agent.log_text()
        assert read_intents(agent.state_dir).get("capture", {}).get("epoch") in (None, *new_epochs)


# --- the scoring app with a real buffer, in this process ----------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.update.store import BundleStore

    tmp = tmp_path_factory.mktemp("img")
    built = build_image(tmp / "mlp-1.tar", "mlp", "1", {"mlp": models.mlp(tmp / "mlp.onnx", sizes=(4, 8, 2))})
    store = BundleStore(tmp / "store")
    store.install(built.sha256, built.path, "mlp", "1")
    return store.image_dir(built.sha256)


def serving(tmp: Path, image_dir: Path, sink: Any, commit: str, timeout: float = 2.0) -> Serving:
    cfg = AgentConfig(
        device_id="dev-1",
        state_dir=tmp,
        api=ApiConfig(listen="127.0.0.1:0"),
        telemetry=TelemetryConfig(capture_commit=commit, capture_commit_timeout=timeout),
    )
    s = Serving(cfg, sink=sink)
    img = s.runtime.load(image_dir)
    img.capturer = Capturer(
        sink,
        CaptureSettings(enabled=True, sample_rate=1.0),
        {"device_id": "dev-1"},
        durable=s.commits is not None,
    )
    s.commit(img)
    s.start(None, None)
    return s


@pytest.mark.parametrize("commit", ["before_answer", "after_answer"])
def test_an_answer_leaves_after_its_record_is_in_the_file(
    tmp_path: Path, image_dir: Path, commit: str
) -> None:
    """The writer is told to commit only every hour: with before_answer the answer still finds its
    record in the file (committed at once, for it); with after_answer it does not."""
    buf = Buffer(tmp_path / "telemetry.db", budget_bytes=64 << 20, flush_interval_s=3600)
    buf.start()
    s = serving(tmp_path, image_dir, buf, commit)
    db = sqlite3.connect(tmp_path / "telemetry.db")
    try:
        assert s.api is not None
        in_file = []
        with httpx.Client(base_url=s.api.url, timeout=10) as c:
            for i in range(5):
                r = c.post("/v2/models/mlp/infer", json=BODY, headers={"x-request-id": f"r-{i}"})
                assert r.status_code == 200
                found = db.execute(
                    "SELECT count(*) FROM records_capture WHERE instr(payload, ?)", (f'"r-{i}"'.encode(),)
                )
                in_file.append(found.fetchone()[0])
        assert in_file == ([1] * 5 if commit == "before_answer" else [0] * 5)
    finally:
        db.close()
        s.stop()
        buf.close()


class NeverCommits:
    """A buffer whose disk is wedged: it takes records and never says they are committed."""

    def __init__(self) -> None:
        self.tickets = itertools.count(1)
        self.listeners: list[Any] = []

    def put(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> bool:
        return True

    def put_urgent(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> int:
        return next(self.tickets)

    def add_commit_listener(self, fn: Any) -> None:
        self.listeners.append(fn)


def test_a_wedged_disk_delays_answers_by_the_timeout_and_never_blocks_the_loop(
    tmp_path: Path, image_dir: Path
) -> None:
    sink = NeverCommits()
    s = serving(tmp_path, image_dir, sink, "before_answer", timeout=0.5)
    try:
        assert s.api is not None and s.commits is not None and len(sink.listeners) == 1
        url = s.api.url

        async def go() -> tuple[list[float], list[float]]:
            async with httpx.AsyncClient(base_url=url, timeout=10) as c:

                async def score() -> float:
                    t0 = time.monotonic()
                    r = await c.post("/v2/models/mlp/infer", json=BODY)
                    assert r.status_code == 200
                    return time.monotonic() - t0

                async def live() -> float:
                    await asyncio.sleep(0.1)
                    t0 = time.monotonic()
                    assert (await c.get("/v2/health/live")).status_code == 200
                    return time.monotonic() - t0

                scored = asyncio.gather(*(score() for _ in range(8)))
                lived = asyncio.gather(*(live() for _ in range(3)))
                return list(await scored), list(await lived)

        scored, lived = asyncio.run(go())
        assert all(0.45 <= t < 2.0 for t in scored), scored  # answered anyway, after the timeout
        assert all(t < 0.3 for t in lived), lived  # the loop served others while they waited
        assert s.commits.timeouts == 8 and s.commits.waiting == 0
        with httpx.Client(base_url=url) as c:
            assert "edge_capture_commit_timeouts_total 8.0" in c.get("/metrics").text

        sink.listeners[0](10**9)  # the disk comes back: the next answer does not wait
        t0 = time.monotonic()
        with httpx.Client(base_url=url) as c:
            assert c.post("/v2/models/mlp/infer", json=BODY).status_code == 200
        assert time.monotonic() - t0 < 0.4
    finally:
        s.stop()


def test_many_concurrent_answers_each_wait_for_their_own_commit(tmp_path: Path, image_dir: Path) -> None:
    """Concurrent requests, whose records share transactions: each answer finds its record in the
    file, none waits out the timeout. (That concurrent records do share them: test_buffer.py.)"""
    buf = Buffer(tmp_path / "telemetry.db", budget_bytes=64 << 20, flush_interval_s=3600)
    buf.start()
    s = serving(tmp_path, image_dir, buf, "before_answer")
    db = sqlite3.connect(tmp_path / "telemetry.db", check_same_thread=False)
    lock = threading.Lock()
    try:
        assert s.api is not None
        with ThreadPoolExecutor(8) as pool:

            def client(k: int) -> int:
                with httpx.Client(base_url=s.api.url if s.api else "", timeout=10) as c:
                    for i in range(25):
                        rid = f'"{k}-{i}"'.encode()
                        r = c.post("/v2/models/mlp/infer", json=BODY, headers={"x-request-id": f"{k}-{i}"})
                        assert r.status_code == 200
                        with lock:
                            q = "SELECT count(*) FROM records_capture WHERE instr(payload, ?)"
                            assert db.execute(q, (rid,)).fetchone()[0] == 1
                return 25

            assert sum(pool.map(client, range(8))) == 200
        assert buf.stats()["classes"]["capture"]["records"] == 200
        assert s.commits is not None and s.commits.timeouts == 0 and s.commits.waiting == 0
    finally:
        db.close()
        s.stop()
        buf.close()


# --- the uploader on a real buffer, state database and directory store --------------------------


class Failing:
    """A store that is down: every put fails, retryably (as a cut link does)."""

    def __init__(self) -> None:
        self.puts = 0

    def put(self, name: str, data: bytes, content_type: str = "") -> None:
        self.puts += 1
        raise BlobError(ErrorCode.BLOB_UNAVAILABLE, "the storage is down", retryable=True)

    def list(self, prefix: str = "") -> list[str]:
        return []


def filled(path: Path, n: int) -> Buffer:
    buf = Buffer(path, budget_bytes=64 << 20, flush_interval_s=0.01)
    buf.start()
    for i in range(n):
        assert buf.put(RecordClass.CAPTURE, {"request_id": f"r-{i}"})
    assert buf.flush(10)
    return buf


def local_ids(root: Path) -> dict[str, list[str]]:
    return {
        str(p.relative_to(root)): [
            json.loads(x)["request_id"] for x in gzip.decompress(p.read_bytes()).splitlines()
        ]
        for p in sorted(root.rglob("*.jsonl.gz"))
    }


def test_stop_drains_what_is_not_due_and_a_failing_store_keeps_it(tmp_path: Path) -> None:
    buf = filled(tmp_path / "telemetry.db", 30)
    db = StateDB(tmp_path / "agent.db")
    root = tmp_path / "store"
    store = open_backend(root.as_uri(), create=True, retries=0)
    lazy: dict[str, Any] = {"interval_s": 3600, "max_batch_age_s": 3600}  # never due: only a drain uploads
    try:
        up = Uploader(buf, store, "dev", db, drain_timeout_s=5, **lazy)
        up.start()
        time.sleep(0.2)
        assert local_ids(root) == {}
        up.stop()
        assert sorted(all_ids(local_ids(root))) == sorted(f"r-{i}" for i in range(30))
        assert len(local_ids(root)) == 1
        assert buf.stats()["classes"]["capture"]["records"] == 0
        assert db.get_meta("sync.intent.capture") is None

        # drain_timeout 0: a stop uploads nothing
        assert buf.put(RecordClass.CAPTURE, {"request_id": "late"}) and buf.flush(10)
        up = Uploader(buf, store, "dev", db, drain_timeout_s=0, **lazy)
        up.start()
        up.stop()
        assert buf.stats()["classes"]["capture"]["records"] == 1

        # storage down: the drain tries until its deadline, and every record stays for the next start
        failing = Failing()
        up = Uploader(buf, failing, "dev", db, drain_timeout_s=0.5, **lazy)
        up.start()
        t0 = time.monotonic()
        up.stop()
        assert time.monotonic() - t0 < 2.0 and not up.thread.is_alive()
        assert failing.puts >= 2  # tried again within the deadline
        assert buf.stats()["classes"]["capture"]["records"] == 1
        assert up.state.last_error is not None and up.state.last_error["code"] == "blob_unavailable"
        assert db.get_meta("sync.intent.capture")["count"] == 1  # redone under its name next time
    finally:
        store.close()
        buf.close()
        db.close()


def test_an_intent_is_applied_only_to_the_buffer_file_it_was_recorded_for(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = open_backend(root.as_uri(), create=True, retries=0)
    db = StateDB(tmp_path / "agent.db")
    day = "dev/capture/2026/01/01"
    try:
        # an intent of another epoch (a buffer since deleted) over seqs the new file has too
        buf = filled(tmp_path / "new.db", 10)
        stale = {"name": f"{day}/0000000000000000-000000000001-000000000010.jsonl.gz", "epoch": "0" * 16,
                 "first": 1, "last": 10, "count": 10}  # fmt: skip
        db.set_meta("sync.intent.capture", stale)
        Uploader(buf, store, "dev", db, max_batch_age_s=0).run_once(force=True)
        blobs = local_ids(root)
        assert len(blobs) == 1 and stale["name"] not in blobs
        ((name, ids),) = blobs.items()
        assert name.rsplit("/", 1)[1] == f"{buf.epoch}-000000000001-000000000010.jsonl.gz"
        assert ids == [f"r-{i}" for i in range(10)]
        assert db.get_meta("sync.intent.capture") is None
        # an intent from before epochs does not belong to a file created with one either
        assert buf.put(RecordClass.CAPTURE, {"request_id": "r-10"}) and buf.flush(10)
        db.set_meta(
            "sync.intent.capture", {"name": f"{day}/legacy.jsonl.gz", "first": 11, "last": 11, "count": 1}
        )
        Uploader(buf, store, "dev", db, max_batch_age_s=0).run_once(force=True)
        assert f"{day}/legacy.jsonl.gz" not in local_ids(root)
        buf.close()

        # ... but it does to the file that agent used, migrated since: the same records, the same name
        old = tmp_path / "v1.db"
        raw = sqlite3.connect(old)
        for stmt in MIGRATIONS[0]:
            raw.execute(stmt)
        raw.executemany(
            "INSERT INTO records_capture (ts, payload) VALUES (?, ?)",
            [(time.time(), json.dumps({"request_id": f"v1-{i}"}).encode()) for i in range(5)],
        )
        raw.execute("PRAGMA user_version=1")
        raw.commit()
        raw.close()
        buf = Buffer(old, budget_bytes=64 << 20)
        buf.start()
        db.set_meta(
            "sync.intent.capture", {"name": f"{day}/legacy-1-3.jsonl.gz", "first": 1, "last": 3, "count": 3}
        )
        Uploader(buf, store, "dev", db, max_batch_age_s=0).run_once(force=True)
        blobs = local_ids(root)
        assert blobs[f"{day}/legacy-1-3.jsonl.gz"] == ["v1-0", "v1-1", "v1-2"]
        assert sorted(all_ids(blobs)).count("v1-3") == 1 and sorted(all_ids(blobs)).count("v1-0") == 1
        buf.close()
    finally:
        store.close()
        db.close()
