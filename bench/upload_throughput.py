"""Upload throughput: the uploader draining captured records to Azurite, against a raw httpx PUT loop.

Run by hand from the repository root (not part of CI, not a pytest test; needs ``npm ci`` for
Azurite, as the cloud sync tests do)::

    .venv/bin/python bench/upload_throughput.py             # 50000 records per shape, 5 runs (about 45 s)
    .venv/bin/python bench/upload_throughput.py --runs 7 --json
    .venv/bin/python bench/upload_throughput.py --bandwidth 1000000 --runs 3 --no-plain-json   # ~4 min

The requirement: upload to Azurite against a raw httpx PUT loop of the same bytes, target >= 80%;
bytes on the wire against the raw JSON, target <= 25%.

Setup (not timed): Azurite (``tests/conftest_blob.py: Azurite``: ``node_modules/.bin/azurite-blob``
on a free loopback port, its data on disk in the work directory) with one container and a service SAS
URL for it (``racwdl``). For each input shape (``--shapes``, default ``1x4,1x64``) an MLP image
(``simulators.models.mlp``, 4 -> 16 -> 3 or 64 -> 256 -> 256 -> 10) is built with
``deploy.bundle.build_image``, installed and loaded with the agent's ``Runtime``. ``--records``
realistic capture records are made the way the agent makes them: a v2 infer request per record with
its own input (1x4: four measurements with one decimal, as an application reading a sensor or a CSV
sends them; 1x64: float32 values as ``numpy.tolist()`` gives them, 17 significant digits), answered
by ``Scorer.infer``, and recorded by ``Capturer.record`` (lineage, request id, timestamp, latency,
status, the request and the response) into a list: the exact bytes ``agent/telemetry/capture.py`` hands to the
buffer.

Each run, per shape:

- **fill** (not timed): a fresh :class:`agent.telemetry.buffer.Buffer` (the agent's settings, budget 1 GiB so
  that nothing is evicted) gets every record with ``put(CAPTURE, payload, ts=...)``, then ``flush()``.
- **uploader**: ``Uploader(buffer, open_backend(SAS URL, retries=5, backoff 1-60 s), device_id,
  StateDB(agent.db), batch_max_records=5000, batch_max_bytes=8 MiB)``, the agent's sync defaults,
  and ``run_once(force=True)`` timed: per batch ``read_batch`` from SQLite, the intent committed to
  the state database (``synchronous=FULL``), gzip level 6 of the JSON Lines, Put Blob with
  ``Content-MD5``, ``ack`` (a delete in SQLite), the intent cleared. The script checks that every
  record was uploaded and acked.
- **raw, the same gzip blobs** (the baseline): the same blobs, byte for byte (the same batches,
  encoded with ``cloud_sync.uploader.encode`` before the clock starts; the script checks that their
  total size is what the uploader sent), PUT by one ``httpx.Client`` in a loop to the same Azurite
  container, as Put Blob with ``x-ms-blob-type: BlockBlob``, ``x-ms-version`` and the content type;
  each answer must be 201.
- **raw, plain JSON** (for reference; ``--no-plain-json`` leaves it out): the same loop PUTting the
  same batches uncompressed, as JSON Lines: what shipping the records without compression costs.

They rotate which goes first. ``--bandwidth B`` caps every side at B bytes/s with the agent's own
pacing (``open_backend(bandwidth=B)`` for the uploader, ``cloud_sync.pacing.paced`` over a
``TokenBucket`` for the raw loops), to see the uplink as the bottleneck instead of loopback.

Reported: the median records/s and MB/s of raw JSON (the JSON Lines the blobs hold, uncompressed)
with min and max, the ratio of the medians, uploader / raw loop of the same gzip blobs (target >=
0.8), where the uploader's time goes (read, intents, gzip, put, ack: timed by wrapping the objects
it is given, a handful of calls per blob), the bytes on the wire (the compressed blobs) over the raw
JSON bytes (target <= 0.25; HTTP headers add about 0.5 KB per blob to every side), and, on the
first ``--codec-sample`` records, what other encodings would give (gzip levels 1 and 9, bz2, xz, and
gzip after re-encoding FP32 inputs as their shortest float32 text).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import benchlib as bl
import httpx
import numpy as np
import orjson

sys.path.insert(0, str(bl.ROOT / "tests"))
from conftest_blob import Azurite

import agent.telemetry.uploader as uploader_mod
from agent.telemetry.buffer import Buffer, RecordClass
from agent.telemetry.capture import Capturer, CaptureSettings
from agent.telemetry.uploader import CONTENT_TYPE, Uploader, encode
from agent.update.state import StateDB
from cloud_sync.azure import API_VERSION
from cloud_sync.factory import open_backend
from cloud_sync.pacing import TokenBucket, paced

TARGET_RATIO = 0.8
TARGET_WIRE = 0.25
MIB = 1 << 20
BATCH_RECORDS = 5000  # SyncConfig.batch_max_records
BATCH_BYTES = 8 * MIB  # SyncConfig.batch_max_bytes
CONTAINER = "telemetry"
SHAPES = {"1x4": (4, 16, 3), "1x64": bl.MLP_SIZES}

T = TypeVar("T")


# --- records --------------------------------------------------------------------------------------


class ListSink:
    """A capture sink that keeps what it is given: (payload, ts) as Capturer.record puts them."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, float]] = []

    def put(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> bool:
        assert isinstance(payload, bytes) and ts is not None
        self.records.append((payload, ts))
        return True


def make_records(workdir: Path, shape: str, n: int) -> list[tuple[bytes, float]]:
    """``n`` capture records of a v2 request with a 1xK input, made by the agent's own code."""
    from agent.serving.runtime import Runtime, RuntimeSettings
    from agent.serving.scoring import Scorer
    from deploy.bundle import build_image
    from simulators.models import mlp

    sizes = SHAPES[shape]
    src = workdir / "src" / shape
    model = mlp(src / "mlp.onnx", sizes=sizes, seed=3)
    built = build_image(workdir / "bundles" / f"mlp-{shape}.tar", f"mlp-{shape.replace('x', '-')}", "1",
                        {bl.MODEL_NAME: model})  # fmt: skip
    image = bl.install(bl.Image(built.path, built.sha256, "1", model, False), workdir / "store")
    assert image.dir is not None
    runtime = Runtime(RuntimeSettings(intra_op_num_threads=1, inter_op_num_threads=1))
    img = runtime.load(image.dir)
    scorer = Scorer()
    sink = ListSink()
    lineage = {  # what Serving._attach_capture takes from a manifest
        "device_id": "dev-bench-001", "deployment_id": "dep-2f9c41", "rollout_id": "rollout-17",
        "generation": 42,
        "image": {"name": img.name, "version": img.version, "sha256": img.sha256},
    }  # fmt: skip
    cap = Capturer(sink, CaptureSettings(enabled=True, sample_rate=1.0), lineage)
    rng = np.random.default_rng(11)
    k = sizes[0]
    if k == 4:  # four measurements with one decimal (the Iris data set's ranges)
        lo, hi = np.array([4.3, 2.0, 1.0, 0.1]), np.array([7.9, 4.4, 6.9, 2.5])
        rows: list[list[float]] = np.round(rng.uniform(lo, hi, size=(n, 4)), 1).tolist()
    else:  # float32 from a sensor or a feature extractor, as numpy's tolist() writes them
        rows = rng.standard_normal((n, k)).astype(np.float32).tolist()
    for row in rows:
        doc = {"inputs": [{"name": "x", "shape": [1, k], "datatype": "FP32", "data": row}]}
        body = json.dumps(doc, separators=(",", ":")).encode()
        t0 = time.perf_counter()
        status, out = scorer.infer(img, bl.MODEL_NAME, body)
        latency = time.perf_counter() - t0
        if status != 200:
            raise SystemExit(f"{shape}: the scorer answered {status}: {out[:300]!r}")
        cap.record(api="v2", model=bl.MODEL_NAME, version=img.version, request_id=Capturer.request_id(),
                   ts=time.time(), latency_s=latency, status=status, body=body, out=out)  # fmt: skip
    runtime.close()
    return sink.records


def batches(records: Sequence[tuple[bytes, float]]) -> list[list[bytes]]:
    """The batches ``Buffer.read_batch(cls, BATCH_RECORDS, BATCH_BYTES)`` returns, in order: at most
    BATCH_RECORDS, stopping before the record that would pass BATCH_BYTES (at least one)."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for payload, _ in records:
        if cur and (len(cur) == BATCH_RECORDS or size + len(payload) > BATCH_BYTES):
            out.append(cur)
            cur, size = [], 0
        cur.append(payload)
        size += len(payload)
    if cur:
        out.append(cur)
    return out


# --- what other encodings would do (a diagnostic on a sample; the uploader uses gzip level 6) ---------


def shortest_f32(payload: bytes) -> bytes:
    """The record with every v2 input tensor's data re-encoded as float32 in its shortest text: the
    values the model saw, not the bytes the client sent (a design alternative, not what capture does)."""
    doc = orjson.loads(payload)
    for t in (doc.get("input") or {}).get("inputs") or []:
        if t.get("datatype") == "FP32":
            t["data"] = np.asarray(t["data"], dtype=np.float32)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def codecs(records: Sequence[tuple[bytes, float]], sample: int) -> list[tuple[str, float, float]]:
    """(codec, compressed / raw JSON, MB/s of raw JSON) over the first ``sample`` records."""
    data = b"\n".join(p for p, _ in records[:sample]) + b"\n"
    alt = b"\n".join(shortest_f32(p) for p, _ in records[:sample]) + b"\n"
    options: list[tuple[str, bytes, Callable[[bytes], bytes]]] = [
        ("gzip level 1", data, lambda d: gzip.compress(d, 1, mtime=0)),
        ("gzip level 6 (the uploader's)", data, lambda d: gzip.compress(d, 6, mtime=0)),
        ("gzip level 9", data, lambda d: gzip.compress(d, 9, mtime=0)),
        ("bz2 level 9", data, lambda d: bz2.compress(d, 9)),
        ("xz preset 6", data, lambda d: lzma.compress(d, preset=6)),
        ("FP32 inputs as shortest float32 text, gzip level 6", alt, lambda d: gzip.compress(d, 6, mtime=0)),
    ]
    out = []
    for name, d, fn in options:
        t0 = time.perf_counter()
        c = fn(d)
        dt = time.perf_counter() - t0
        out.append((name, len(c) / len(data), len(data) / dt / 1e6))
    return out


# --- timing wrappers around what the Uploader is given -------------------------------------------


@dataclass
class Phases:
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


class TimedBuffer:
    def __init__(self, inner: Buffer, phases: Phases) -> None:
        self.inner, self.phases = inner, phases

    def read_batch(self, cls: Any, max_records: int, max_bytes: int) -> Sequence[Any]:
        return self.phases.timed("read_batch", lambda: self.inner.read_batch(cls, max_records, max_bytes))

    def ack(self, cls: Any, seqs: Any) -> Any:
        return self.phases.timed("ack", lambda: self.inner.ack(cls, seqs))


class TimedBackend:
    def __init__(self, inner: Any, phases: Phases) -> None:
        self.inner, self.phases = inner, phases

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.phases.timed("put", lambda: self.inner.put(name, data, content_type))

    def list(self, prefix: str = "") -> list[str]:
        return self.phases.timed("list", lambda: list(self.inner.list(prefix)))


class TimedIntents:
    def __init__(self, inner: StateDB, phases: Phases) -> None:
        self.inner, self.phases = inner, phases

    def get_meta(self, key: str) -> Any:
        return self.phases.timed("intents", lambda: self.inner.get_meta(key))

    def set_meta(self, key: str, value: Any) -> None:
        self.phases.timed("intents", lambda: self.inner.set_meta(key, value))


# --- one run of each side --------------------------------------------------------------------------


@dataclass
class Side:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)

    def rates(self, n: int) -> list[float]:
        return [n / w for w in self.wall]


def cpu_now() -> float:
    t = os.times()
    return t.user + t.system


def run_uploader(
    workdir: Path,
    url: str,
    records: Sequence[tuple[bytes, float]],
    run: str,
    side: Side,
    bandwidth: float | None,
) -> tuple[int, int]:
    """Fill a fresh buffer, time Uploader.run_once(force=True); returns (bytes_raw, bytes_sent)."""
    buf = Buffer(workdir / f"buffer-{run}.db", budget_bytes=1 << 30, queue_max=max(100_000, len(records) + 1),
                 queue_max_bytes=1 << 30)  # fmt: skip
    buf.start()
    db = StateDB(workdir / f"agent-{run}.db")
    # SyncConfig's defaults: 5 retries, backoff 1-60 s, no bandwidth cap unless --bandwidth
    backend = open_backend(url, retries=5, backoff_min=1.0, backoff_max=60.0, bandwidth=bandwidth)
    try:
        for payload, ts in records:
            if not buf.put(RecordClass.CAPTURE, payload, ts=ts):
                raise SystemExit("the buffer refused a record while filling")
        if not buf.flush(60):
            raise SystemExit("the buffer did not commit the records")
        phases = Phases()
        up = Uploader(
            TimedBuffer(buf, phases), TimedBackend(backend, phases), f"dev-bench-{run}",
            TimedIntents(db, phases), batch_max_records=BATCH_RECORDS, batch_max_bytes=BATCH_BYTES,
        )  # fmt: skip
        real_encode = uploader_mod.encode

        def timed_encode(payloads: Sequence[bytes]) -> bytes:
            return phases.timed("gzip", lambda: real_encode(payloads))

        uploader_mod.encode = timed_encode  # the module global _one() calls
        os.sync()
        try:
            c0, t0 = cpu_now(), time.perf_counter()
            up.run_once(force=True)
            t1, c1 = time.perf_counter(), cpu_now()
        finally:
            uploader_mod.encode = real_encode
        left = buf.read_batch(RecordClass.CAPTURE, 1, 1)
        if up.state.records != len(records) or left or up.state.last_error:
            raise SystemExit(
                f"uploader: {up.state.records} of {len(records)} records uploaded, {len(left)} left, "
                f"error {up.state.last_error}"
            )
    finally:
        backend.close()
        db.close()
        buf.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{workdir / f'buffer-{run}.db'}{suffix}").unlink(missing_ok=True)
    side.wall.append(t1 - t0)
    side.cpu.append(c1 - c0)
    side.phases.append(dict(phases.seconds))
    return up.state.bytes_raw, up.state.bytes_sent


def run_raw(
    client: httpx.Client,
    base: str,
    sas: str,
    blobs: Sequence[bytes],
    name: str,
    side: Side,
    bandwidth: float | None,
) -> None:
    """Put Blob of each blob, one after the other, on one keep-alive connection (with ``bandwidth``:
    the body paced through a TokenBucket, as the agent's backends pace theirs)."""
    bucket = TokenBucket(bandwidth) if bandwidth else None
    os.sync()
    c0, t0 = cpu_now(), time.perf_counter()
    for i, blob in enumerate(blobs):
        headers = {
            "x-ms-blob-type": "BlockBlob", "x-ms-version": API_VERSION, "Content-Type": CONTENT_TYPE,
            "Content-Length": str(len(blob)),
        }  # fmt: skip
        body = blob if bucket is None else paced(blob, bucket)
        r = client.put(f"{base}/{name}-{i:06d}?{sas}", content=body, headers=headers)
        if r.status_code != 201:
            raise SystemExit(f"raw Put Blob answered {r.status_code}: {r.text[:300]}")
    t1, c1 = time.perf_counter(), cpu_now()
    side.wall.append(t1 - t0)
    side.cpu.append(c1 - c0)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--records", type=int, default=50_000, help="capture records per shape (default 50000)")
    ap.add_argument("--shapes", default="1x4,1x64", help="input shapes (default 1x4,1x64)")
    ap.add_argument("--runs", type=int, default=5, help="runs per side and shape (default 5)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: system temp dir)")
    ap.add_argument(
        "--bandwidth", type=float, default=0.0,
        help="cap every side at this many bytes/s (the agent's sync.bandwidth; default 0: none)",
    )  # fmt: skip
    ap.add_argument(
        "--no-plain-json", dest="plain_json", action="store_false",
        help="leave out the raw PUT loop of plain JSON (slow under a low --bandwidth)",
    )  # fmt: skip
    ap.add_argument(
        "--codec-sample", type=int, default=1000, help="records to try other encodings on (default 1000)"
    )
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or any(s not in SHAPES for s in shapes):
        ap.error(f"--shapes: choose from {', '.join(SHAPES)}")
    if args.records < 1 or args.runs < 1 or args.codec_sample < 1:
        ap.error("--records and --runs must be positive")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="upload-throughput-", dir=args.workdir))
    try:
        return bench(workdir, shapes, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


SIDES = {
    "raw_blobs": "raw httpx PUT loop, the same gzip blobs (the baseline)",
    "raw_json": "raw httpx PUT loop, the same batches as plain JSON Lines",
    "uploader": "Uploader.run_once(force=True)",
}


def bench(workdir: Path, shapes: list[str], args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    load = bl.MachineLoad()
    azurite = Azurite(workdir / "azurite").start()
    results: dict[str, dict[str, Any]] = {}
    rows: list[list[str]] = []
    phase_rows: list[list[str]] = []
    wire_rows: list[list[str]] = []
    codec_rows: list[list[str]] = []
    bw: float | None = args.bandwidth or None
    try:
        azurite.create_container(CONTAINER)
        url = azurite.container_url(CONTAINER)
        base, sas = url.split("?", 1)
        client = httpx.Client(timeout=60.0)
        for shape in shapes:
            records = make_records(workdir, shape, args.records)
            plain = [b"\n".join(b) + b"\n" for b in batches(records)]  # what encode() compresses
            blobs = [encode(b) for b in batches(records)]
            json.loads(gzip.decompress(blobs[0]).split(b"\n")[0])  # the blobs hold JSON Lines
            raw_json = sum(len(p) for p in plain)
            wire = sum(len(b) for b in blobs)
            sides = {k: Side() for k in SIDES if args.plain_json or k != "raw_json"}
            keys = list(sides)
            for i in range(args.runs):
                run = f"{shape}-{i}"
                for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                    if key == "uploader":
                        sent_raw, sent = run_uploader(workdir, url, records, run, sides[key], bw)
                        if (sent_raw, sent) != (raw_json, wire):
                            raise SystemExit(
                                f"{shape}: the uploader sent {sent} bytes for {sent_raw} of JSON; the raw "
                                f"loop's blobs are {wire} for {raw_json}: not the same batches"
                            )
                    elif key == "raw_blobs":
                        run_raw(client, base, sas, blobs, f"raw/{run}/gz", sides[key], bw)
                    else:
                        run_raw(client, base, sas, plain, f"raw/{run}/json", sides[key], bw)
                print(f"{shape}: run {i + 1}/{args.runs} done", file=sys.stderr)
            n = len(records)
            up, base_side = sides["uploader"], sides["raw_blobs"]
            ratio = bl.median(up.rates(n)) / bl.median(base_side.rates(n))
            ratio_json = (
                bl.median(up.rates(n)) / bl.median(sides["raw_json"].rates(n))
                if "raw_json" in sides
                else None
            )
            phase_med = {
                k: bl.median([p.get(k, 0.0) for p in up.phases])
                for k in ("read_batch", "intents", "gzip", "put", "ack", "list")
            }
            phase_med["other"] = bl.median(up.wall) - sum(phase_med.values())
            results[shape] = {
                "records": n,
                "blobs": len(blobs),
                "record_bytes_mean": round(raw_json / n - 1, 1),
                "raw_json_bytes": raw_json,
                "wire_bytes": wire,
                "wire_ratio": round(wire / raw_json, 4),
                "ratio": round(ratio, 4),
                "ratio_vs_raw_json_put": None if ratio_json is None else round(ratio_json, 4),
                "uploader_median_phase_s": {k: round(v, 4) for k, v in phase_med.items()},
            }
            for key, side in sides.items():
                rates = side.rates(n)
                results[shape][key] = {
                    "median_records_s": round(bl.median(rates)),
                    "min_records_s": round(min(rates)),
                    "max_records_s": round(max(rates)),
                    "median_mb_s_raw_json": round(bl.median(rates) * raw_json / n / 1e6, 2),
                    "median_wall_s": round(bl.median(side.wall), 4),
                    "median_cpu_s": round(bl.median(side.cpu), 4),
                    "runs_wall_s": [round(w, 4) for w in side.wall],
                }
                vs_base = bl.median(rates) / bl.median(base_side.rates(n))
                rows.append([
                    f"{shape}: {SIDES[key]}", f"{bl.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
                    f"{bl.median(rates) * raw_json / n / 1e6:.1f}", f"{bl.median(side.wall) * 1000:.0f}",
                    f"{bl.median(side.cpu) * 1000:.0f}", f"{vs_base:.3f}",
                ])  # fmt: skip
            total = bl.median(up.wall)
            phase_rows.append(
                [shape] + [f"{phase_med[k] * 1000:.0f} ({phase_med[k] / total:.0%})" for k in
                           ("read_batch", "intents", "gzip", "put", "ack", "other")]
            )  # fmt: skip
            codec_res = codecs(records, args.codec_sample)
            results[shape]["codecs"] = {
                name: {"ratio": round(r, 4), "mb_s": round(v, 1)} for name, r, v in codec_res
            }
            codec_rows += [[f"{shape}: {name}", f"{r:.3f}", f"{v:.0f}"] for name, r, v in codec_res]
            wire_rows.append([
                shape, f"{raw_json / n - 1:.0f}", str(len(blobs)), f"{raw_json / 1e6:.2f}",
                f"{wire / 1e6:.2f}", f"{wire / raw_json:.3f}",
            ])  # fmt: skip
        client.close()
    finally:
        azurite.stop()
    background = load.result()
    info = bl.machine()
    info["httpx"] = httpx.__version__
    info["azurite"] = azurite_version()
    cap = f"bandwidth cap {bw:.0f} B/s on every side" if bw else "no bandwidth cap (loopback)"
    print(f"\n{bl.machine_line(info)}; httpx {info['httpx']}, Azurite {info['azurite']}\n"
          f"{args.records} records per shape, {args.runs} runs per side, {cap}\n")  # fmt: skip
    head = ["shape: side", "median rec/s", "min-max rec/s", "MB/s raw JSON", "wall ms", "CPU ms", "ratio"]
    print(bl.fmt_table(head, rows))
    print("\nwhere the uploader's time goes (median ms, share of its median wall time):")
    print(bl.fmt_table(["shape", "read_batch", "intents", "gzip", "Put Blob", "ack", "other"], phase_rows))
    print("\nbytes on the wire (request bodies; HTTP headers add about 0.5 KB per blob):")
    print(bl.fmt_table(["shape", "record B", "blobs", "raw JSON MB", "gzip MB on the wire", "wire / raw"],
                       wire_rows))  # fmt: skip
    print(f"\nother encodings, on the first {args.codec_sample} records (compressed / raw JSON, MB/s of "
          "raw JSON on one core):")  # fmt: skip
    print(bl.fmt_table(["shape: encoding", "wire / raw", "MB/s"], codec_rows))
    print("\n" + bl.MachineLoad.line(background))
    print("\nratio = median uploader records/s / median records/s of the raw PUT loop of the same gzip "
          f"blobs; target >= {TARGET_RATIO}")  # fmt: skip
    print(f"wire = compressed blob bytes / raw JSON bytes; target <= {TARGET_WIRE}")
    for shape, r in results.items():
        v1 = "meets" if r["ratio"] >= TARGET_RATIO else "below"
        v2 = "meets" if r["wire_ratio"] <= TARGET_WIRE else "above"
        vs_json = r["ratio_vs_raw_json_put"]
        vs = "" if vs_json is None else f"; against PUTs of the plain JSON {vs_json:.3f}"
        print(f"  {shape:<5} throughput {r['ratio']:.3f} ({v1} the target{vs}), wire {r['wire_ratio']:.3f} "
              f"({v2} the target)")  # fmt: skip
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if args.json:
        doc = {
            "benchmark": "upload_throughput",
            "target_ratio": TARGET_RATIO,
            "target_wire_ratio": TARGET_WIRE,
            "records": args.records,
            "runs": args.runs,
            "bandwidth": bw,
            "background": background,
            "machine": info,
            "shapes": results,
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


def azurite_version() -> str:
    try:
        doc = json.loads((bl.ROOT / "node_modules" / "azurite" / "package.json").read_text())
        return str(doc.get("version", "unknown"))
    except (OSError, ValueError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
