"""Buffer ingest, durable: ``Buffer.put`` + ``flush`` against raw ``sqlite3`` ``executemany`` batches.

Run by hand from the repository root (not part of CI, not a pytest test)::

    .venv/bin/python bench/buffer_ingest.py                 # 5 cases, 5 runs each (about 30 s)
    .venv/bin/python bench/buffer_ingest.py --runs 9 --json
    .venv/bin/python bench/buffer_ingest.py --cases 100000x200:NORMAL,20000x16000:FULL --workdir /mnt/sd

The requirement: buffer ingest, durable, against raw sqlite3 executemany batches on the same table
in the same run; target >= 65% of raw.

Each case is N capture-like JSON records of one size (distinct records, made before any timing:
a request id, a timestamp, a latency, a status and an ``input`` array of random floats, padded
with JSON whitespace to the exact size), written two ways into a fresh file each time:

- **raw** (the baseline): one thread, one ``sqlite3`` connection, ``(time.time(), None, payload)``
  tuples built in the same loop, and every 1000 of them (the buffer's ``batch_max``) one
  ``BEGIN IMMEDIATE; executemany(INSERT ... VALUES (?, ?, ?)); COMMIT``. The table is the buffer's
  own ``records_capture``, in a file created by :class:`agent.telemetry.buffer.Buffer` (same page size,
  ``auto_vacuum``, schema), opened with the same PRAGMAs as the buffer's writer: ``journal_mode=WAL``,
  the same ``synchronous``, ``secure_delete=FAST``, and the ``wal_autocheckpoint`` and
  ``journal_size_limit`` the buffer computes from its budget.
- **buffer**: ``Buffer.put(RecordClass.CAPTURE, payload)`` (bytes, as ``agent/telemetry/capture.py`` puts
  them) for every record from one thread in a tight loop, then ``flush()``, which returns once every
  record is committed. ``start()`` (open, migrate) happens before the clock starts, as the raw side's
  connect does. The buffer's settings are the agent's defaults except ``queue_max`` and
  ``queue_max_bytes``, raised to hold all N records: a loop of more puts than ``queue_max`` would
  have some refused as ``queue_full`` (docs/buffer.md), and a refused record is not ingested. The
  budget (``--budget-mib``, default 1024) is large enough that nothing is evicted; at 256 MiB and
  above the buffer's transaction bound and WAL checkpoint size are already at their caps, so the
  budget changes nothing else. The script checks that N records were committed and none dropped.

"Durable" is what ``flush()`` returning True means: every record is in a committed transaction and
survives kill -9; with ``synchronous=FULL`` every commit is fsynced too and survives power loss. The
raw side commits with the same setting, so both are equally durable when their clock stops.

Each case runs ``--runs`` times, raw and buffer alternating which goes first, with ``os.sync()``
before each run (outside the timing) so that no run pays for another's writeback. Reported: the
median records/s and MB/s of payload (with min and max), the CPU seconds of the process, how long
the put loop alone took, and the ratio of the medians, buffer / raw; target >= 0.65.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib as bl
import numpy as np
import orjson

from agent.telemetry.buffer import Buffer, RecordClass

TARGET_RATIO = 0.65
BATCH = 1000  # the buffer's batch_max default: records per raw transaction
DEFAULT_CASES = "100000x200:NORMAL,100000x1000:NORMAL,100000x200:FULL,100000x1000:FULL,20000x4000:NORMAL"
TABLE = "records_capture"


@dataclass(frozen=True)
class Case:
    records: int
    size: int
    synchronous: str

    @property
    def label(self) -> str:
        return f"{self.records} x {self.size} B, {self.synchronous}"

    @staticmethod
    def parse(text: str) -> Case:
        try:
            shape, _, sync = text.partition(":")
            n, size = shape.lower().split("x")
            case = Case(int(n), int(size), (sync or "NORMAL").upper())
        except ValueError:
            raise SystemExit(f"--cases: {text!r} is not RECORDSxBYTES[:NORMAL|FULL]") from None
        if case.records < BATCH or case.size < 64 or case.synchronous not in ("NORMAL", "FULL"):
            raise SystemExit(f"--cases: {text!r}: at least {BATCH} records of at least 64 B, NORMAL or FULL")
        return case


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    put_loop: list[float] = field(default_factory=list)  # buffer only: until the last put() returned

    def rates(self, n: int) -> list[float]:
        return [n / w for w in self.wall]

    def summary(self, n: int, nbytes: int) -> dict[str, Any]:
        r = self.rates(n)
        doc: dict[str, Any] = {
            "median_records_s": round(bl.median(r)),
            "min_records_s": round(min(r)),
            "max_records_s": round(max(r)),
            "median_mb_s": round(bl.median(r) * nbytes / n / 1e6, 1),
            "median_wall_s": round(bl.median(self.wall), 4),
            "median_cpu_s": round(bl.median(self.cpu), 4),
            "runs_wall_s": [round(w, 4) for w in self.wall],
        }
        if self.put_loop:
            doc["median_put_loop_s"] = round(bl.median(self.put_loop), 4)
            doc["median_put_us"] = round(bl.median(self.put_loop) / n * 1e6, 3)
        return doc


def cpu_now() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class RecordMaker:
    """Distinct capture-like JSON records of an exact size: a request id, a timestamp, a latency, a
    status and an ``input`` array of random floats (a slice at a random offset of a pool of them),
    padded with JSON whitespace. Cheap enough to make a few hundred thousand before timing."""

    POOL = 1 << 16

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = [orjson.dumps(round(self.rng.gauss(0.0, 1.0), 6)) for _ in range(self.POOL)]
        # cum[k] = bytes of the first k pool entries, each with its comma
        self.cum = np.concatenate(([0], np.cumsum([len(t) + 1 for t in self.pool])))

    def make(self, i: int, size: int) -> bytes:
        rng = self.rng
        doc = {
            "model": "mlp",
            "model_version": "1",
            "request_id": f"5f0e1c2a-{i}",
            "ts": round(1764072000.0 + i * 0.001 + rng.random() * 1e-4, 6),
            "api": "v2",
            "status": 200,
            "latency_s": round(rng.uniform(5e-5, 5e-4), 6),
        }
        head = orjson.dumps(doc)[:-1] + b',"input":['
        room = size - len(head) - 2  # "]}"
        start = rng.randrange(self.POOL // 2)
        # the most floats whose text and commas (one fewer than floats) fit in room
        k = int(np.searchsorted(self.cum, self.cum[start] + room + 1, side="right")) - 1 - start
        if k < 0 or start + k >= self.POOL:
            raise ValueError(f"a record of {size} B does not fit this generator")
        out = head + b",".join(self.pool[start : start + k]) + b"]"
        assert len(out) + 1 <= size, (len(out), size)
        return out + b" " * (size - len(out) - 1) + b"}"


def make_buffer(path: Path, case: Case, budget: int) -> Buffer:
    total = case.records * case.size
    return Buffer(
        path,
        budget_bytes=budget,
        synchronous=case.synchronous,
        queue_max=max(100_000, case.records),
        queue_max_bytes=max(64 << 20, total + (1 << 20)),
    )


def run_raw(path: Path, case: Case, payloads: list[bytes], budget: int) -> tuple[float, float]:
    """The baseline, in a fresh file created by the buffer; returns (wall s, CPU s)."""
    creator = make_buffer(path, case, budget)
    creator.start()
    # The writer's per-connection settings, as the buffer derives them from its budget.
    wal_pages: int = creator._wal_pages
    wal_max: int = creator._wal_max
    creator.close()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        assert mode.lower() == "wal", mode
        db.execute(f"PRAGMA synchronous={case.synchronous}")
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        db.execute(f"PRAGMA journal_size_limit={wal_max}")
        sql = f"INSERT INTO {TABLE} (ts, priority, payload) VALUES (?, ?, ?)"
        now = time.time
        os.sync()
        c0, t0 = cpu_now(), time.perf_counter()
        rows: list[tuple[float, None, bytes]] = []
        for p in payloads:
            rows.append((now(), None, p))
            if len(rows) == BATCH:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(sql, rows)
                db.execute("COMMIT")
                rows = []
        if rows:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(sql, rows)
            db.execute("COMMIT")
        t1, c1 = time.perf_counter(), cpu_now()
        (count,) = db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
    finally:
        db.close()
    if count != case.records:
        raise SystemExit(f"raw: {count} rows in the table, not {case.records}")
    return t1 - t0, c1 - c0


def run_buffer(path: Path, case: Case, payloads: list[bytes], budget: int) -> tuple[float, float, float]:
    """Buffer.put for every record, then flush(); returns (wall s, CPU s, put loop s)."""
    buf = make_buffer(path, case, budget)
    buf.start()
    try:
        put = buf.put
        cls = RecordClass.CAPTURE
        os.sync()
        c0, t0 = cpu_now(), time.perf_counter()
        refused = 0
        for p in payloads:
            if not put(cls, p):
                refused += 1
        t_put = time.perf_counter()
        ok = buf.flush()
        t1, c1 = time.perf_counter(), cpu_now()
        stats = buf.stats()
    finally:
        buf.close()
    rec = stats["classes"][str(RecordClass.CAPTURE)]["records"]
    if refused or not ok or rec != case.records or stats["dropped"]:
        raise SystemExit(
            f"buffer: {refused} refused, flush {ok}, {rec} records stored of {case.records}, "
            f"dropped {stats['dropped']}"
        )
    return t1 - t0, c1 - c0, t_put - t0


def fs_type(path: Path) -> str:
    """The file system type of the mount that holds ``path`` (findmnt), e.g. ext4."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"RECORDSxBYTES[:SYNC],... (default {DEFAULT_CASES})"
    )
    ap.add_argument("--runs", type=int, default=5, help="runs per case and side (default 5)")
    ap.add_argument(
        "--budget-mib", type=int, default=1024, help="the buffer's budget_bytes in MiB (default 1024)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where the files go: the disk to measure")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be positive")
    cases = [Case.parse(c) for c in args.cases.split(",") if c.strip()]
    budget = args.budget_mib << 20
    for c in cases:
        if c.records * (c.size + 64) * 2 > budget:
            ap.error(f"case {c.label} needs a budget of at least {c.records * (c.size + 64) * 2 >> 20} MiB")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="buffer-ingest-", dir=args.workdir))
    try:
        return bench(workdir, cases, args.runs, budget, args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench(workdir: Path, cases: list[Case], runs: int, budget: int, as_json: bool) -> int:
    t_start = time.monotonic()
    load = bl.MachineLoad()
    results: dict[str, dict[str, Any]] = {}
    rows: list[list[str]] = []
    for case in cases:
        maker = RecordMaker(case.size * 7919 + case.records)
        payloads = [maker.make(i, case.size) for i in range(case.records)]
        nbytes = sum(len(p) for p in payloads)
        raw, buf = Runs(), Runs()
        for i in range(runs):
            order = ("raw", "buffer") if i % 2 == 0 else ("buffer", "raw")
            for side in order:
                path = workdir / f"{side}-{i}.db"
                if side == "raw":
                    wall, cpu = run_raw(path, case, payloads, budget)
                    raw.wall.append(wall)
                    raw.cpu.append(cpu)
                else:
                    wall, cpu, put_loop = run_buffer(path, case, payloads, budget)
                    buf.wall.append(wall)
                    buf.cpu.append(cpu)
                    buf.put_loop.append(put_loop)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            print(f"{case.label}: run {i + 1}/{runs} done", file=sys.stderr)
        del payloads
        ratio = bl.median(buf.rates(case.records)) / bl.median(raw.rates(case.records))
        results[case.label] = {
            "records": case.records,
            "payload_bytes": case.size,
            "synchronous": case.synchronous,
            "raw_executemany": raw.summary(case.records, nbytes),
            "buffer_put_flush": buf.summary(case.records, nbytes),
            "ratio": round(ratio, 3),
        }
        for name, r in (("raw executemany", raw), ("buffer put + flush", buf)):
            s = r.summary(case.records, nbytes)
            rows.append([
                f"{case.label}: {name}", f"{s['median_records_s'] / 1000:.0f}k",
                f"{s['min_records_s'] / 1000:.0f}k-{s['max_records_s'] / 1000:.0f}k",
                f"{s['median_mb_s']:.0f}",
                f"{s['median_cpu_s'] * 1000:.0f}",
                f"{s['median_put_loop_s'] * 1000:.0f}" if "median_put_loop_s" in s else "",
                f"{ratio:.2f}" if r is buf else "1.00",
            ])  # fmt: skip

    background = load.result()
    info = bl.machine()
    info["sqlite"] = sqlite3.sqlite_version
    info["filesystem"] = fs_type(workdir)
    print(
        f"\n{bl.machine_line(info)}; SQLite {info['sqlite']} on {info['filesystem']}; {runs} runs per side\n"
    )
    head = ["case: side", "median rec/s", "min-max rec/s", "MB/s", "CPU ms", "put loop ms", "ratio"]
    print(bl.fmt_table(head, rows))
    print("\n" + bl.MachineLoad.line(background))
    print(f"\nratio = median buffer records/s / median raw records/s; target >= {TARGET_RATIO}")
    for label, res in results.items():
        verdict = "meets" if res["ratio"] >= TARGET_RATIO else "below"
        print(f"  {label:<28} {res['ratio']:.2f}  ({verdict} the target)")
    print(f"\ntotal time {time.monotonic() - t_start:.0f} s")
    if as_json:
        doc = {
            "benchmark": "buffer_ingest",
            "target_ratio": TARGET_RATIO,
            "runs": runs,
            "budget_bytes": budget,
            "background": background,
            "machine": info,
            "cases": results,
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
