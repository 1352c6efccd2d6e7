"""Bundle throughput: download + verify + unpack, against a raw SHA-256 pass over the same file.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/bundle_throughput.py                # 256 MiB bundle, 5 runs
    .venv/bin/python bench/bundle_throughput.py --size-mib 64 --runs 3 --json

What one run measures, per variant, exactly as the agent does it:

1. ``Fetcher(DownloadConfig()).fetch([url], partial, size)``: stream the bundle over loopback HTTP
   from :class:`~simulators.bundle_server.BundleServer` (``sendfile(2)`` on the server side) into
   ``downloads/<sha256>.partial``, hashing on the way in; returns the SHA-256.
2. verify: compare that digest with the bundle's expected SHA-256.
3. ``BundleStore(root, fsync=...).install(digest, partial, name, version)``: safe unpack into
   ``images/<sha256>/`` (``copy_file_range``), with every file and directory fsynced when
   ``fsync=True`` (the agent's default, crash-safe) and without fsync when ``fsync=False`` (to show
   what durability costs). The installed image is deleted after each run.

The baseline, in the same run and over the same bundle file, is a plain ``hashlib.sha256`` pass
(4 MiB ``readinto`` reads into one preallocated buffer) with the page cache warm. The figure of
merit is ``variant throughput / baseline throughput`` on medians; the target is >= 0.8. Throughput
is always the bundle's size divided by the wall time of the step, phases included.

Besides wall time, each step records the process's CPU time (user and system, all threads: the
in-process HTTP server's ``sendfile`` counts too), which shows how busy the cores were; the download
phase's CPU is also split by thread (receiver, HTTP server, sha256). The machine-wide CPU time used
by everything else during the runs, and the hypervisor's steal time, are printed too, to tell a
noisy neighbour from the code's own variance.

The model file is ``os.urandom`` bytes, so nothing compresses or deduplicates. The work directory
(``--workdir``) holds the served bundle and the store; put it on the filesystem you want to measure.
Nothing is tuned to hide noise (no CPU pinning, no governor changes, no warm-up runs dropped): the
server thread, the downloading thread and the hashing thread share the machine's cores, so on a
small machine they compete. Two steps keep the runs independent: an ``os.sync()`` before each timed
step (outside the timing) so that no step pays for writeback of files written by the set-up or an
earlier step, and the order of the two variants alternates from run to run so that an effect of
position (what ran just before) does not always land on the same variant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (``python bench/bundle_throughput.py``): make the repository importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from agent.config import DownloadConfig  # noqa: E402
from agent.update.fetch import Fetcher  # noqa: E402
from agent.update.store import BundleStore  # noqa: E402
from deploy.bundle import build  # noqa: E402
from simulators.bundle_server import BundleServer  # noqa: E402

MIB = 1 << 20
TARGET_RATIO = 0.8
READ_SIZE = 4 * MIB
BUNDLE_NAME = "bench-model"
BUNDLE_VERSION = "1"


@dataclass(frozen=True)
class Stamp:
    """A point in time: wall clock and the process's CPU time so far (all threads)."""

    wall: float
    user: float
    sys: float

    @staticmethod
    def now() -> Stamp:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return Stamp(time.perf_counter(), ru.ru_utime, ru.ru_stime)


@dataclass
class Samples:
    """One measurement over N runs: wall, user CPU and system CPU seconds of each run."""

    wall: list[float] = field(default_factory=list)
    user: list[float] = field(default_factory=list)
    sys: list[float] = field(default_factory=list)

    def add(self, start: Stamp, end: Stamp) -> None:
        self.wall.append(end.wall - start.wall)
        self.user.append(end.user - start.user)
        self.sys.append(end.sys - start.sys)

    def mib_s(self, size: int) -> list[float]:
        return [size / MIB / s for s in self.wall]

    def median_mib_s(self, size: int) -> float:
        return statistics.median(self.mib_s(size))

    def summary(self, size: int) -> dict[str, Any]:
        rates = self.mib_s(size)
        return {
            "median_mib_s": round(statistics.median(rates), 1),
            "min_mib_s": round(min(rates), 1),
            "max_mib_s": round(max(rates), 1),
            "median_wall_s": round(statistics.median(self.wall), 4),
            "median_user_s": round(statistics.median(self.user), 4),
            "median_sys_s": round(statistics.median(self.sys), 4),
            "runs_wall_s": [round(s, 4) for s in self.wall],
        }


@dataclass
class Variant:
    """The measured path with one store setting: the whole path and each of its phases."""

    name: str
    key: str
    fsync: bool
    total: Samples = field(default_factory=Samples)
    download: Samples = field(default_factory=Samples)  # download + hash on the way in + verify
    unpack: Samples = field(default_factory=Samples)  # install: unpack (+ fsync)
    #: CPU seconds (user + sys) of each run's download phase, by thread (see THREAD_ROLES).
    download_threads: dict[str, list[float]] = field(default_factory=dict)


