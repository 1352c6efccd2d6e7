"""/v2 JSON tensors against the binary tensor data extension, with onnxruntime in-process as the baseline.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/v2_binary.py            # 3 repeats, 2 s per HTTP target
    .venv/bin/python bench/v2_binary.py --short    # 1 repeat, 1 s per target: about 30 s
    .venv/bin/python bench/v2_binary.py --json

Two FP32 MLPs (``simulators.models.mlp``, one image, served by the agent's real serving stack in a
process of its own: ``bench/servers.py agent``):

- **1x784**: an MNIST-sized request to a 784 -> 128 -> 10 model (3.1 KB of tensor; about 13 KB of
  JSON);
- **64x1024**: a batch of 64 rows to a 1024 -> 256 -> 10 model (256 KiB of tensor; about 1.3 MB of
  JSON).

Each is sent two ways, both answered with its 1x10 or 64x10 output:

- **json**: ``{"inputs": [{"data": [...]}]}``, JSON answer (what a curl or KServe client sends);
- **binary**: what ``tritonclient``'s ``infer`` sends by default: a JSON header with
  ``binary_data_size``, the raw float32 bytes after it, ``Inference-Header-Content-Length``, and
  ``binary_data_output`` (the answer's tensor comes back as bytes after its JSON).

Measured per size and encoding, the client (``bench/loadgen.py``, a separate process) on keep-alive
connections for ``--duration`` seconds after ``--warmup`` seconds not counted:

- **c=1**: one connection, one request at a time: p50 and p99 latency.
- **c=16**: 16 connections as fast as they go: requests per second, and p50.
- **handler**: ``Scorer.infer`` in this process on the same body (decode, checks, inference,
  encode; no HTTP): the agent's own cost per request.
- **raw**: ``session.run`` in this process on a ready array, ``intra_op_num_threads = 1`` as the
  agent's sessions: the baseline. Printed as ratios: ``c=1 p50 / raw p50`` (how many times one
  inference's time a request takes) and ``raw rps / c=16 rps`` (raw rps = 1 / p50 of ``session.run``
  on one thread: what one core of onnxruntime alone could do; the p50 rather than the mean, so
  that other processes preempting this one on a shared machine do not move the baseline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib as bl
import numpy as np
from loadgen import choose_client, run_load

#: (key, model name, input rows, layer sizes)
CASES = (("1x784", "m784", 1, (784, 128, 10)), ("64x1024", "m1024", 64, (1024, 256, 10)))
ENCODINGS = ("json", "binary")


@dataclass
class Case:
    key: str
    model: str
    x: np.ndarray
    want: np.ndarray
    bodies: dict[str, tuple[bytes, list[str]]]  # encoding -> (body, extra headers)


def json_body(x: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def binary_body(x: np.ndarray) -> tuple[bytes, list[str]]:
    """Byte for byte what tritonclient 2.x sends for ``infer(model, [InferInput x])``."""
    raw = x.astype("<f4").tobytes()
    inp = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    doc = {
        "inputs": [inp | {"parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(doc, separators=(",", ":")).encode()
    return head + raw, [f"Inference-Header-Content-Length: {len(head)}"]


def decode_answer(status: int, headers: dict[str, str], body: bytes, rows: int) -> np.ndarray:
    """The output ``y`` of an answer in either encoding."""
    if status != 200:
        raise SystemExit(f"the agent answered HTTP {status}: {body[:300]!r}")
    n = headers.get("inference-header-content-length")
    if n is None:
        out = json.loads(body)["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    head = json.loads(body[: int(n)])
    return np.frombuffer(body[int(n) :], dtype="<f4").reshape(head["outputs"][0]["shape"])


def post(url: str, body: bytes, headers: list[str]) -> tuple[int, dict[str, str], bytes]:
    import urllib.request

    hdrs = dict(h.split(": ", 1) for h in headers)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **hdrs})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


def time_calls(fn: Any, runs: int) -> np.ndarray:
    for _ in range(min(50, runs)):
        fn()
    out = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    return out / 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: system temp dir)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per target (default 3)")
    ap.add_argument(
        "--duration", type=float, default=2.0, help="measured seconds per HTTP target (default 2)"
    )
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each (default 0.5)")
    ap.add_argument("--runs", type=int, default=2000, help="in-process calls per repeat (default 2000)")
    ap.add_argument("--short", action="store_true", help="1 repeat, 1 s + 0.3 s warmup, 500 in-process calls")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    if args.short:
        args.repeats, args.duration, args.warmup, args.runs = 1, 1.0, 0.3, 500
    if args.repeats < 1 or args.duration <= 0 or args.runs < 10:
        ap.error("--repeats and --duration must be positive, --runs at least 10")
    client = choose_client("python")  # extra headers need the Python client
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="v2-binary-", dir=args.workdir))
    try:
        return bench(workdir, args, client)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(workdir: Path, args: argparse.Namespace, client: str) -> int:
    import onnxruntime as ort

    from agent.serving.runtime import Runtime, RuntimeSettings
    from agent.serving.scoring import BinaryReply, Scorer
    from deploy.bundle import build_image
    from simulators.models import mlp

    t_start = time.monotonic()
    bg = bl.MachineLoad()
    rng = np.random.default_rng(7)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    files: dict[str, Path] = {}
    sessions: dict[str, ort.InferenceSession] = {}
    cases: list[Case] = []
    for key, name, rows, sizes in CASES:
        files[name] = mlp(workdir / "src" / f"{name}.onnx", sizes=sizes, seed=3)
        sessions[name] = ort.InferenceSession(str(files[name]), opts, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((rows, sizes[0])).astype(np.float32)
        want: np.ndarray = sessions[name].run(["y"], {"x": x})[0]
        cases.append(Case(key, name, x, want, {"json": (json_body(x), []), "binary": binary_body(x)}))
    (workdir / "bundles").mkdir()
    built = build_image(workdir / "bundles" / "v2bin-1.tar", "v2bin", "1", files)
    img = bl.install(bl.Image(built.path, built.sha256, "1", files["m784"], False), workdir / "store")
    assert img.dir is not None
    runtime = Runtime(RuntimeSettings(intra_op_num_threads=1, inter_op_num_threads=1))
    loaded = runtime.load(img.dir)
    scorer = Scorer()

    results: dict[str, dict[str, Any]] = {}
    for c in cases:
        results[c.key] = {"raw_p50_us": []}
        for enc in ENCODINGS:
            results[c.key][enc] = {
                "handler_p50_us": [],
                "c1_p50_us": [],
                "c1_p99_us": [],
                "c16_rps": [],
                "c16_p50_us": [],
            }
    logdir = workdir / "logs"
    with bl.servers() as started:
        agent = bl.start_bench_server(
            "agent", ["agent", "--image-dir", str(img.dir), "--state-dir", str(workdir / "state")], logdir
        )
        started.append(agent)
        for c in cases:  # every target answers what onnxruntime answers, before anything is timed
            for enc, (body, headers) in c.bodies.items():
                got = decode_answer(*post(f"{agent.url}/v2/models/{c.model}/infer", body, headers), len(c.x))
                if not np.allclose(got, c.want, rtol=1e-5, atol=1e-6):
                    raise SystemExit(f"{c.key} {enc}: the agent's answer differs from onnxruntime's")
                hlen = headers[0].split(": ")[1] if headers else None
                status, out = scorer.infer(loaded, c.model, body, hlen)
                assert status == 200 and isinstance(out, BinaryReply) == (enc == "binary")
        for i in range(args.repeats):
            for c in cases:
                sess, feeds = sessions[c.model], {"x": c.x}
                lat = time_calls(lambda s=sess, f=feeds: s.run(["y"], f), args.runs)
                results[c.key]["raw_p50_us"].append(bl.pct(lat, 50))
                for enc in ENCODINGS:
                    body, headers = c.bodies[enc]
                    hlen = headers[0].split(": ")[1] if headers else None
                    r = results[c.key][enc]

                    def handler(m: str = c.model, b: bytes = body, h: str | None = hlen) -> None:
                        _, out = scorer.infer(loaded, m, b, h)
                        if isinstance(out, BinaryReply):  # what the API writes: one join when small
                            b"".join((out.header, *out.tensors))

                    r["handler_p50_us"].append(bl.pct(time_calls(handler, args.runs), 50))
                    path = f"/v2/models/{c.model}/infer"
                    for conns in (1, 16):
                        res = run_load(
                            client, agent.host, agent.port, path, body, connections=conns,
                            duration=args.duration, warmup=args.warmup, headers=headers,
                        )  # fmt: skip
                        if res.error_count:
                            raise SystemExit(f"{c.key} {enc} c={conns}: {res.errors} errors")
                        if conns == 1:
                            r["c1_p50_us"].append(res.p50_us)
                            r["c1_p99_us"].append(res.p99_us)
                        else:
                            r["c16_rps"].append(res.rps)
                            r["c16_p50_us"].append(res.p50_us)
            print(f"repeat {i + 1}/{args.repeats} done", file=sys.stderr)
        if agent.proc.poll() is not None:
            raise SystemExit(f"the agent died during the run: {agent.log_tail()}")
    runtime.close()

    background = bg.result()
    info = bl.machine()
    med = statistics.median
    print(
        f"\n{bl.machine_line(info)}\nclient {client}; {args.repeats} repeat(s) of {args.warmup:g} s warmup + "
        f"{args.duration:g} s per HTTP target; {args.runs} in-process calls; medians over repeats\n"
    )
    head = [
        "input", "encoding", "raw p50 us", "handler p50 us", "c=1 p50 us", "c=1 p99 us",
        "c=1 p50 / raw p50", "c=16 req/s", "c=16 p50 us", "raw req/s (1 thread)", "raw req/s / c=16 req/s",
    ]  # fmt: skip
    table, summary = [], {}
    for c in cases:
        res = results[c.key]
        raw_p50, raw_rps = med(res["raw_p50_us"]), 1e6 / med(res["raw_p50_us"])
        summary[c.key] = {"raw_p50_us": round(raw_p50, 1), "raw_rps": round(raw_rps)}
        for enc in ENCODINGS:
            r = {k: med(v) for k, v in res[enc].items()}
            summary[c.key][enc] = {k: round(v, 1) for k, v in r.items()} | {
                "c1_p50_over_raw_p50": round(r["c1_p50_us"] / raw_p50, 2),
                "raw_rps_over_c16_rps": round(raw_rps / r["c16_rps"], 2),
            }
            table.append([
                c.key, enc, f"{raw_p50:.0f}", f"{r['handler_p50_us']:.0f}", f"{r['c1_p50_us']:.0f}",
                f"{r['c1_p99_us']:.0f}", f"{r['c1_p50_us'] / raw_p50:.2f}", f"{r['c16_rps']:.0f}",
                f"{r['c16_p50_us']:.0f}", f"{raw_rps:.0f}", f"{raw_rps / r['c16_rps']:.2f}",
            ])  # fmt: skip
    print(bl.fmt_table(head, table))
    print("\nbinary against json, same input:")
    for c in cases:
        j, b = summary[c.key]["json"], summary[c.key]["binary"]
        print(
            f"  {c.key:<8} c=1 p50 {j['c1_p50_us']:.0f} -> {b['c1_p50_us']:.0f} us "
            f"({j['c1_p50_us'] / b['c1_p50_us']:.1f}x faster); "
            f"c=16 {j['c16_rps']:.0f} -> {b['c16_rps']:.0f} req/s ({b['c16_rps'] / j['c16_rps']:.1f}x); "
            f"handler {j['handler_p50_us']:.0f} -> {b['handler_p50_us']:.0f} us"
        )
    print("\n" + bl.MachineLoad.line(background))
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if args.json:
        doc = {
            "benchmark": "v2_binary", "client": client, "repeats": args.repeats, "duration_s": args.duration,
            "warmup_s": args.warmup, "runs": args.runs, "background": background, "machine": info,
            "results": summary,
        }  # fmt: skip
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
