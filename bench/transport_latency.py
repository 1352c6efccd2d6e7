"""Time from "the operator wrote a manifest" to "the device reports it active", over both transports.

    .venv/bin/python bench/transport_latency.py [--deploys 20]

One real agent on the plain MQTT broker (the baseline) and one on the simulated IoT Hub (the
azure-iot-device SDK against a TLS mosquitto on loopback:8883, simulators/iothub.py), in the same
run, on the same small bundle server. Each deployment is a new generation of a tiny bundle (the
download and install are the same for both), so the difference is the control channel: the
manifest's way in (retained MQTT publish, against a twin desired-property patch) and the status's
way out (retained publish, against reported-property patches). Prints the median and p95 of each,
their ratio, and each agent's resident memory after the run (the SDK's own weight).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulators.iothub import IotHubSim
from simulators.rig import Rig


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deploys", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Rig(work / "rig") as rig, IotHubSim(work / "hub") as hub:
            dev = hub.add_device("bench-hub")
            hub_cfg = dev.agent_section(hub.ca_path)
            agents = {
                "mqtt": rig.add_device("bench-mqtt").start(),
                "iothub": rig.add_device("bench-hub", {"transport": "iothub", "iothub": hub_cfg}).start(),
            }
            times: dict[str, list[float]] = {"mqtt": [], "iothub": []}
            for gen in range(1, args.deploys + 1):
                for transport, agent in agents.items():
                    b = rig.build_bundle(f"bench-{transport}", str(gen))
                    signed = rig.sign(rig.manifest(agent.device_id, b, gen))
                    t0 = time.perf_counter()
                    if transport == "mqtt":
                        rig.publish(agent.device_id, signed)
                        rig.wait_active(agent.device_id, gen, timeout=60)
                    else:
                        hub.set_manifest(agent.device_id, signed)
                        hub.wait_reported(
                            agent.device_id,
                            lambda r, g=gen: (
                                (r.get("status") or {}).get("generation") == g
                                and r["status"].get("state") == "active"
                            ),
                            timeout=60,
                        )
                    times[transport].append(time.perf_counter() - t0)
            rss = {t: psutil.Process(a.proc.pid).memory_info().rss for t, a in agents.items() if a.proc}
            print(f"{args.deploys} deployments per transport, manifest written -> status active reported")
            print(f"{'transport':<10} {'median ms':>10} {'p95 ms':>10} {'agent RSS MiB':>14}")
            for t in ("mqtt", "iothub"):
                med, p95 = statistics.median(times[t]) * 1000, _pct(times[t], 0.95) * 1000
                print(f"{t:<10} {med:>10.1f} {p95:>10.1f} {rss[t] / 2**20:>14.1f}")
            ratio = statistics.median(times["iothub"]) / statistics.median(times["mqtt"])
            print(f"ratio iothub/mqtt (median): {ratio:.2f}; RSS ratio: {rss['iothub'] / rss['mqtt']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
