"""The README's demo, as a new user runs it (edge-sim demo), must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "demo",
            "--devices",
            "2",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.count("runs image iris-classifier:1") == 4  # deployed, then rolled back, on 2 devices
    assert out.count("runs image iris-classifier:2") == 2
    assert out.count("POST /score -> ") == 4 and "(5/5 right)" in out
    assert "refused it: manifest_bad_signature" in out
    assert "still runs iris-classifier:1" in out
    assert "deployed: succeeded, 2 device(s) in waves of 1+1" in out
    assert "updated: succeeded" in out and "rolled back: rolled_back" in out
    assert "iris-classifier:2  rolled_back  models iris:2  {'reverted': 2}" in out
    assert "every device's status matches the image on its disk; 0 failed requests" in out
    # step 4 of the seed: monitor and collect, counted as the records arrive in blob storage
    assert out.count("runs image iris-monitored:1") == 2
    assert "collected: model_inputs 20, model_outputs 20, request 20, response 20" in out
    assert "one record, from devices/dev-00" in out and '"type": "azureml.inference.model_inputs"' in out
    assert not (tmp_path / "demo").exists()  # cleaned up without --keep
    assert str(tmp_path / "demo") not in out.strip().splitlines()[-1]  # names no folder that is gone
