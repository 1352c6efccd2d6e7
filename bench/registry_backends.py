"""How fast one registry ingests device reports and records rollout steps, on SQLite and on
PostgreSQL (docs/scaling.md). One process, one connection, as one `edge-deploy serve` replica has.

    python bench/registry_backends.py [postgresql://postgres@127.0.0.1:5432/postgres]

Reports: batches of 1,000 (status, online, heartbeat) as Registry.ingest() gets them from the
operator's connection. Steps: a wave's bookkeeping per device (a generation issued, the member
recorded with its manifest in the outbox, the outbox cleared), in transactions of 100 devices.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from deploy.registry import Registry


def run(location: Path | str, devices: int = 2000) -> dict[str, float]:
    reg = Registry(location)
    try:
        ids = [f"d{i:06d}" for i in range(devices)]
        beat = {"models": {"m": {"model": "m", "version": "1", "requests": 10, "errors": 0, "p99_ms": 3.0}}}
        reports = []
        for d in ids:
            reports += [(d, "online", time.time(), {"online": True}),
                        (d, "status", time.time(), {"state": "idle", "generation": 0}),
                        (d, "heartbeat", time.time(), beat)]  # fmt: skip
        t = time.perf_counter()
        for i in range(0, len(reports), 1000):
            reg.ingest(reports[i : i + 1000])
        ingest_s = time.perf_counter() - t
        m = reg.add_model("m", sha256="a" * 64, size=1, artifact_for=lambda v: "x", inputs=[], outputs=[])
        img = reg.add_image("i", build=lambda v: ("b" * 64, 1, "y", {}), models={"m": m})
        reg.create_deployment("dep", img, {}, ids, {}, {}, [devices])
        env = b'{"payload":"' + b"x" * 600 + b'"}'
        t = time.perf_counter()
        for i in range(0, devices, 100):
            group = ids[i : i + 100]
            with reg.tx():
                gens = reg.next_generations(group)
                for d in group:
                    reg.update_member("dep", d, state="updating", generation=gens[d], outbox=env.decode())
            reg.clear_outbox("dep", [(d, env) for d in group])
        step_s = time.perf_counter() - t
        return {"reports_per_s": len(reports) / ingest_s, "device_steps_per_s": devices / step_s}
    finally:
        reg.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("sqlite", run(Path(tmp) / "registry.db"))
    if len(sys.argv) > 1:
        import psycopg

        admin = psycopg.connect(sys.argv[1], autocommit=True)
        name = f"bench_{uuid.uuid4().hex[:8]}"
        admin.execute(f"CREATE DATABASE {name}")
        try:
            print("postgresql", run(sys.argv[1].rsplit("/", 1)[0] + "/" + name))
        finally:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
