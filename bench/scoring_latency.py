"""Scoring latency: one request at a time through the agent, against onnxruntime called in-process.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/scoring_latency.py               # 5 repeats, 1.5 s per HTTP target
    .venv/bin/python bench/scoring_latency.py --repeats 9 --duration 3 --json
    .venv/bin/python bench/scoring_latency.py --client wrk  # wrk -t1 -c1 as the client
    .venv/bin/python bench/scoring_latency.py --pin same    # everything on CPU 0: no cross-CPU wakeups
    .venv/bin/python bench/scoring_latency.py --pin cross   # servers on CPU 0, the client on CPU 1

The model is the issue's MLP (64 -> 256 -> 256 -> 10, float32, ``simulators.models.mlp``); every
request carries the same 1x64 input. Measured in one run, alternating the targets in each repeat:

- **raw**: ``session.run`` in this process, ``intra_op_num_threads = inter_op_num_threads = 1``,
  on a ready 1x64 float32 array, ``--raw-runs`` calls per repeat: the baseline.
- **agent code, no HTTP**: in this process, ``Scorer.infer(image, "mlp", body)`` and
  ``Metrics.observe`` on an image loaded by ``Runtime.load``: exactly what the API's handler runs for
  a v2 request (JSON parse, checks, tensor decode, inference, JSON encode), without HTTP.
- **floor, raw server**: a bare uvloop protocol server (``bench/servers.py raw``) answering a fixed
  body of the agent's response size: the loopback round trip and the client's own time.
- **floor, raw server + onnxruntime**: the same server running ``session.run`` on a fixed 1x64
  input before each answer (``--onnx``): one inference inside a server that sleeps between
  requests, where caches and the CPU are not as hot as in the raw loop above.
- **floor, uvicorn**: the agent's ``ApiServer`` (uvicorn, httptools, uvloop, same settings) with a
  no-op ASGI app answering the same fixed body: what the HTTP server costs before any of our code.
- **agent, v2**: ``POST /v2/models/mlp/infer`` on the agent's serving stack (``bench/servers.py
  agent``: ``Serving``, in its own process) with an image without score.py.
- **agent, /score**: ``POST /score`` with ``{"data": [[...]]}`` on the same agent and image (the
  model scored directly, no score.py).
- **agent, /score with score.py** (reference): the same request to an agent serving the image with
  the Azure ML ``score.py`` (``run()`` in a WorkerPool process; one worker).

The client (``bench/loadgen.py``) is a separate process sending requests one after the other on one
keep-alive connection for ``--duration`` seconds, after ``--warmup`` seconds not counted; it times
each round trip. Reported per target: the median over repeats of p50 and p99, and the number of
requests. The figure of merit is ``p50(agent, v2) - p50(raw)``, target <= 150 us; the same
difference for ``/score`` is printed too. The floors split that difference: the raw floor is what
any server costs here (loopback + client), ``uvicorn - raw floor`` is the HTTP server, and
``agent - uvicorn floor`` is the agent's own code.

Two more in-process rows time the same calls **cold**: with a 200 us sleep before each, as a server
sees them between requests (caches and branch predictors no longer hot), which is what the
``raw server + onnxruntime`` floor and the agent pay per request.

By default nothing is pinned, as on a device: the kernel decides whether the client and the server
share a CPU, and on a virtual machine waking a process on the other CPU costs tens of microseconds
per message. ``--pin same`` puts this process, the servers and the client on CPU 0 (the code's own
cost, no cross-CPU wakeups); ``--pin cross`` keeps the servers on CPU 0 and the client on CPU 1 (a
wakeup on the other CPU for every message).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib as bl
import numpy as np
from loadgen import LoadResult, choose_client, run_load

TARGET_US = 150.0
COLD_GAP_S = 0.0002


@dataclass
class Row:
    key: str
    label: str
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def add(self, p50: float, p99: float, n: int) -> None:
        self.p50_us.append(p50)
        self.p99_us.append(p99)
        self.count.append(n)

    @property
    def p50(self) -> float:
        return bl.median(self.p50_us)

    @property
    def p99(self) -> float:
        return bl.median(self.p99_us)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "median_p50_us": round(self.p50, 1),
            "median_p99_us": round(self.p99, 1),
            "min_p50_us": round(min(self.p50_us), 1),
            "max_p50_us": round(max(self.p50_us), 1),
            "requests_per_repeat": round(bl.median([float(c) for c in self.count])),
            "p50_us_by_repeat": [round(v, 1) for v in self.p50_us],
            "p99_us_by_repeat": [round(v, 1) for v in self.p99_us],
        }


def time_calls(fn: Any, runs: int, gap_s: float = 0.0) -> np.ndarray:
    """Latency of ``runs`` calls of ``fn()`` in microseconds (after a few unmeasured ones), with a
    sleep of ``gap_s`` before each call when given (cold calls)."""
    for _ in range(min(200, runs)):
        fn()
    out = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(runs):
        if gap_s:
            time.sleep(gap_s)
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out / 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: system temp dir)")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per target (default 5)")
    ap.add_argument(
        "--duration", type=float, default=1.5, help="measured seconds per HTTP target (default 1.5)"
    )
    ap.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds before each (default 0.3)")
    ap.add_argument("--raw-runs", type=int, default=20000, help="in-process calls per repeat (default 20000)")
    ap.add_argument(
        "--client", choices=("python", "wrk"), default="python", help="the client (default python)"
    )
    ap.add_argument(
        "--pin", choices=("none", "same", "cross"), default="none", help="CPU placement (default none)"
    )
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin != "none":
        if args.pin == "cross" and len(cpus) < 2:
            ap.error("--pin cross needs two CPUs")
        os.sched_setaffinity(0, {cpus[0]})  # the servers inherit it, and with --pin same the client
    args.client_cpu = cpus[1] if args.pin == "cross" else None
    if args.repeats < 1 or args.duration <= 0 or args.raw_runs < 100:
        ap.error("--repeats and --duration must be positive, --raw-runs at least 100")
    client = choose_client(args.client)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="scoring-latency-", dir=args.workdir))
    try:
        return bench(workdir, args, client)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(workdir: Path, args: argparse.Namespace, client: str) -> int:
    import onnxruntime as ort

    from agent.serving.runtime import Runtime, RuntimeSettings
    from agent.serving.scoring import Scorer
    from agent.telemetry.metrics import Metrics

    t_start = time.monotonic()
    bg = bl.MachineLoad()
    plain = bl.install(bl.build_mlp_image(workdir, "1", seed=1, score_py=False), workdir / "store")
    scored = bl.install(bl.build_mlp_image(workdir, "1s", seed=1, score_py=True), workdir / "store")
    assert plain.dir is not None and scored.dir is not None
    x = bl.sample_input()
    v2, score = bl.v2_body(x), bl.score_body(x)

    # In-process: raw onnxruntime, and the agent's handler code without HTTP.
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        str(plain.dir / "models" / "mlp.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    feeds = {"x": x}
    want: np.ndarray = sess.run(["y"], feeds)[0]
    runtime = Runtime(RuntimeSettings(intra_op_num_threads=1, inter_op_num_threads=1))
    img = runtime.load(plain.dir)
    scorer, metrics = Scorer(), Metrics()

    def handler() -> None:
        t0 = time.perf_counter()
        status, _ = scorer.infer(img, "mlp", v2)
        metrics.observe(img, "mlp", status, time.perf_counter() - t0)

    status, response = scorer.infer(img, "mlp", v2)
    got = np.asarray(json.loads(response)["outputs"][0]["data"], dtype=np.float32).reshape(want.shape)
    if status != 200 or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise SystemExit(f"the agent's Scorer answered {status} {response[:300]!r}, not {want}")
    (workdir / "response.json").write_bytes(response)  # the floors answer a body of this size

    rows = {
        "raw": Row("raw", "raw: onnxruntime session.run in-process (1 thread)"),
        "handler": Row("handler", "agent code, no HTTP: Scorer.infer + Metrics.observe in-process"),
        "raw_cold": Row("raw_cold", "raw, cold: 200 us sleep before each call"),
        "handler_cold": Row("handler_cold", "agent code, no HTTP, cold: 200 us sleep before each call"),
        "floor_raw": Row("floor_raw", "floor: raw uvloop server, fixed answer"),
        "floor_raw_ort": Row("floor_raw_ort", "floor: raw uvloop server + session.run, fixed answer"),
        "floor_uvicorn": Row("floor_uvicorn", "floor: agent's ApiServer (uvicorn), no-op app"),
        "agent_v2": Row("agent_v2", "agent: POST /v2/models/mlp/infer"),
        "agent_score": Row("agent_score", "agent: POST /score, image without score.py"),
        "agent_score_py": Row("agent_score_py", "agent: POST /score, image with score.py (1 worker)"),
    }
    logdir = workdir / "logs"
    with bl.servers() as started:
        resp = ["--response-file", str(workdir / "response.json")]
        floor_raw = bl.start_bench_server("floor-raw", ["raw", *resp], logdir)
        started.append(floor_raw)
        floor_ort = bl.start_bench_server(
            "floor-raw-ort", ["raw", *resp, "--onnx", str(plain.dir / "models" / "mlp.onnx")], logdir
        )
        started.append(floor_ort)
        floor_uv = bl.start_bench_server("floor-uvicorn", ["uvicorn", *resp], logdir)
        started.append(floor_uv)
        agent = bl.start_bench_server(
            "agent", ["agent", "--image-dir", str(plain.dir), "--state-dir", str(workdir / "state")], logdir
        )
        started.append(agent)
        agent_py = bl.start_bench_server(
            "agent-score-py",
            ["agent", "--image-dir", str(scored.dir), "--state-dir", str(workdir / "state-py"),
             "--workers", "1"],
            logdir,
        )  # fmt: skip
        started.append(agent_py)
        http = {
            "floor_raw": (floor_raw, "/v2/models/mlp/infer", v2),
            "floor_raw_ort": (floor_ort, "/v2/models/mlp/infer", v2),
            "floor_uvicorn": (floor_uv, "/v2/models/mlp/infer", v2),
            "agent_v2": (agent, "/v2/models/mlp/infer", v2),
            "agent_score": (agent, "/score", score),
            "agent_score_py": (agent_py, "/score", score),
        }
        for key, (server, path, body) in http.items():
            code, out = bl.post(server.url + path, body)
            if code != 200:
                raise SystemExit(f"{rows[key].label} answered HTTP {code}: {out[:300]!r}")
        keys = list(rows)
        for i in range(args.repeats):
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                if key == "raw":
                    lat = time_calls(lambda: sess.run(["y"], feeds), args.raw_runs)
                    rows[key].add(bl.pct(lat, 50), bl.pct(lat, 99), lat.size)
                elif key == "handler":
                    lat = time_calls(handler, args.raw_runs)
                    rows[key].add(bl.pct(lat, 50), bl.pct(lat, 99), lat.size)
                elif key in ("raw_cold", "handler_cold"):
                    fn = handler if key == "handler_cold" else lambda: sess.run(["y"], feeds)
                    lat = time_calls(fn, max(args.raw_runs // 8, 100), COLD_GAP_S)
                    rows[key].add(bl.pct(lat, 50), bl.pct(lat, 99), lat.size)
                else:
                    server, path, body = http[key]
                    r: LoadResult = run_load(
                        client, server.host, server.port, path, body,
                        connections=1, duration=args.duration, warmup=args.warmup, cpu=args.client_cpu,
                    )  # fmt: skip
                    if r.error_count:
                        raise SystemExit(f"{rows[key].label}: {r.errors} errors")
                    rows[key].add(r.p50_us, r.p99_us, r.requests)
            print(f"repeat {i + 1}/{args.repeats} done", file=sys.stderr)
        for s in started:
            if s.proc.poll() is not None:
                raise SystemExit(f"{s.name} died during the run: {s.log_tail()}")

    background = bg.result()
    info = bl.machine()
    raw = rows["raw"].p50
    pinned = {
        "none": "nothing pinned",
        "same": f"everything on CPU {min(os.sched_getaffinity(0))}",
        "cross": f"servers on CPU {min(os.sched_getaffinity(0))}, client on CPU {args.client_cpu}",
    }[args.pin]
    print(
        f"\n{bl.machine_line(info)}; {pinned}\n"
        f"client {client} (one connection, sequential), {args.repeats} repeats of "
        f"{args.warmup:g} s warmup + {args.duration:g} s per HTTP target; {args.raw_runs} in-process calls\n"
    )
    head = [
        "target",
        "median p50 us",
        "median p99 us",
        "p50 - raw p50 us",
        "min p50 us",
        "max p50 us",
        "requests",
    ]
    table = []
    for row in rows.values():
        sm = row.summary()
        table.append([
            row.label, f"{sm['median_p50_us']:.1f}", f"{sm['median_p99_us']:.1f}", f"{row.p50 - raw:.1f}",
            f"{sm['min_p50_us']:.1f}", f"{sm['max_p50_us']:.1f}", str(sm["requests_per_repeat"]),
        ])  # fmt: skip
    print(bl.fmt_table(head, table))
    p = {k: r.p50 for k, r in rows.items()}
    split = {
        "loopback round trip + client (raw floor)": p["floor_raw"],
        "one inference in a server (raw floor + onnxruntime - raw floor)": p["floor_raw_ort"]
        - p["floor_raw"],
        "uvicorn (uvicorn floor - raw floor)": p["floor_uvicorn"] - p["floor_raw"],
        "agent's code over uvicorn, v2 (agent v2 - uvicorn floor)": p["agent_v2"] - p["floor_uvicorn"],
        "  of which in-process handler, hot (Scorer.infer + observe - raw)": p["handler"] - raw,
        "  of which in-process handler, cold (same, cold - raw cold)": p["handler_cold"] - p["raw_cold"],
    }
    print("\nwhere the p50 goes (us):")
    for k, v in split.items():
        print(f"  {k:<68} {v:7.1f}")
    print("\n" + bl.MachineLoad.line(background))
    print(f"\ntarget: p50(agent) - p50(raw) <= {TARGET_US:g} us")
    verdicts = {}
    for key in ("agent_v2", "agent_score"):
        delta = p[key] - raw
        verdicts[key] = round(delta, 1)
        verdict = "meets" if delta <= TARGET_US else f"misses by {delta - TARGET_US:.0f} us"
        print(f"  {rows[key].label:<45} {delta:7.1f} us ({verdict} the target)")
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if args.json:
        doc = {
            "benchmark": "scoring_latency",
            "target_us": TARGET_US,
            "client": client,
            "repeats": args.repeats,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "raw_runs": args.raw_runs,
            "pin": args.pin,
            "background": background,
            "machine": info,
            "rows": {k: r.summary() for k, r in rows.items()},
            "p50_minus_raw_us": verdicts,
            "split_p50_us": {k.strip(): round(v, 1) for k, v in split.items()},
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