#: The threads of the download phase. The receiver is the thread calling fetch() (recv, h11 parsing,
#: writing the partial file); the server's handler thread serves the connection with sendfile(2); the
#: sha256 thread ends within the phase, so it is what the process used beyond the other two.
THREAD_ROLES = ("receiver (fetch: recv, h11, write)", "HTTP server (sendfile)", "sha256 thread and rest")


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + sys) of each live thread of this process, by native id (Linux /proc;
    clock-tick resolution, 10 ms on most systems)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def split_by_thread(before: dict[int, float], after: dict[int, float], process_cpu: float) -> list[float]:
    """The CPU of one phase by THREAD_ROLES, from thread_cpu() before and after it."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    me = threading.get_native_id()
    receiver = server = 0.0
    for tid, cpu in after.items():
        delta = cpu - before.get(tid, 0.0)
        if tid == me:
            receiver += delta
        elif "process_request" in names.get(tid, ""):  # socketserver's per-connection thread
            server += delta
    return [receiver, server, max(process_cpu - receiver - server, 0.0)]


def sha256_file(path: Path, buf: bytearray) -> str:
    """The baseline: one plain hashlib.sha256 pass over the file, no threads, no extra copies."""
    h = hashlib.sha256()
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def make_bundle(workdir: Path, size: int) -> tuple[Path, str]:
    """A bundle holding ``size`` bytes of random model data; returns its path and sha256."""
    src = workdir / "src"
    src.mkdir()
    model = src / "model.bin"
    with open(model, "wb", buffering=0) as f:
        left = size
        while left:
            n = min(READ_SIZE, left)
            f.write(os.urandom(n))
            left -= n
    bundle = workdir / "served" / f"{BUNDLE_NAME}.tar"
    digest = build(bundle, BUNDLE_NAME, BUNDLE_VERSION, {"model.bin": model})
    shutil.rmtree(src)  # not needed any more; don't let it sit in the page cache
    return bundle, digest


def run_baseline(baseline: Samples, bundle: Path, buf: bytearray, expected: str) -> None:
    os.sync()
    t0 = Stamp.now()
    digest = sha256_file(bundle, buf)
    baseline.add(t0, Stamp.now())
    if digest != expected:
        raise SystemExit(f"baseline digest {digest} differs from the bundle's {expected}")


def run_variant(
    variant: Variant,
    fetcher: Fetcher,
    store: BundleStore,
    url: str,
    size: int,
    expected: str,
    model_size: int,
) -> None:
    """One download + verify + install, timed per phase; the image is deleted afterwards."""
    partial = store.partial_path(expected)
    image = store.image_dir(expected)
    partial.unlink(missing_ok=True)
    shutil.rmtree(image, ignore_errors=True)
    os.sync()

    threads0 = thread_cpu()
    t0 = Stamp.now()
    digest = fetcher.fetch([url], partial, size)
    if digest != expected:  # verify, as the agent does before installing
        raise SystemExit(f"digest mismatch: got {digest}, expected {expected}")
    t1 = Stamp.now()
    threads1 = thread_cpu()
    store.install(digest, partial, BUNDLE_NAME, BUNDLE_VERSION)
    t2 = Stamp.now()

    if (image / "model.bin").stat().st_size != model_size or partial.exists():
        raise SystemExit("the install did not produce the expected image")
    variant.download.add(t0, t1)
    split = split_by_thread(threads0, threads1, (t1.user - t0.user) + (t1.sys - t0.sys))
    for role, cpu in zip(THREAD_ROLES, split, strict=True):
        variant.download_threads.setdefault(role, []).append(cpu)
    variant.unpack.add(t1, t2)
    variant.total.add(t0, t2)
    shutil.rmtree(image)  # the next install must really unpack


def system_cpu() -> tuple[float, float]:
    """Busy and steal CPU seconds of the whole machine so far, from /proc/stat (all processes)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
    }


