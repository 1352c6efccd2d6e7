"""Scoring throughput: the agent against Azure ML's own inference server, same model, same score.py.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/vs_azureml.py                    # workers 1 and 2, 3 x 3 s, wrk if installed
    .venv/bin/python bench/vs_azureml.py --workers 2 --repeats 5 --duration 5 --json
    .venv/bin/python bench/vs_azureml.py --client python    # the Python load generator instead of wrk

The first run creates a separate virtual environment, ``<workdir>/azureml-venv`` (default workdir
``./bench-run/``, which git ignores), and installs ``azureml-inference-server-http`` from PyPI
into it, with the same onnxruntime and numpy versions as the project's venv; its dependencies
(Flask, gunicorn, OpenTelemetry, pydantic...) never touch the project's environment. Later runs
reuse it (about 15 s saved).

What runs, for each worker count in ``--workers`` (default ``1,2``), on this machine, in one run:

- **azureml**: ``azmlinfsrv --entry_script <image>/score.py --model_dir <image>/models --port P
  --health_port H --worker_count N`` with ``AZUREML_MODEL_DIR`` set: gunicorn with N sync worker
  processes running Flask and the scoring script (its defaults otherwise: access log on, and a
  sync worker closes the connection after every response).
- **agent, /score**: the agent's serving stack in its own process (``bench/servers.py agent``:
  ``Serving`` with ``runtime.workers = N``), the same image, so the same ``score.py`` runs its
  ``run()`` in the agent's WorkerPool processes.
- **agent, /v2/models/mlp/infer** (reference): the same agent process scoring the same model
  directly (onnxruntime on the event loop, no score.py).

The image is built with ``deploy.bundle.build_image`` from ``simulators.models.mlp`` (64 -> 256 ->
256 -> 10, float32) and ``benchlib.SCORE_PY``, and installed with ``BundleStore.install``; azureml
is pointed at the installed image's ``score.py`` and ``models/`` directory, so both servers load
the very same files. ``init()`` loads the model with onnxruntime (one intra- and one inter-op
thread); ``run()`` parses ``{"data": [[64 floats]]}`` and returns the output as a list. Before
timing, both answers are compared with onnxruntime called in-process.

The load generator is the same for every server: ``wrk`` when installed (else the Python client of
``bench/loadgen.py``), in its own process, ``--connections`` (default 8) keep-alive connections
posting the same 1x64 request for ``--warmup`` + ``--duration`` seconds; only the last
``--duration`` count. Each repeat measures every target once, in a rotating order. Reported per
target: the median over repeats of requests/s (with min and max), of p50 and p99 latency, the
errors (non-2xx, connection errors, timeouts), and the CPU time the server's processes used per
request (psutil, over the whole process tree: the gunicorn workers, the agent's score.py workers).
The ratio is the agent's median requests/s on ``/score`` over azureml's; the target is >= 3.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib as bl
import numpy as np
import psutil
from loadgen import LoadResult, choose_client, run_load

TARGET_RATIO = 3.0
AZUREML_PACKAGE = "azureml-inference-server-http"
AZUREML_VERSION = "1.5.1"


@dataclass
class Target:
    key: str
    label: str
    path: str
    body: bytes
    runs: list[LoadResult] = field(default_factory=list)
    #: Server CPU per request: (main process, its child processes), in microseconds.
    cpu_us_per_req: list[tuple[float, float]] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return bl.median([getattr(r, attr) for r in self.runs])

    def summary(self) -> dict[str, Any]:
        rps = [r.rps for r in self.runs]
        return {
            "label": self.label,
            "path": self.path,
            "median_rps": round(bl.median(rps), 1),
            "min_rps": round(min(rps), 1),
            "max_rps": round(max(rps), 1),
            "median_p50_ms": round(self.med("p50_us") / 1000, 3),
            "median_p99_ms": round(self.med("p99_us") / 1000, 3),
            "errors": sum(r.error_count for r in self.runs),
            "median_server_cpu_us_per_request": round(bl.median([a + b for a, b in self.cpu_us_per_req]), 1),
            "median_main_process_cpu_us_per_request": round(
                bl.median([a for a, _ in self.cpu_us_per_req]), 1
            ),
            "median_child_processes_cpu_us_per_request": round(
                bl.median([b for _, b in self.cpu_us_per_req]), 1
            ),
            "runs": [r.summary() for r in self.runs],
        }


def ensure_azureml_venv(workdir: Path, version: str) -> Path:
    """``<workdir>/azureml-venv`` with azureml-inference-server-http and the project's own
    onnxruntime and numpy versions; built once, rebuilt when the wanted versions change."""
    venv = workdir / "azureml-venv"
    want = {
        AZUREML_PACKAGE: version,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "numpy": importlib.metadata.version("numpy"),
        "python": sys.version.split()[0],
    }
    marker = venv / "bench-venv.json"
    if (venv / "bin" / "azmlinfsrv").exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return venv
    print(f"creating {venv} and installing {AZUREML_PACKAGE}=={version} from PyPI ...", file=sys.stderr)
    shutil.rmtree(venv, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"{k}=={v}" for k, v in want.items() if k != "python"]
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *pins,
        ],
        check=True,
    )
    marker.write_text(json.dumps(want))
    return venv


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + sys) used so far by a process, and by its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    own = children = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if p.pid == pid:
            own = t.user + t.system
        else:
            children += t.user + t.system
    return own, children


def check_answer(name: str, status: int, body: bytes, want: np.ndarray) -> None:
    if status != 200:
        raise SystemExit(f"{name} answered HTTP {status}: {body[:500]!r}")
    doc = json.loads(body)
    got = np.asarray(doc["outputs"][0]["data"] if isinstance(doc, dict) else doc, dtype=np.float32)
    if not np.allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6):
        raise SystemExit(f"{name} answered {got} instead of {want}")


def start_azureml(venv: Path, image_dir: Path, workers: int, logdir: Path) -> bl.Server:
    port, health = bl.free_port(), bl.free_port()
    home = logdir / "azureml-home"  # gunicorn's control socket goes to $HOME/.gunicorn
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AZUREML_MODEL_DIR": str(image_dir / "models"), "HOME": str(home)}
    cmd = [
        str(venv / "bin" / "azmlinfsrv"),
        "--entry_script", str(image_dir / "score.py"),
        "--model_dir", str(image_dir / "models"),
        "--port", str(port),
        "--health_port", str(health),
        "--worker_count", str(workers),
    ]  # fmt: skip
    return bl.start_command(f"azureml-w{workers}", cmd, f"http://127.0.0.1:{port}", logdir, env)


def bench_config(
    workers: int,
    venv: Path,
    image: bl.Image,
    workdir: Path,
    args: argparse.Namespace,
    client: str,
    want: np.ndarray,
) -> list[Target]:
    assert image.dir is not None
    x = bl.sample_input()
    targets = [
        Target(
            "azureml", f"azureml-inference-server-http {AZUREML_VERSION}, /score", "/score", bl.score_body(x)
        ),
        Target("agent_score", "agent, /score (score.py in WorkerPool)", "/score", bl.score_body(x)),
        Target("agent_v2", "agent, /v2/models/mlp/infer (direct)", "/v2/models/mlp/infer", bl.v2_body(x)),
    ]
    logdir = workdir / "logs"
    with bl.servers() as started:
        az = start_azureml(venv, image.dir, workers, logdir)
        started.append(az)
        agent = bl.start_bench_server(
            f"agent-w{workers}",
            ["agent", "--image-dir", str(image.dir), "--state-dir", str(workdir / "agent-state"),
             "--workers", str(workers)],
            logdir,
        )  # fmt: skip
        started.append(agent)
        server_of = {"azureml": az, "agent_score": agent, "agent_v2": agent}
        for t in targets:
            s = server_of[t.key]
            check_answer(t.label, *bl.post(s.url + t.path, t.body), want)
        for i in range(args.repeats):
            order = targets[i % len(targets) :] + targets[: i % len(targets)]
            for t in order:
                s = server_of[t.key]
                cpu0 = tree_cpu(s.proc.pid)
                r = run_load(
                    client, s.host, s.port, t.path, t.body,
                    connections=args.connections, duration=args.duration, warmup=args.warmup,
                )  # fmt: skip
                cpu1 = tree_cpu(s.proc.pid)
                # The server's CPU over warmup + window, per request answered in that time.
                per_req = 1e6 / max(r.requests * (args.warmup + r.window_s) / r.window_s, 1)
                t.runs.append(r)
                t.cpu_us_per_req.append(((cpu1[0] - cpu0[0]) * per_req, (cpu1[1] - cpu0[1]) * per_req))
                print(
                    f"  workers={workers} repeat {i + 1}/{args.repeats} {t.key:<11} {r.rps:8.0f} req/s "
                    f"p50 {r.p50_us / 1000:6.2f} ms p99 {r.p99_us / 1000:8.2f} ms errors {r.error_count}",
                    file=sys.stderr,
                )
        for s in (az, agent):
            if s.proc.poll() is not None:
                raise SystemExit(f"{s.name} died during the run: {s.log_tail()}")
    return targets


def fmt_config_table(results: dict[int, list[Target]]) -> str:
    head = [
        "workers", "server, endpoint", "median req/s", "min req/s", "max req/s",
        "p50 ms", "p99 ms", "errors", "server CPU us/req (main + children)", "ratio vs azureml",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for workers, targets in results.items():
        base = targets[0].med("rps")
        for t in targets:
            s = t.summary()
            rows.append([
                str(workers), t.label, f"{s['median_rps']:.0f}", f"{s['min_rps']:.0f}", f"{s['max_rps']:.0f}",
                f"{s['median_p50_ms']:.2f}", f"{s['median_p99_ms']:.2f}", str(s["errors"]),
                f"{s['median_server_cpu_us_per_request']:.0f} "
                f"({s['median_main_process_cpu_us_per_request']:.0f} + "
                f"{s['median_child_processes_cpu_us_per_request']:.0f})",
                f"{t.med('rps') / base:.2f}",
            ])  # fmt: skip
    return bl.fmt_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--workdir", type=Path, default=Path("bench-run"), help="default ./bench-run (git-ignored)"
    )
    ap.add_argument(
        "--workers", default="1,2", help="worker counts to compare, comma-separated (default 1,2)"
    )
    ap.add_argument(
        "--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)"
    )
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default 3)")
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per target (default 3)")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto", help="load generator")
    ap.add_argument("--azureml-version", default=AZUREML_VERSION)
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",")]
    if args.repeats < 1 or args.duration <= 0 or args.connections < 1 or min(worker_counts) < 1:
        ap.error("--repeats, --duration, --connections and --workers must be positive")
    client = choose_client(args.client)

    t_start = time.monotonic()
    venv = ensure_azureml_venv(args.workdir.absolute(), args.azureml_version)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vs-azureml-", dir=args.workdir.absolute()))
    try:
        image = bl.install(bl.build_mlp_image(workdir, "1", seed=1, score_py=True), workdir / "store")
        import onnxruntime as ort

        sess = ort.InferenceSession(str(image.model), providers=["CPUExecutionProvider"])
        want: np.ndarray = sess.run(["y"], {"x": bl.sample_input()})[0]
        bg = bl.MachineLoad()
        results = {w: bench_config(w, venv, image, workdir, args, client, want) for w in worker_counts}
        background = bg.result()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info = bl.machine()
    print(
        f"\n{bl.machine_line(info)}\nclient {client}, {args.connections} connections, {args.repeats} "
        f"repeats of {args.warmup:g} s warmup + {args.duration:g} s; "
        f"azureml-inference-server-http {args.azureml_version}\n"
    )
    print(fmt_config_table(results))
    print("\n" + bl.MachineLoad.line(background))
    print(f"\nratio = agent /score median req/s / azureml median req/s; target >= {TARGET_RATIO:g}")
    ratios = {}
    for w, targets in results.items():
        ratio = targets[1].med("rps") / targets[0].med("rps")
        ratios[w] = ratio
        verdict = "meets" if ratio >= TARGET_RATIO else "below"
        print(f"  workers={w}: {ratio:.2f} ({verdict} the target)")
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if args.json:
        doc = {
            "benchmark": "vs_azureml",
            "target_ratio": TARGET_RATIO,
            "client": client,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "azureml_version": args.azureml_version,
            "machine": info,
            "background": background,
            "configs": {
                str(w): {"ratio": round(ratios[w], 3), "targets": {t.key: t.summary() for t in ts}}
                for w, ts in results.items()
            },
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
