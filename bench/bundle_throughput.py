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
   what durability costs).

The baseline, in the same run and over the same bundle file, is a plain ``hashlib.sha256`` pass
(4 MiB ``readinto`` reads into one preallocated buffer) with the page cache warm. The figure of
merit is ``variant throughput / baseline throughput`` on medians; the target is >= 0.8.

The model file is ``os.urandom`` bytes, so nothing compresses or deduplicates. The work directory
(``--workdir``) holds the served bundle and the store; keep it on the filesystem you want to measure.
Nothing is tuned to hide noise (no CPU pinning, no governor changes): the server thread, the
downloading thread and the hashing thread all share the machine's cores, so on a small machine they
compete. The only isolation step is an ``os.sync()`` (outside the timed region) before each timed
run, so that a run does not pay for writeback of files written by the set-up or an earlier run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (``python bench/bundle_throughput.py``): make the repository importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from agent.config import DownloadConfig  # noqa: E402
from agent.fetch import Fetcher  # noqa: E402
from agent.store import BundleStore  # noqa: E402
from deploy.bundle import build  # noqa: E402
from simulators.bundle_server import BundleServer  # noqa: E402

MIB = 1 << 20
TARGET_RATIO = 0.8
READ_SIZE = 4 * MIB
BUNDLE_NAME = "bench-model"
BUNDLE_VERSION = "1"


@dataclass
class Samples:
    """Wall-clock seconds of each run of one measurement."""

    seconds: list[float] = field(default_factory=list)

    def mib_s(self, size: int) -> list[float]:
        return [size / MIB / s for s in self.seconds]

    def summary(self, size: int) -> dict[str, Any]:
        rates = self.mib_s(size)
        return {
            "median_s": statistics.median(self.seconds),
            "median_mib_s": statistics.median(rates),
            "min_mib_s": min(rates),
            "max_mib_s": max(rates),
            "runs_s": [round(s, 4) for s in self.seconds],
        }


@dataclass
class Variant:
    """The measured path with one store setting: total time and the time of each phase."""

    name: str
    fsync: bool
    total: Samples = field(default_factory=Samples)
    download: Samples = field(default_factory=Samples)  # download + hash on the way in + verify
    unpack: Samples = field(default_factory=Samples)  # install: unpack (+ fsync)


def sha256_file(path: Path, buf: bytearray) -> str:
    """The baseline: one plain hashlib.sha256 pass over the file, no threads, no extra copies."""
    h = hashlib.sha256()
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def make_bundle(workdir: Path, size: int) -> tuple[Path, str]:
    """A bundle holding ``size`` bytes of random model data (written in 4 MiB pieces)."""
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


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_variant(
    variant: Variant,
    fetcher: Fetcher,
    store: BundleStore,
    url: str,
    size: int,
    expected: str,
    model_size: int,
) -> None:
    partial = store.partial_path(expected)
    image = store.image_dir(expected)
    partial.unlink(missing_ok=True)
    shutil.rmtree(image, ignore_errors=True)
    os.sync()

    t0 = time.perf_counter()
    digest = fetcher.fetch([url], partial, size)
    if digest != expected:  # verify, as the agent does before installing
        raise SystemExit(f"digest mismatch: got {digest}, expected {expected}")
    t1 = time.perf_counter()
    store.install(digest, partial, BUNDLE_NAME, BUNDLE_VERSION)
    t2 = time.perf_counter()

    if (image / "model.bin").stat().st_size != model_size:
        raise SystemExit("unpacked model has the wrong size")
    variant.download.seconds.append(t1 - t0)
    variant.unpack.seconds.append(t2 - t1)
    variant.total.seconds.append(t2 - t0)
    shutil.rmtree(image)  # between runs: the next install must really unpack


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
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
    }


def fmt_table(size: int, baseline: Samples, variants: list[Variant]) -> str:
    base = statistics.median(baseline.mib_s(size))
    rows: list[tuple[str, Samples, Variant | None]] = [
        ("baseline: hashlib.sha256 of the file", baseline, None)
    ]
    for v in variants:
        rows.append((f"agent path, {v.name}", v.total, v))
    head = f"{'measurement':<44} {'median MiB/s':>12} {'min':>8} {'max':>8} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for label, s, var in rows:
        r = s.mib_s(size)
        med = statistics.median(r)
        ratio = "" if var is None else f"{med / base:6.2f}"
        lines.append(f"{label:<44} {med:12.0f} {min(r):8.0f} {max(r):8.0f} {ratio:>6}")
        if var is not None:
            for plabel, ps in (
                ("download + sha256 + verify", var.download),
                ("unpack (install)", var.unpack),
            ):
                pr = ps.mib_s(size)
                pmed = statistics.median(ps.seconds)
                lines.append(
                    f"  {plabel:<42} {statistics.median(pr):12.0f} {min(pr):8.0f} {max(pr):8.0f}"
                    f"   ({pmed * 1000:.0f} ms median)"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
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
        return _bench(workdir, args.size_mib * MIB, args.runs, args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _bench(workdir: Path, model_size: int, runs: int, as_json: bool) -> int:
    print(f"building a {model_size // MIB} MiB bundle of random bytes in {workdir} ...", file=sys.stderr)
    bundle, expected = make_bundle(workdir, model_size)
    size = bundle.stat().st_size

    buf = bytearray(READ_SIZE)
    if sha256_file(bundle, buf) != expected:  # also warms the page cache for the baseline
        raise SystemExit("baseline digest differs from the bundle's digest")

    variants = [Variant("fsync=True (default)", True), Variant("fsync=False", False)]
    stores = {v.name: BundleStore(workdir / "store", fsync=v.fsync) for v in variants}
    baseline = Samples()
    with BundleServer(bundle.parent) as server:
        url = server.url_for(bundle.name)
        fetcher = Fetcher(DownloadConfig())
        try:
            for i in range(runs):
                os.sync()
                baseline.seconds.append(timed(lambda: sha256_file(bundle, buf)))
                for v in variants:
                    run_variant(v, fetcher, stores[v.name], url, size, expected, model_size)
                print(f"run {i + 1}/{runs} done", file=sys.stderr)
        finally:
            fetcher.close()

    info = machine()
    print(
        f"\nbundle {size / MIB:.1f} MiB, {runs} runs; {info['nproc']} CPUs ({info['cpu']}), "
        f"kernel {info['kernel']}, Python {info['python']}, {info['openssl']}"
    )
    print(fmt_table(size, baseline, variants))
    base_med = statistics.median(baseline.mib_s(size))
    print(f"\nratio = median agent-path throughput / median sha256 throughput; target >= {TARGET_RATIO}")
    for v in variants:
        ratio = statistics.median(v.total.mib_s(size)) / base_med
        verdict = "meets" if ratio >= TARGET_RATIO else "below"
        print(f"  {v.name:<22} {ratio:.2f}  ({verdict} target)")

    if as_json:
        doc: dict[str, Any] = {
            "benchmark": "bundle_throughput",
            "bundle_bytes": size,
            "runs": runs,
            "target_ratio": TARGET_RATIO,
            "machine": info,
            "baseline_sha256": baseline.summary(size),
            "variants": {
                ("fsync" if v.fsync else "no_fsync"): {
                    "total": v.total.summary(size),
                    "download_hash_verify": v.download.summary(size),
                    "unpack": v.unpack.summary(size),
                    "ratio": statistics.median(v.total.mib_s(size)) / base_med,
                }
                for v in variants
            },
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
