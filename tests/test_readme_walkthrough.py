"""README.md's "Using it by hand", run as written: the block between ``<!-- walkthrough -->`` and
``<!-- /walkthrough -->`` goes to bash unchanged, in a fresh directory holding a copy of examples/.
Only what the block itself offers to change is set: EDGE_DEPLOY_HOME, DEVICE_DIR and the five ports
(free loopback ports here), so that it can run beside other tests. It starts mosquitto, `edge-deploy
serve` and the agent in the background and its EXIT trap stops them; the test waits for them to be
gone, and kills what is left of its process group.

It fails when any command of the block fails (bash -e), when it hangs (a timeout), or when the answer
it scored is not examples/response.json: a README that no longer works cannot pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulators.broker import find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- walkthrough -->\s*```sh\n(.*?)```\s*<!-- /walkthrough -->", re.DOTALL)
PORTS = ("BROKER_PORT", "OPERATOR_PORT", "ARTIFACT_PORT", "API_PORT", "AGENT_PORT")


def walkthrough() -> str:
    found = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md needs exactly one <!-- walkthrough --> ... <!-- /walkthrough --> block"
    block: str = found[0]
    return block


def test_the_block_sets_only_what_it_defines() -> None:
    # every variable the test sets is one the block gives a default to, at its top
    block = walkthrough()
    for name in ("EDGE_DEPLOY_HOME", "DEVICE_DIR", *PORTS):
        assert re.search(rf"^(export )?{name}=\$\{{{name}:-", block, re.MULTILINE), name


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(240)
def test_the_readme_walkthrough_scores_the_expected_response(tmp_path: Path) -> None:
    find_mosquitto()  # a clear skip-or-fail message when it is not installed
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    script = tmp_path / "walkthrough.sh"
    script.write_text(walkthrough())
    ports = {name: str(free_port("127.0.0.1")) for name in PORTS}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "EDGE_DEPLOY_"))},
        # the project's commands from this checkout, and mosquitto from /usr/sbin where it lives
        "PYTHONPATH": str(ROOT),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin", os.environ.get("PATH", "")]),
        "EDGE_DEPLOY_HOME": str(tmp_path / "cp"),
        "DEVICE_DIR": str(tmp_path / "dev-001"),
        **ports,
    }
    log = tmp_path / "walkthrough.log"
    with log.open("wb") as out:
        # its own session: whatever the block leaves behind can be found and stopped
        proc = subprocess.Popen(
            ["bash", "-e", str(script)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=200)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            deadline = time.monotonic() + 30  # the EXIT trap's SIGTERM: the agent drains, then exits
            while not _gone(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _gone(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)

    def logs() -> str:
        parts = [log, tmp_path / "dev-001" / "agent.log", tmp_path / "cp" / "serve.log"]
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in parts if p.exists()
        )

    assert rc == 0, logs()
    scored = tmp_path / "dev-001" / "response.json"
    assert scored.is_file(), logs()
    expected = json.loads((ROOT / "examples" / "response.json").read_text())
    assert json.loads(scored.read_text()) == expected, logs()
