"""Capture overhead: scoring throughput with data capture at rate 1.0 against capture off.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/capture_overhead.py              # 4 servers x 5 repeats x (1 s + 5 s): ~130 s
    .venv/bin/python bench/capture_overhead.py --quick      # 4 servers x 3 repeats x (0.5 s + 2 s): ~40 s
    .venv/bin/python bench/capture_overhead.py --repeats 9 --duration 5 --json
    .venv/bin/python bench/capture_overhead.py --api score --client python --connections 4

The requirement: scoring throughput with capture at rate 1.0 against capture off; target >= 95%.

The servers run side by side, each in a process of its own (this script's hidden ``serve``
subcommand), each the agent's real serving path: :class:`agent.serving.activation.Serving` (a ``Runtime`` with
the benchmark MLP image loaded, ``Scorer``, ``Metrics``, the ``ScoringApp`` ASGI app behind
``ApiServer``: uvicorn, httptools, uvloop), and a :class:`agent.telemetry.buffer.Buffer` started with the
agent's settings (``telemetry.db`` in the state directory, ``telemetry.buffer_budget_bytes`` =
256 MiB unless ``--budget-mib``, ``flush_interval`` 0.2 s, ``max_record_bytes`` 1 MiB), as
``agent/ops/daemon.py`` makes it. The only difference:

- **capture off**: the loaded image has no capturer (the buffer is started and idle, as in an agent
  whose deployment does not collect data).
- **capture on, after_answer** (``telemetry.capture_commit = "after_answer"``): the image's
  ``capturer`` is ``Capturer(buffer, CaptureSettings(enabled=True, sample_rate=1.0), lineage)``, with
  the lineage ``Serving`` would attach from a manifest, so every request's input and output go
  through ``Capturer.record`` into ``Buffer.put``, and the buffer's writer thread commits them to
  SQLite, competing for the same cores as the event loop and the load generator (which is the
  point). The answer leaves at once.
- **capture on, before_answer** (the agent's default): the same, but durable: the record goes in with
  ``Buffer.put_urgent`` and the answer waits (on the event loop, without blocking it) until the writer
  reports the record committed (``agent/serving/commits.py``), as ``Serving`` wires it.

The image is the issue's MLP (64 -> 256 -> 256 -> 10, ``simulators.models.mlp``) built with
``deploy.bundle.build_image`` and installed with ``BundleStore.install`` (``benchlib``); the request
is ``POST /v2/models/mlp/infer`` with one 1x64 float input (``--api score``: ``POST /score``
with ``{"data": [[...]]}``), answered by onnxruntime on the event loop. Each captured record is
about 1.9 KB (lineage, the request and the response as JSON).

A fourth server is a diagnostic (``--no-null-sink`` leaves it out): capture on, but its capturer's
sink drops every record (no buffer, no writer thread), to split the cost between the capture code on
the event loop (``Capturer.record`` and the ``x-request-id`` header) and the buffer.

The load generator is ``bench/loadgen.py``'s (``wrk`` when installed, else its Python client), in
its own process, ``--connections`` keep-alive connections posting as fast as answers come, for
``--warmup`` + ``--duration`` seconds; only the last ``--duration`` count. Each repeat loads every
server once, rotating which goes first. Reported: the median over repeats of requests/s (with
min and max), p50 and p99 latency, and the server's CPU per request split by thread (the API's
event loop thread, the buffer's writer thread, the rest), from ``/proc``; the buffer's counters at
the end (records committed, dropped by reason, evicted). The ratio is the median requests/s with
capture over the median without; the median of the per-repeat ratios is printed too.

The buffer fills up: at several thousand captured requests/s and 1.9 KB each, 256 MiB lasts about
half a minute, after which commits also evict the oldest captures (a device whose uplink is slower
than its capture rate is in that state too). ``--budget-mib`` changes it; ``--sample-rate`` measures
another rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib as bl
from loadgen import LoadResult, choose_client, run_load

TARGET_RATIO = 0.95
MIB = 1 << 20


# --- the server (``capture_overhead.py serve``, in its own process) ------------------------------


class NullSink:
    """A capture sink that drops every record (the diagnostic variant: capture without the buffer)."""

    def __init__(self) -> None:
        self.records = 0

    def put(self, cls: Any, payload: Any, priority: int | None = None, ts: float | None = None) -> bool:
        self.records += 1
        return True


def serve(args: argparse.Namespace) -> None:
    from agent.config import AgentConfig, ApiConfig, TelemetryConfig
    from agent.serving.activation import Serving
    from agent.telemetry.buffer import Buffer
    from agent.telemetry.capture import Capturer, CaptureSettings, RecordSink
    from edge_core import log as log_mod

    log_mod.setup("warning")
    state: Path = args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    tc = TelemetryConfig(buffer_budget_bytes=args.budget_mib * MIB, capture_commit=args.commit)
    cfg = AgentConfig(device_id="bench-001", state_dir=state, api=ApiConfig(listen=args.listen), telemetry=tc)
    buffer = Buffer(  # as agent/ops/daemon.py makes it
        state / "telemetry.db",
        budget_bytes=tc.buffer_budget_bytes,
        flush_interval_s=tc.flush_interval,
        max_record_bytes=tc.max_record_bytes,
        synchronous=tc.buffer_synchronous,
    )
    buffer.start()
    serving = Serving(cfg, sink=buffer)
    img = serving.runtime.load(args.image_dir)
    if args.capture in ("on", "null"):
        lineage = {  # what Serving._attach_capture takes from a manifest
            "device_id": cfg.device_id, "deployment_id": "dep-bench-1", "rollout_id": None, "generation": 1,
            "image": {"name": img.name, "version": img.version, "sha256": img.sha256},
        }  # fmt: skip
        sink: RecordSink = buffer if args.capture == "on" else NullSink()
        settings = CaptureSettings(enabled=True, sample_rate=args.sample_rate)
        durable = args.capture == "on" and serving.commits is not None
        img.capturer = Capturer(sink, settings, lineage, durable=durable)
    serving.scorer.smoke_test(img)
    serving.commit(img)
    serving.start(None, None)
    threads = {t.name: t.native_id for t in threading.enumerate()}
    (state / "threads.json").write_text(json.dumps(threads))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    serving.stop()
    stats = buffer.stats()
    buffer.close()
    cap = img.capturer
    stats["capturer"] = {"refused": cap.refused, "truncated": cap.truncated} if cap else None
    stats["commit_timeouts"] = serving.commits.timeouts if serving.commits is not None else None
    (state / "stats.json").write_text(json.dumps(stats))


# --- the benchmark -------------------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + sys) of each live thread of process ``pid``, by native id."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclass
class Variant:
    key: str
    label: str
    capture: str = "on"  # the serve subcommand's --capture
    commit: str = "after_answer"  # and its --commit
    server: bl.Server | None = None
    state_dir: Path | None = None
    threads: dict[str, int] = field(default_factory=dict)  # name -> native id
    runs: list[LoadResult] = field(default_factory=list)
    #: per run: CPU microseconds per request of the API thread, the buffer writer, the rest
    cpu_us: list[tuple[float, float, float]] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return bl.median([float(getattr(r, attr)) for r in self.runs])

    def cpu_split(self) -> tuple[float, float, float]:
        a, w, r = zip(*self.cpu_us, strict=True)
        return bl.median(a), bl.median(w), bl.median(r)

    def summary(self) -> dict[str, Any]:
        api, writer, rest = self.cpu_split()
        return {
            "label": self.label,
            "median_rps": round(self.med("rps"), 1),
            "min_rps": round(min(r.rps for r in self.runs), 1),
            "max_rps": round(max(r.rps for r in self.runs), 1),
            "median_p50_us": round(self.med("p50_us"), 1),
            "median_p99_us": round(self.med("p99_us"), 1),
            "server_cpu_us_per_request": {"api_thread": round(api, 1), "buffer_writer": round(writer, 1),
                                          "rest": round(rest, 1)},
            "runs": [r.summary() for r in self.runs],
        }  # fmt: skip


def start_server(v: Variant, image_dir: Path, workdir: Path, budget_mib: int, sample_rate: float) -> None:
    port = bl.free_port()
    v.state_dir = workdir / f"state-{v.key}"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "serve", "--image-dir", str(image_dir),
        "--state-dir", str(v.state_dir), "--listen", f"127.0.0.1:{port}", "--capture", v.capture,
        "--commit", v.commit,
        "--budget-mib", str(budget_mib), "--sample-rate", str(sample_rate),
    ]  # fmt: skip
    v.server = bl.start_command(
        f"agent-capture-{v.key}", cmd, f"http://127.0.0.1:{port}", workdir / "logs", dict(os.environ),
        ready_path="/v2/health/ready",
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (v.state_dir / "threads.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    v.threads = json.loads((v.state_dir / "threads.json").read_text())


def measure(v: Variant, client: str, path: str, body: bytes, args: argparse.Namespace) -> None:
    assert v.server is not None
    pid = v.server.proc.pid
    before = thread_cpu(pid)
    t0 = time.monotonic()
    r = run_load(
        client, v.server.host, v.server.port, path, body,
        connections=args.connections, duration=args.duration, warmup=args.warmup,
    )  # fmt: skip
    wall = time.monotonic() - t0
    after = thread_cpu(pid)
    if r.error_count or r.requests == 0:
        raise SystemExit(f"{v.label}: {r.requests} requests, errors {r.errors}\n{v.server.log_tail()}")
    # The CPU covers the warmup too, whose requests the client does not count (and wrk rounds both
    # times up to whole seconds): count the requests as the measured rate over the whole call. That
    # overestimates them by the few milliseconds the client takes to start, so CPU per request is
    # slightly low, the same for every server.
    total = r.rps * wall
    delta = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    api = delta.get(v.threads.get("api", -1), 0.0)
    writer = delta.get(v.threads.get("buffer-writer", -1), 0.0)
    rest = sum(delta.values()) - api - writer
    v.runs.append(r)
    v.cpu_us.append((api / total * 1e6, writer / total * 1e6, rest / total * 1e6))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="(internal) one server; the benchmark starts two")
    s.add_argument("--image-dir", type=Path, required=True)
    s.add_argument("--state-dir", type=Path, required=True)
    s.add_argument("--listen", default="127.0.0.1:0")
    s.add_argument("--capture", choices=("on", "off", "null"), required=True)
    s.add_argument("--commit", choices=("before_answer", "after_answer"), default="after_answer")
    s.add_argument("--budget-mib", type=int, default=256)
    s.add_argument("--sample-rate", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: system temp dir)")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per server (default 5)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    ap.add_argument("--api", choices=("v2", "score"), default="v2", help="the request (default v2)")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto", help="default: wrk if any")
    ap.add_argument(
        "--budget-mib", type=int, default=256, help="the buffer's budget (default 256, the agent's)"
    )
    ap.add_argument("--sample-rate", type=float, default=1.0, help="capture's sample_rate (default 1.0)")
    ap.add_argument(
        "--no-null-sink", dest="null_sink", action="store_false",
        help="leave out the diagnostic server whose capturer drops its records",
    )  # fmt: skip
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--quick", action="store_true", help="3 repeats of 0.5 s warmup + 2 s (a rough check)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.duration, args.warmup = 3, 2.0, 0.5
    if args.cmd == "serve":
        serve(args)
        return 0
    if args.repeats < 1 or args.duration <= 0 or args.connections < 1:
        ap.error("--repeats, --duration and --connections must be positive")
    client = choose_client(args.client)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="capture-overhead-", dir=args.workdir))
    try:
        return bench(workdir, args, client)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(workdir: Path, args: argparse.Namespace, client: str) -> int:
    t_start = time.monotonic()
    load = bl.MachineLoad()
    image = bl.install(bl.build_mlp_image(workdir, "1", seed=1, score_py=False), workdir / "store")
    assert image.dir is not None
    x = bl.sample_input()
    path, body = ("/v2/models/mlp/infer", bl.v2_body(x)) if args.api == "v2" else ("/score", bl.score_body(x))
    variants = [
        Variant("off", "capture off (buffer started, idle)", capture="off"),
        Variant("on", f"capture on, sample_rate {args.sample_rate:g}, after_answer"),
        Variant(
            "before", f"capture on, sample_rate {args.sample_rate:g}, before_answer", commit="before_answer"
        ),
    ]
    if args.null_sink:
        variants.append(
            Variant("null", "diagnostic: capture on, records dropped (no buffer)", capture="null")
        )
    stats: dict[str, Any] = {}
    with bl.servers() as started:
        for v in variants:
            start_server(v, image.dir, workdir, args.budget_mib, args.sample_rate)
            assert v.server is not None
            started.append(v.server)
            code, out = bl.post(v.server.url + path, body)
            if code != 200:
                raise SystemExit(f"{v.label} answered HTTP {code}: {out[:300]!r}")
        for i in range(args.repeats):
            for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
                measure(v, client, path, body, args)
            print(
                f"repeat {i + 1}/{args.repeats}: "
                + ", ".join(f"{v.key} {v.runs[-1].rps:.0f} req/s" for v in variants),
                file=sys.stderr,
            )
        for v in variants:
            assert v.server is not None and v.state_dir is not None
            if v.server.proc.poll() is not None:
                raise SystemExit(f"{v.label} died during the run: {v.server.log_tail()}")
            v.server.stop()
            f = v.state_dir / "stats.json"
            stats[v.key] = json.loads(f.read_text()) if f.exists() else None
    background = load.result()
    info = bl.machine()

    off, on, before = variants[0], variants[1], variants[2]
    ratio = on.med("rps") / off.med("rps")
    paired = bl.median([a.rps / b.rps for a, b in zip(on.runs, off.runs, strict=True)])
    ratio_before = before.med("rps") / off.med("rps")
    paired_before = bl.median([a.rps / b.rps for a, b in zip(before.runs, off.runs, strict=True)])
    print(
        f"\n{bl.machine_line(info)}\nclient {client}, {args.connections} connections, {args.repeats} repeats "
        f"of {args.warmup:g} s warmup + {args.duration:g} s per server, POST {path}\n"
    )
    head = ["server", "median req/s", "min-max req/s", "p50 us", "p99 us", "CPU us/req: api + writer + rest",
            "ratio"]  # fmt: skip
    rows = []
    for v in variants:
        a, w, r = v.cpu_split()
        lo, hi = min(x.rps for x in v.runs), max(x.rps for x in v.runs)
        rows.append([
            v.label, f"{v.med('rps'):.0f}", f"{lo:.0f}-{hi:.0f}", f"{v.med('p50_us'):.0f}",
            f"{v.med('p99_us'):.0f}", f"{a:.1f} + {w:.1f} + {r:.1f} = {a + w + r:.1f}",
            f"{v.med('rps') / off.med('rps'):.3f}",
        ])  # fmt: skip
    print(bl.fmt_table(head, rows))
    for key in ("on", "before"):
        s_on = stats.get(key) or {}
        cap = (s_on.get("classes") or {}).get("capture", {})
        print(
            f"\nbuffer of the {key!r} server at the end: {s_on.get('committed', '?')} records committed, "
            f"{cap.get('records', '?')} kept ({cap.get('bytes', 0) / MIB:.0f} MiB), dropped "
            f"{json.dumps(s_on.get('dropped'))}, capturer {json.dumps(s_on.get('capturer'))}"
        )
    print("\n" + bl.MachineLoad.line(background))
    verdict = "meets" if ratio >= TARGET_RATIO else "below"
    print(
        f"\nratio = median req/s with capture / median req/s without: {ratio:.3f} ({verdict} the target "
        f">= {TARGET_RATIO}); median of the per-repeat ratios {paired:.3f}"
    )
    print(
        f"before_answer: {ratio_before:.3f} of capture off (per-repeat median {paired_before:.3f}), "
        f"{before.med('rps') / on.med('rps'):.3f} of after_answer"
    )
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if args.json:
        doc = {
            "benchmark": "capture_overhead",
            "target_ratio": TARGET_RATIO,
            "ratio": round(ratio, 4),
            "paired_ratio_median": round(paired, 4),
            "ratio_before_answer": round(ratio_before, 4),
            "paired_ratio_before_answer_median": round(paired_before, 4),
            "client": client,
            "connections": args.connections,
            "repeats": args.repeats,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "path": path,
            "budget_mib": args.budget_mib,
            "sample_rate": args.sample_rate,
            "background": background,
            "machine": info,
            "variants": {v.key: v.summary() for v in variants},
            "buffer_stats": stats,
        }
        print(json.dumps(doc, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