def fmt_table(size: int, baseline: Samples, variants: list[Variant]) -> str:
    """A Markdown table (readable as plain text too): one row per step, phases indented."""
    base = baseline.median_mib_s(size)
    head = [
        "measurement",
        "median MiB/s",
        "min MiB/s",
        "max MiB/s",
        "ratio",
        "median wall ms",
        "CPU ms user + sys",
    ]
    rows: list[list[str]] = []

    def row(label: str, s: Samples, ratio: str) -> None:
        r = s.mib_s(size)
        cpu = f"{statistics.median(s.user) * 1000:.0f} + {statistics.median(s.sys) * 1000:.0f}"
        rows.append(
            [
                label,
                f"{statistics.median(r):.0f}",
                f"{min(r):.0f}",
                f"{max(r):.0f}",
                ratio,
                f"{statistics.median(s.wall) * 1000:.0f}",
                cpu,
            ]
        )

    row("baseline: hashlib.sha256 of the file", baseline, "1.00")
    for v in variants:
        row(f"agent path, {v.name}", v.total, f"{v.total.median_mib_s(size) / base:.2f}")
        row("phase 1: download + sha256 + verify", v.download, "")
        row("phase 2: unpack (install)", v.unpack, "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if i else "-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to put the bundle and the store: the filesystem to measure (default: system temp dir)",
    )
    ap.add_argument("--size-mib", type=int, default=256, help="model size in MiB (default 256)")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    if args.size_mib <= 0 or args.runs <= 0:
        ap.error("--size-mib and --runs must be positive")

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    # A fresh directory (inside --workdir if given), removed afterwards.
    workdir = Path(tempfile.mkdtemp(prefix="bundle-bench-", dir=args.workdir))
    try:
        return bench(workdir, args.size_mib * MIB, args.runs, args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(workdir: Path, model_size: int, runs: int, as_json: bool) -> int:
    print(f"building a {model_size // MIB} MiB bundle of random bytes in {workdir} ...", file=sys.stderr)
    bundle, expected = make_bundle(workdir, model_size)
    size = bundle.stat().st_size

    buf = bytearray(READ_SIZE)
    sha256_file(bundle, buf)  # warm the page cache for the baseline (the server reads it from there too)

    variants = [Variant("fsync=True (default)", "fsync", True), Variant("fsync=False", "no_fsync", False)]
    stores = {v.key: BundleStore(workdir / "store", fsync=v.fsync) for v in variants}
    baseline = Samples()
    with BundleServer(bundle.parent) as server:
        url = server.url_for(bundle.name)
        fetcher = Fetcher(DownloadConfig())
        busy0, steal0 = system_cpu()
        own0 = Stamp.now()
        try:
            for i in range(runs):
                run_baseline(baseline, bundle, buf, expected)
                for v in variants[i % 2 :] + variants[: i % 2]:
                    run_variant(v, fetcher, stores[v.key], url, size, expected, model_size)
                print(f"run {i + 1}/{runs} done", file=sys.stderr)
        finally:
            fetcher.close()
        busy1, steal1 = system_cpu()
        own1 = Stamp.now()
    # What else ran meanwhile: the machine's busy CPU time minus this process's. That includes kernel
    # threads working for us (disk writeback, journal commits), so it is an upper bound of the noise.
    others = max((busy1 - busy0) - ((own1.user - own0.user) + (own1.sys - own0.sys)), 0.0)
    span = own1.wall - own0.wall
    background = {"other_processes_cores": round(others / span, 2), "steal_s": round(steal1 - steal0, 2)}

    info = machine()
    print(
        f"\nbundle {size / MIB:.1f} MiB, {runs} runs each; {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['mem_gib']} GiB, kernel {info['kernel']}, Python {info['python']}, {info['openssl']}\n"
    )
    print(fmt_table(size, baseline, variants))
    print(f"\nphase 1 CPU by thread, median ms ({info['nproc']} cores x wall = the CPU time available):")
    for v in variants:
        by_thread = ", ".join(
            f"{role} {statistics.median(c) * 1000:.0f}" for role, c in v.download_threads.items()
        )
        available = info["nproc"] * statistics.median(v.download.wall) * 1000
        print(f"  {v.name:<22} {by_thread}; available {available:.0f}")
    print(
        f"\nbackground load during the runs: other processes and kernel threads used "
        f"{background['other_processes_cores']:.2f} cores on average; "
        f"hypervisor steal {background['steal_s']:.2f} s over {span:.1f} s"
    )
    base_med = baseline.median_mib_s(size)
    print(f"\nratio = median agent-path MiB/s / median sha256 MiB/s; target >= {TARGET_RATIO}")
    for v in variants:
        ratio = v.total.median_mib_s(size) / base_med
        print(f"  {v.name:<22} {ratio:.2f}  ({'meets' if ratio >= TARGET_RATIO else 'below'} the target)")

    if as_json:
        doc: dict[str, Any] = {
            "benchmark": "bundle_throughput",
            "bundle_bytes": size,
            "runs": runs,
            "background": background,
            "target_ratio": TARGET_RATIO,
            "machine": info,
            "baseline_sha256": baseline.summary(size),
            "variants": {
                v.key: {
                    "ratio": round(v.total.median_mib_s(size) / base_med, 3),
                    "total": v.total.summary(size),
                    "download_hash_verify": v.download.summary(size),
                    "download_cpu_by_thread_median_s": {
                        role: round(statistics.median(c), 3) for role, c in v.download_threads.items()
                    },
                    "unpack": v.unpack.summary(size),
                }
                for v in variants
            },
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
