"""The command lines behave like command lines: --version, no traceback on a closed pipe or Ctrl-C,
coded errors with hints (a refused or unreachable broker included), no registry made by accident,
offline commands that survive a broken [broker], and shell completion. Real subprocesses throughout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from simulators.broker import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(
    module: str, *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=cwd,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
    )


def test_version_on_every_command(tmp_path: Path) -> None:
    for module, prog in (
        ("deploy.cli", "edge-deploy"),
        ("simulators.cli", "edge-sim"),
        ("agent.ops.cli", "edge-agent"),
    ):
        p = run(module, "--version", cwd=tmp_path)
        assert p.returncode == 0 and p.stdout.startswith(prog + " "), p


def test_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "completion", "bash"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader left before the first write, as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 141, err
    assert "Traceback" not in err


def test_ctrl_c_exits_130_without_traceback(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts TCP, never answers MQTT: the command waits
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        (tmp_path / "config.toml").write_text(f"[broker]\nport = {silent.getsockname()[1]}\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "--home", str(tmp_path), "device", "list"],
            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        # Interrupted once it waits on the broker (not while still importing, on a busy machine).
        silent.settimeout(60)
        conn, _ = silent.accept()
        with conn:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err


def test_no_registry_outside_a_home(tmp_path: Path) -> None:
    p = run("deploy.cli", "model", "list", cwd=tmp_path, env={"EDGE_DEPLOY_HOME": ""})
    assert p.returncode == 2
    assert "home_missing" in p.stderr and "edge-deploy init" in p.stderr
    assert list(tmp_path.iterdir()) == []
    assert run("deploy.cli", "init", cwd=tmp_path, env={"EDGE_DEPLOY_HOME": ""}).returncode == 0
    assert run("deploy.cli", "model", "list", cwd=tmp_path, env={"EDGE_DEPLOY_HOME": ""}).returncode == 0


def test_offline_commands_survive_a_broken_broker_setting(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[broker]\nca = "gone.pem"\ncert = "gone.pem"\nkey = "gone.key"\n')
    for argv in (("model", "list"), ("image", "list")):
        p = run("deploy.cli", "--home", str(tmp_path), *argv, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
    p = run("deploy.cli", "--home", str(tmp_path), "device", "list", cwd=tmp_path)
    assert p.returncode == 2 and "config_invalid" in p.stderr and "broker.ca" in p.stderr


def test_completion_lists_the_subcommands(tmp_path: Path) -> None:
    for shell in ("bash", "zsh"):
        p = run("deploy.cli", "completion", shell, cwd=tmp_path)
        assert p.returncode == 0
        for word in ("pki", "broker", "enroll", "revoke", "--dry-run", "register"):
            assert word in p.stdout
    script = tmp_path / "c.bash"
    script.write_text(run("deploy.cli", "completion", "bash", cwd=tmp_path).stdout)
    words = subprocess.run(
        ["bash", "-c", f'. {script}; COMP_WORDS=(edge-deploy device ""); COMP_CWORD=2; _edge_deploy; '
         'echo "${COMPREPLY[@]}"'], capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert {"enroll", "list", "revoke", "show", "tag"} <= set(words)


def test_publish_reports_a_refusal_and_an_unreachable_broker(tmp_path: Path) -> None:
    envelope = tmp_path / "signed.json"
    envelope.write_text('{"payloadType": "x", "payload": "", "signatures": []}')
    with Mosquitto(tmp_path / "broker") as broker:
        dev = broker.client_cert("dev-1")  # a device may not write another device's desired state
        p = run(
            "deploy.cli", "manifest", "publish", str(envelope), "--device", "dev-2",
            "--broker", f"localhost:{broker.port}", "--ca", str(dev.ca_path), "--cert", str(dev.cert_path),
            "--key", str(dev.key_path), cwd=tmp_path,
        )  # fmt: skip
        assert p.returncode == 2, p
        assert "broker_refused" in p.stderr and "135" in p.stderr and "hint:" in p.stderr
        assert '"published"' not in p.stdout
        op = broker.client_cert("operator")
        ok = run(
            "deploy.cli", "manifest", "publish", str(envelope), "--device", "dev-2",
            "--broker", f"localhost:{broker.operator_port}", "--ca", str(op.ca_path),
            "--cert", str(op.cert_path), "--key", str(op.key_path), cwd=tmp_path,
        )  # fmt: skip
        assert ok.returncode == 0 and '"published": true' in ok.stdout, ok
    p = run(
        "deploy.cli", "manifest", "publish", str(envelope), "--device", "dev-2",
        "--broker", f"127.0.0.1:{free_port('127.0.0.1')}", cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 4 and "broker_unreachable" in p.stderr and "Traceback" not in p.stderr
