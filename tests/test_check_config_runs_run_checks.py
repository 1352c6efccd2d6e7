"""`edge-agent check-config` and `doctor` refuse what `edge-agent run` refuses, with the config's own
key names: the measured case is a telemetry budget above the config's floor (1 MiB) but below what
the buffer needs once the WAL and a transaction's headroom are set aside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
#: above config.py's 1 MiB floor, below the buffer's real minimum with 1 MiB records
BUDGET = 2 * 1024 * 1024


def agent(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_AGENT_TELEMETRY__BUFFER_BUDGET_BYTES": str(BUDGET)}
    return subprocess.run(
        [sys.executable, "-m", "agent.ops.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_budget_run_refuses_is_refused_by_check_config_and_doctor(tmp_path: Path) -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "signing.pub").write_bytes(
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-1"\nstate_dir = "{tmp_path / "state"}"\n\n[trust]\nkeys = ["signing.pub"]\n'
    )
    run = agent("run", "--config", str(cfg), cwd=tmp_path)
    check = agent("check-config", "--config", str(cfg), cwd=tmp_path)
    doctor = agent("doctor", "--config", str(cfg), "--json", cwd=tmp_path)
    assert run.returncode == 2 and check.returncode == 2, (run, check)
    for err in (run.stderr, check.stderr):
        assert "telemetry.buffer_budget_bytes" in err and "telemetry.max_record_bytes" in err
        assert "buffer.budget_bytes" not in err.replace("telemetry.buffer_budget_bytes", "")
    assert doctor.returncode == 1
    (result,) = [r for r in json.loads(doctor.stdout) if r["check"] == "config"]
    assert result["verdict"] == "fail" and "telemetry.buffer_budget_bytes" in result["message"]
    assert "EDGE_AGENT_TELEMETRY__BUFFER_BUDGET_BYTES" in result["hint"]
