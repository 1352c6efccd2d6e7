"""Shared helpers of the scoring benchmarks (``vs_azureml.py``, ``scoring_latency.py``,
``swap_under_load.py``): the MLP images, the Azure ML scoring script they all serve, starting and
stopping server processes, percentiles, machine facts and Markdown tables.

Not a benchmark itself; the scripts in ``bench/`` import it (``bench/`` is on ``sys.path`` when one of
them runs, and this module puts the repository root there too).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The layer sizes of the issue's MLP: 64 -> 256 -> 256 -> 10.
MLP_SIZES = (64, 256, 256, 10)
MODEL_NAME = "mlp"

#: The one scoring script both servers run: azureml-inference-server-http and the agent's score.py
#: workers. It does what a typical Azure ML scoring script for an ONNX model does, with onnxruntime
#: limited to one thread as the agent's own sessions are.
SCORE_PY = '''\
"""Azure ML scoring script for the benchmark MLP (64 -> 256 -> 256 -> 10)."""

import json
import os

import numpy as np
import onnxruntime as ort

session = None
input_name = None


def init():
    global session, input_name
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "mlp.onnx")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name


def run(raw_data):
    data = np.asarray(json.loads(raw_data)["data"], dtype=np.float32)
    outputs = session.run(None, {input_name: data})
    return outputs[0].tolist()
'''


def sample_input(seed: int = 7) -> np.ndarray:
    """One 1x64 float32 row, the request every benchmark sends."""
    return np.random.default_rng(seed).standard_normal((1, MLP_SIZES[0])).astype(np.float32)


def v2_body(x: np.ndarray) -> bytes:
    """An Open Inference Protocol v2 infer request for the MLP's input ``x``."""
    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def score_body(x: np.ndarray) -> bytes:
    """An Azure ML ``/score`` request: ``{"data": [[64 floats]]}``."""
    return json.dumps({"data": x.tolist()}, separators=(",", ":")).encode()


# --- images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A built image bundle and, once installed, its unpacked directory."""

    bundle: Path
    sha256: str
    version: str
    model: Path  # the source ONNX file
    score_py: bool
    dir: Path | None = None


def build_mlp_image(workdir: Path, version: str, seed: int, *, score_py: bool, name: str = "mlp") -> Image:
    """An image of the 64->256->256->10 MLP (weights from ``seed``) built with ``build_image``, with
    or without the Azure ML ``score.py`` above, and a smoke test the device checks on activation."""
    import onnxruntime as ort

    from deploy.bundle import SmokeTest, build_image
    from simulators.models import mlp

    src = workdir / "src" / f"{name}-{version}"
    src.mkdir(parents=True, exist_ok=True)
    model = mlp(src / "mlp.onnx", sizes=MLP_SIZES, seed=seed)
    x = sample_input()
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y: np.ndarray = sess.run(["y"], {"x": x})[0]
    script = None
    if score_py:
        script = src / "score.py"
        script.write_text(SCORE_PY)
        smoke = SmokeTest({"data": x.tolist()}, y.tolist())
    else:
        request = json.loads(v2_body(x))
        expected = {
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 10], "data": y.ravel().tolist()}]
        }
        smoke = SmokeTest(request, expected)
    out = workdir / "bundles" / f"{name}-{version}.tar"
    built = build_image(out, name, version, {MODEL_NAME: model}, score=script, smoke_test=smoke)
    return Image(built.path, built.sha256, version, model, score_py)


def install(image: Image, store_root: Path) -> Image:
    """Unpack an image into a store, as the agent does, and return it with its directory."""
    from agent.update.store import BundleStore

    store = BundleStore(store_root, fsync=False)
    if store.has_image(image.sha256):
        return Image(**{**image.__dict__, "dir": store.image_dir(image.sha256)})
    store.downloads.mkdir(parents=True, exist_ok=True)
    partial = store.partial_path(image.sha256)
    shutil.copyfile(image.bundle, partial)  # install() consumes the file it is given
    meta = json.loads(_bundle_json(image.bundle))
    path = store.install(image.sha256, partial, meta["name"], str(meta["version"]))
    return Image(**{**image.__dict__, "dir": path})


