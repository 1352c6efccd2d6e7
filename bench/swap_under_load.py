"""Swap under load: latency and failures while a real agent replaces its image 20 times in a row.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/swap_under_load.py               # both variants, 20 swaps, 1000 req/s
    .venv/bin/python bench/swap_under_load.py --variants v2 --swaps 40 --steady 15 --json
    .venv/bin/python bench/swap_under_load.py --rate 0      # closed loop: as fast as the agent answers

The rig is ``simulators.rig.Rig``: a real mosquitto broker with mutual TLS, the local bundle server
and one real ``edge-agent`` process (``python -m agent.ops.cli run``), deployed to with signed
manifests over MQTT exactly as in production. Images are the issue's MLP (64 -> 256 -> 256 -> 10,
``simulators.models.mlp``) built with ``deploy.bundle.build_image``, each from a different seed
and with a smoke test; ``--images`` (default 3) of them are deployed in turn. With 3 images and
the agent's default ``store.keep_images = 2``, every deployment downloads, verifies and unpacks
its bundle again (the store has garbage-collected it), then loads it beside the serving image,
smoke-tests it and swaps: the whole deployment path runs 20 times.

Two variants (``--variants``, default both), each on the same agent with its own images:

- **v2**: images without score.py; the load is ``POST /v2/models/mlp/infer`` (the model is scored
  on the agent's event loop).
- **score.py**: images with the Azure ML ``score.py`` of ``benchlib.SCORE_PY``; the load is
  ``POST /score`` with ``{"data": [[...]]}``, answered by ``run()`` in the WorkerPool
  (``runtime.workers``, default 1): every swap starts new worker processes and stops the old ones.

Per variant: the load generator (``bench/loadgen.py``, a separate process) keeps ``--connections``
keep-alive connections busy at ``--rate`` requests/s in all (each connection on a fixed schedule;
a request's latency counts from when it was due, so a stall is never hidden) and records every
request's start, latency and status. After ``--warmup`` seconds, the steady state is measured for
``--steady`` seconds; then ``--swaps`` deployments are published back to back, each a new
generation, each waited for until the agent reports it ``active`` (or failed). The swap window runs
from the first publication to the last ``active``. Reported: p50, p99 and max latency of the
requests started in each window, the failures (any status but 200, connection errors, timeouts)
in each, the ratio p99(swap window) / p99(steady), and the time each deployment took. Targets:
ratio <= 2 and 0 failures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import benchlib as bl
import numpy as np
from loadgen import Background

TARGET_RATIO = 2.0
DEVICE = "bench-dev"


@dataclass
class Window:
    name: str
    t0_ns: int
    t1_ns: int

    def stats(self, start: np.ndarray, lat: np.ndarray, status: np.ndarray) -> dict[str, Any]:
        sel = (start >= self.t0_ns) & (start < self.t1_ns)
        ok = sel & (status == 200)
        lat_us = lat[ok] / 1000.0
        failures = int(np.count_nonzero(sel & (status != 200)))
        kinds: dict[str, int] = {}
        for code in np.unique(status[sel & (status != 200)]):
            kinds["connection" if code == 0 else f"http_{int(code)}"] = int(
                np.count_nonzero(sel & (status == code))
            )
        span = (self.t1_ns - self.t0_ns) / 1e9
        return {
            "seconds": round(span, 2),
            "requests": int(np.count_nonzero(sel)),
            "rps": round(np.count_nonzero(sel) / span, 1) if span > 0 else 0.0,
            "p50_us": round(bl.pct(lat_us, 50), 1),
            "p99_us": round(bl.pct(lat_us, 99), 1),
            "p999_us": round(bl.pct(lat_us, 99.9), 1),
            "max_us": round(float(lat_us.max()), 1) if lat_us.size else float("nan"),
            "failures": failures,
            "failure_kinds": kinds,
        }


def run_variant(
    rig: Any, variant: str, images: list[bl.Image], gen: int, rate: float, args: argparse.Namespace
) -> tuple[dict[str, Any], int]:
    """Deploy the first image, load the agent, measure steady state, then swap ``args.swaps`` times."""

    def deploy(image: bl.Image, generation: int) -> tuple[dict[str, Any], float]:
        t0 = time.monotonic()
        rig.deploy(DEVICE, rig.manifest(DEVICE, image.bundle, generation))
        status = rig.wait_status(
            DEVICE,
            lambda s: (
                s.get("generation") == generation and s.get("state") in ("active", "failed", "rolled_back")
            ),
            timeout=120,
        )
        return status, time.monotonic() - t0

    gen += 1
    status, _ = deploy(images[0], gen)
    if status["state"] != "active":
        raise SystemExit(f"{variant}: the first deployment ended {status['state']}: {status.get('error')}")
    url = status["runtime"]["api"]
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    x = bl.sample_input()
    path, body = (
        ("/score", bl.score_body(x)) if variant == "score.py" else ("/v2/models/mlp/infer", bl.v2_body(x))
    )
    code, out = bl.post(url + path, body)
    if code != 200:
        raise SystemExit(f"{variant}: {path} answered {code}: {out[:300]!r}")

    budget = args.warmup + args.steady + args.swaps * 30 + 60  # the client stops by itself after this
    load = Background(
        host, int(port), path, body, connections=args.connections, rate=rate, max_duration=budget
    )
    try:
        time.sleep(args.warmup)
        steady = Window("steady", time.monotonic_ns(), 0)
        time.sleep(args.steady)
        steady.t1_ns = time.monotonic_ns()
        swap = Window("swaps", time.monotonic_ns(), 0)
        durations: list[float] = []
        states: list[str] = []
        for i in range(1, args.swaps + 1):
            gen += 1
            status, took = deploy(images[i % len(images)], gen)
            durations.append(took)
            states.append(status["state"])
            print(
                f"  {variant} {_load(rate)}: swap {i}/{args.swaps} -> {status['state']} in {took:.2f} s",
                file=sys.stderr,
            )
        swap.t1_ns = time.monotonic_ns()
        time.sleep(0.2)
    finally:
        start, lat, st, meta, client_cpu = load.stop()
    s_stats, w_stats = steady.stats(start, lat, st), swap.stats(start, lat, st)
    ratio = w_stats["p99_us"] / s_stats["p99_us"] if s_stats["p99_us"] > 0 else float("nan")
    total_failures = int(np.count_nonzero(st != 200))
    result = {
        "variant": variant,
        "load": _load(rate),
        "rate": rate,
        "path": path,
        "steady": s_stats,
        "swaps": w_stats,
        "p99_ratio": round(ratio, 2),
        "failures_whole_run": total_failures,
        "failure_kinds_client": meta.get("error_kinds", {}),
        "deployments": {
            "count": len(durations),
            "not_active": [s for s in states if s != "active"],
            "median_s": round(bl.median(durations), 3),
            "max_s": round(max(durations), 3),
            "all_s": [round(d, 3) for d in durations],
        },
        "client_cpu_s": round(client_cpu, 2),
    }
    return result, gen


def _load(rate: float) -> str:
    return f"{rate:g} req/s" if rate > 0 else "closed loop"


def measure_floor(rate: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The same load against a bare uvloop server answering a fixed body: what this machine and the
    client give any server, so the agent's numbers can be read against it."""
    from loadgen import run_load

    body_file = workdir / "floor-response.json"
    body_file.write_bytes(b"{}" + b" " * 217)  # the size of the agent's v2 answer
    with bl.servers() as started:
        floor = bl.start_bench_server(
            "floor-raw", ["raw", "--response-file", str(body_file)], workdir / "logs"
        )
        started.append(floor)
        r = run_load(
            "python", floor.host, floor.port, "/v2/models/mlp/infer", bl.v2_body(bl.sample_input()),
            connections=args.connections, duration=args.floor_seconds, warmup=args.warmup, rate=rate,
        )  # fmt: skip
    return {"load": _load(rate), "rate": rate, "seconds": round(r.window_s, 2), "requests": r.requests,
            "p50_us": round(r.p50_us, 1), "p99_us": round(r.p99_us, 1), "max_us": round(r.max_us, 1),
            "failures": r.error_count}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: system temp dir)")
    ap.add_argument("--variants", default="v2,score.py", help="comma-separated: v2, score.py (default both)")
    ap.add_argument("--swaps", type=int, default=20, help="deployments back to back (default 20)")
    ap.add_argument("--images", type=int, default=3, help="different images deployed in turn (default 3)")
    ap.add_argument("--steady", type=float, default=8.0, help="steady-state seconds measured (default 8)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of load first (default 1)")
    ap.add_argument("--connections", type=int, default=4, help="keep-alive connections (default 4)")
    ap.add_argument(
        "--rates",
        default="1000,0",
        help="loads, comma-separated requests/s in all; 0: closed loop (default 1000,0)",
    )
    ap.add_argument("--workers", type=int, default=1, help="runtime.workers for score.py images (default 1)")
    ap.add_argument("--floor-seconds", type=float, default=4.0, help="floor measurement per load; 0: none")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in ("v2", "score.py") for v in variants):
        ap.error("--variants takes v2 and/or score.py")
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error("--rates takes numbers")
    if args.swaps < 1 or args.images < 2 or args.steady <= 0 or args.connections < 1 or not rates:
        ap.error("need --swaps >= 1, --images >= 2, --steady > 0, --connections >= 1 and a rate")
    if min(rates) < 0:
        ap.error("--rates must be >= 0")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="swap-bench-", dir=args.workdir))
    try:
        return bench(workdir, variants, rates, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(workdir: Path, variants: list[str], rates: list[float], args: argparse.Namespace) -> int:
    from simulators.rig import Rig

    t_start = time.monotonic()
    results = []
    bg = bl.MachineLoad()
    floors = [measure_floor(rate, args, workdir) for rate in rates] if args.floor_seconds > 0 else []
    with Rig(workdir / "rig") as rig:
        images = {
            v: [
                bl.build_mlp_image(rig.workdir, f"{'py' if v == 'score.py' else 'v2'}-{i + 1}", seed=i + 1,
                                   score_py=v == "score.py")
                for i in range(args.images)
            ]
            for v in variants
        }  # fmt: skip
        overrides: dict[str, Any] = {
            "api": {"listen": "127.0.0.1:0"},
            "runtime": {"workers": args.workers},
            "log_level": "warning",
        }
        agent = rig.add_device(DEVICE, cast(Mapping[str, Mapping[str, Any]], overrides)).start()
        gen = 0
        try:
            for v in variants:
                for rate in rates:
                    result, gen = run_variant(rig, v, images[v], gen, rate, args)
                    results.append(result)
        finally:
            if not agent.running:
                print(agent.log_text()[-3000:], file=sys.stderr)
    background = bg.result()

    info = bl.machine()
    print(
        f"\n{bl.machine_line(info)}\nload: Python client, {args.connections} connections; {args.steady:g} s "
        f"steady state, then {args.swaps} deployments cycling through {args.images} images\n"
    )
    head = [
        "variant",
        "load",
        "window",
        "seconds",
        "requests",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "failures",
    ]
    rows = []
    for f in floors:
        rows.append([
            "floor: bare uvloop server", f["load"], "steady state", f"{f['seconds']:.1f}", str(f["requests"]),
            f"{f['p50_us']:.0f}", f"{f['p99_us']:.0f}", "", f"{f['max_us']:.0f}", str(f["failures"]),
        ])  # fmt: skip
    for r in results:
        for key in ("steady", "swaps"):
            s = r[key]
            rows.append([
                f"{r['variant']} ({r['path']})", r["load"],
                "steady state" if key == "steady" else f"{args.swaps} swaps",
                f"{s['seconds']:.1f}", str(s["requests"]), f"{s['p50_us']:.0f}", f"{s['p99_us']:.0f}",
                f"{s['p999_us']:.0f}", f"{s['max_us']:.0f}", str(s["failures"]),
            ])  # fmt: skip
    print(bl.fmt_table(head, rows))
    print("\ndeployments (publish -> active, seconds):")
    for r in results:
        d = r["deployments"]
        bad = f", NOT ACTIVE: {d['not_active']}" if d["not_active"] else ""
        print(f"  {r['variant']:<9} {r['load']:<12} median {d['median_s']:.2f}, max {d['max_s']:.2f}{bad}")
    print("\n" + bl.MachineLoad.line(background))
    print(f"\ntargets: p99(swaps) / p99(steady) <= {TARGET_RATIO:g}, 0 failures")
    for r in results:
        ok_ratio = r["p99_ratio"] <= TARGET_RATIO
        ok_fail = r["failures_whole_run"] == 0 and not r["deployments"]["not_active"]
        verdict_ratio = "meets" if ok_ratio else "misses"
        verdict_fail = "meets" if ok_fail else "misses"
        print(
            f"  {r['variant']:<9} {r['load']:<12} ratio {r['p99_ratio']:5.2f} ({verdict_ratio}), "
            f"failures {r['failures_whole_run']} ({verdict_fail})"
        )
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if args.json:
        doc = {
            "benchmark": "swap_under_load",
            "target_p99_ratio": TARGET_RATIO,
            "swaps": args.swaps,
            "images": args.images,
            "steady_s": args.steady,
            "connections": args.connections,
            "rates": rates,
            "workers": args.workers,
            "machine": info,
            "background": background,
            "floors": floors,
            "runs": results,
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