def _bundle_json(bundle: Path) -> bytes:
    from deploy.bundle import read_metadata

    return json.dumps(read_metadata(bundle)).encode()


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """A server in a child process: ``bench/servers.py`` (which prints ``LISTENING <url>`` when
    ready) or any command plus a URL to poll."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.url = url
        self.log = log
        host, port = url.split("//", 1)[1].split(":")
        self.host = host
        self.port = int(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start_bench_server(name: str, args: Sequence[str], logdir: Path, timeout: float = 60.0) -> Server:
    """``python bench/servers.py ARGS``; waits for its ``LISTENING <url>`` line."""
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "servers.py"), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # stop() signals its whole group: the score.py workers too
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line or line.startswith(b"LISTENING "):
            break
    if not line.startswith(b"LISTENING "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-3000:]}")
    return Server(name, proc, line.split()[1].decode(), log)


def start_command(
    name: str, cmd: Sequence[str], url: str, logdir: Path, env: dict[str, str], ready_path: str = "/"
) -> Server:
    """Any server command; ready once ``GET url+ready_path`` answers 200."""
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=logdir, start_new_session=True,
        )  # fmt: skip
    server = Server(name, proc, url, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {server.log_tail()}")
        try:
            with urllib.request.urlopen(url + ready_path, timeout=2) as r:
                if r.status == 200:
                    return server
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not answer {url + ready_path} within 120 s: {server.log_tail()}")


@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    """A list to add servers to; all are stopped on the way out, whatever happens."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for s in reversed(started):
            s.stop()


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def children_cpu() -> float:
    """CPU seconds (user + sys) of this process's children that have been waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- statistics and reporting --------------------------------------------------------------------


def pct(values: Any, q: float) -> float:
    """The q-th percentile (0-100) of ``values`` (linear interpolation), NaN if there are none."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def system_cpu() -> tuple[float, float]:
    """Busy and steal CPU seconds of the whole machine so far, from /proc/stat (all processes)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def machine() -> dict[str, Any]:
    import onnxruntime
    import uvicorn

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "uvicorn": uvicorn.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "code": code_version(),
    }


def code_version() -> str:
    """The commit measured, with ``+dirty`` when the agent's code differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "agent", "deploy", "simulators"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, kernel {info['kernel']}, "
        f"Python {info['python']}, onnxruntime {info['onnxruntime']}, uvicorn {info['uvicorn']}; "
        f"code {info['code']}"
    )


def fmt_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable as plain text too): first column left-aligned, others right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if i else "-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


class MachineLoad:
    """What else ran on the machine during a benchmark: the machine's busy CPU time (/proc/stat)
    minus this process's and its descendants' (``RUSAGE_SELF`` + ``RUSAGE_CHILDREN``: call
    :meth:`result` once every server and client has exited and been waited for), and the
    hypervisor's steal time. Other users of a shared machine show up here."""

    def __init__(self) -> None:
        self.busy0, self.steal0 = system_cpu()
        self.own0 = self._own()
        self.t0 = time.monotonic()

    @staticmethod
    def _own() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            total += ru.ru_utime + ru.ru_stime
        return total

    def result(self) -> dict[str, float]:
        busy1, steal1 = system_cpu()
        span = time.monotonic() - self.t0
        own = self._own() - self.own0
        return {
            "benchmark_cores": round(own / span, 2),
            "other_processes_cores": round(max(busy1 - self.busy0 - own, 0.0) / span, 2),
            "steal_s": round(steal1 - self.steal0, 2),
            "span_s": round(span, 1),
        }

    @staticmethod
    def line(r: dict[str, float]) -> str:
        return (
            f"CPU during the run: this benchmark's processes {r['benchmark_cores']:.2f} cores, "
            f"other processes "
            f"{r['other_processes_cores']:.2f} cores on average; hypervisor steal {r['steal_s']:.2f} s "
            f"over {r['span_s']:.0f} s"
        )
