"""systemd/install.sh, run for real into a --root staging tree: what it installs and with which
modes, that the installed agent validates its config, that a second run changes nothing, that an
operator's config is never overwritten, what --uninstall keeps and --purge removes, and that bad
flags are refused with exit status 2.

Two tests install for real, with no shortcut. One installs from this checkout with every
dependency from the package index, then runs the installed agent against a real broker (about
30 s). The other installs offline from a wheelhouse (about 25 s). The others take two shortcuts
that keep them fast and offline, and neither touches what the installer does:

- The agent is installed from a wheel of this checkout that the test zips itself (pip's build of
  the source needs setuptools from the index, in an isolated build environment: seconds, network).
- The venv at <root>/opt/edge-agent/venv is made by the test before the installer runs (which then
  says it exists), without pip, and with a .pth file naming the test's own site-packages: pip,
  onnxruntime and the other dependencies come from there instead of being downloaded, and
  ``--pip-args "--no-deps --no-index"`` keeps pip from asking an index. A plain path line in a .pth
  file does not run the .pth files of that directory, so the test environment's editable install
  of this project stays inactive and the venv imports the wheel the installer put in it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy import signer

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "systemd" / "install.sh"
USER = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
GROUP = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout.strip()
AS_ROOT = os.geteuid() == 0
FAST_PIP = "--no-deps --no-index"


def build_wheel(out_dir: Path) -> Path:
    """A wheel of this checkout: the packages pyproject.toml lists, its console scripts, its name
    and version. Enough for pip to install and for the entry points to run."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    name, version = project["name"].replace("-", "_"), project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for pattern in meta["tool"]["setuptools"]["packages"]["find"]["include"]:
        for pkg in sorted(ROOT.glob(pattern.rstrip("*"))):
            for f in sorted(pkg.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    files[f.relative_to(ROOT).as_posix()] = f.read_bytes()
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {version}\n".encode()
    )
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    scripts = "".join(f"{k} = {v}\n" for k, v in project["scripts"].items())
    files[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    whl = out_dir / f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(whl, "w") as z:
        for arc, data in files.items():
            z.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return whl


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The operator's files. check-config looks at whether certificates exist, not inside them."""
    d = tmp_path_factory.mktemp("inputs")
    for name in ("ca.pem", "device.pem"):
        (d / name).write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (d / "device.key").write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    signer.create_keypair(d / "keys")
    signer.create_keypair(d / "keys2")
    shutil.copy(d / "keys2" / "signing.pub", d / "second.pub")
    (d / "iothub.cs").write_text("HostName=hub.azure-devices.net;DeviceId=dev-hub;SharedAccessKey=c2VjcmV0\n")
    return {
        "ca": d / "ca.pem", "cert": d / "device.pem", "key": d / "device.key",
        "trust": d / "keys" / "signing.pub", "trust2": d / "second.pub", "iothub": d / "iothub.cs",
    }  # fmt: skip


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "root"
    venv = r / "opt" / "edge-agent" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "test-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    yield r


def install(
    root: Path, *args: str, wheel: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(INSTALL), "--root", str(root), "--user", USER, "--pip-args", FAST_PIP]
    if wheel is not None:
        cmd += ["--wheel", str(wheel)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=240, env=env)
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    return r


def mqtt_flags(inputs: dict[str, Path], device_id: str = "dev-001") -> list[str]:
    return [
        "--device-id", device_id, "--broker", "broker.example:8883", "--ca", str(inputs["ca"]),
        "--cert", str(inputs["cert"]), "--key", str(inputs["key"]), "--trust-key", str(inputs["trust"]),
        "--trust-key", str(inputs["trust2"]),
    ]  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every path under root: content hash (or link target), mtime, mode, owner. Bytecode caches
    are left out: Python writes them when the installed agent runs check-config, not the installer."""
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        st = p.lstat()
        if p.is_symlink():
            what = "-> " + os.readlink(p)
        elif p.is_file():
            what = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(p.relative_to(root))] = (
            what,
            st.st_mtime_ns,
            stat.S_IMODE(st.st_mode),
            f"{st.st_uid}:{st.st_gid}",
        )
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def installed_check_config(root: Path) -> dict[str, Any]:
    exe = root / "opt" / "edge-agent" / "venv" / "bin" / "edge-agent"
    r = subprocess.run(
        [str(exe), "check-config", "--config", str(root / "etc" / "edge-agent" / "agent.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_install_lays_everything_out_and_a_second_run_changes_nothing(
    root: Path, wheel: Path, inputs: dict[str, Path]
) -> None:
    first = install(root, *mqtt_flags(inputs), wheel=wheel)
    etc = root / "etc" / "edge-agent"
    venv = root / "opt" / "edge-agent" / "venv"
    assert "package edge-ml: installed" in first.stdout

    assert installed_check_config(root) == {
        "ok": True,
        "device_id": "dev-001",
        "transport": "mqtt",
        "endpoint": "broker.example:8883",
    }
    # The venv runs the wheel the installer put in it, not this checkout.
    probe = [str(venv / "bin" / "python"), "-c", "import agent; print(agent.__file__)"]
    where = subprocess.run(probe, capture_output=True, text=True, check=True, timeout=60, cwd=root).stdout
    assert where.startswith(str(venv)), where

    cfg = tomllib.loads((etc / "agent.toml").read_text())
    assert cfg["device_id"] == "dev-001" and cfg["transport"] == "mqtt"
    assert cfg["mqtt"] == {"host": "broker.example", "port": 8883, "ca": "certs/ca.pem",
                           "cert": "certs/device.pem", "key": "certs/device.key"}  # fmt: skip
    assert cfg["trust"]["keys"] == ["trust/signing.pub", "trust/second.pub"]
    assert (etc / "certs" / "device.key").read_bytes() == inputs["key"].read_bytes()

    for d in (etc, etc / "certs", etc / "trust", root / "var" / "lib" / "edge-agent"):
        assert mode(d) == 0o750, d
    for f in ("agent.toml", "certs/ca.pem", "certs/device.pem", "certs/device.key", "trust/signing.pub"):
        assert mode(etc / f) == 0o640, f
    if AS_ROOT:  # the agent's group reads them; only root writes them
        gid = os.getgid()
        assert (etc / "certs" / "device.key").stat().st_uid == 0
        assert (etc / "certs" / "device.key").stat().st_gid == gid and (
            etc / "agent.toml"
        ).stat().st_gid == gid

    unit = root / "etc" / "systemd" / "system" / "edge-agent.service"
    text = unit.read_text()
    assert f"User={USER}\n" in text and f"Group={GROUP}\n" in text  # --user: that user, its group
    assert (
        text.replace(f"User={USER}\n", "User=edge-agent\n").replace(f"Group={GROUP}\n", "Group=edge-agent\n")
        == (ROOT / "systemd" / "edge-agent.service").read_text()
    )
    if shutil.which("systemctl"):
        link = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "edge-agent.service"
        assert os.readlink(link) == "/etc/systemd/system/edge-agent.service"  # enabled offline
    assert not (root / "etc" / "systemd" / "system" / "edge-agent.service.d").exists()

    before = snapshot(root)
    second = install(root, *mqtt_flags(inputs), wheel=wheel)
    assert snapshot(root) == before
    changed = [
        line for line in second.stdout.splitlines()
        if "unchanged" not in line and ": valid (" not in line
    ]  # fmt: skip
    assert not changed, second.stdout


def test_an_existing_config_is_kept_and_force_config_keeps_a_backup(
    root: Path, wheel: Path, inputs: dict[str, Path]
) -> None:
    install(root, *mqtt_flags(inputs), wheel=wheel)
    config = root / "etc" / "edge-agent" / "agent.toml"
    edited = 'log_level = "debug"  # the operator\'s own edit\n' + config.read_text()
    config.write_text(edited)

    r = install(root, *mqtt_flags(inputs, "dev-other"), wheel=wheel)
    assert "kept the existing file" in r.stdout
    assert config.read_text() == edited and installed_check_config(root)["device_id"] == "dev-001"

    r = install(root, *mqtt_flags(inputs, "dev-other"), "--force-config", wheel=wheel)
    assert (root / "etc" / "edge-agent" / "agent.toml.bak").read_text() == edited
    assert installed_check_config(root)["device_id"] == "dev-other" and mode(config) == 0o640


def test_iothub_config_and_the_accelerator_drop_in(root: Path, wheel: Path, inputs: dict[str, Path]) -> None:
    r = install(
        root, "--device-id", "dev-hub", "--iothub-connection-string-file", str(inputs["iothub"]),
        "--trust-key", str(inputs["trust"]), "--accelerator", wheel=wheel,
    )  # fmt: skip
    etc = root / "etc" / "edge-agent"
    cfg = tomllib.loads((etc / "agent.toml").read_text())
    assert cfg["transport"] == "iothub" and "mqtt" not in cfg
    assert cfg["iothub"] == {"connection_string_file": "certs/iothub-connection-string"}
    assert mode(etc / "certs" / "iothub-connection-string") == 0o640  # it holds the device's key
    assert installed_check_config(root) == {
        "ok": True,
        "device_id": "dev-hub",
        "transport": "iothub",
        "endpoint": "hub.azure-devices.net:8883",
    }
    dropin = root / "etc" / "systemd" / "system" / "edge-agent.service.d" / "accelerator.conf"
    assert dropin.read_text() == (ROOT / "systemd" / "accelerator.conf").read_text()
    assert "accelerator drop-in" in r.stdout


def test_uninstall_keeps_config_and_state_and_purge_removes_them(
    root: Path, wheel: Path, inputs: dict[str, Path]
) -> None:
    install(root, *mqtt_flags(inputs), "--accelerator", wheel=wheel)
    state = root / "var" / "lib" / "edge-agent"
    (state / "agent.db").write_text("the device's deployments")
    units = root / "etc" / "systemd" / "system"

    r = install(root, "--uninstall")
    assert not (units / "edge-agent.service").exists() and not (units / "edge-agent.service.d").exists()
    assert not (units / "multi-user.target.wants" / "edge-agent.service").is_symlink()
    assert not (root / "opt" / "edge-agent").exists()
    assert (state / "agent.db").read_text() == "the device's deployments"
    assert (root / "etc" / "edge-agent" / "agent.toml").is_file()
    assert "kept" in r.stdout

    again = install(root, "--uninstall")
    assert "removed" not in again.stdout

    install(root, "--uninstall", "--purge")
    assert not state.exists() and not (root / "etc" / "edge-agent").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option: --bogus"),
        (["--device-id"], "--device-id needs a value"),
        (["--broker", "no-port"], "is not HOST:PORT"),
        (["--broker", "h:70000"], "is not a TCP port"),
        (["--ca", "/nonexistent/ca.pem"], "--ca: no such file"),
        (["--device-id", "bad id"], "may only use letters"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--wheel", "x.whl", "--source", "."], "exclude each other"),
        (["--iothub-hostname", "hub.example"], "needs --cert and --key"),
        (["--broker", "h:1883", "--ca", "{ca}"], "go together"),
        (["--accelerator=yes"], "takes no value"),
    ],
)
def test_bad_flags_are_refused_with_exit_2(
    root: Path, inputs: dict[str, Path], args: list[str], message: str
) -> None:
    args = [a.format(ca=inputs["ca"]) for a in args]
    before = snapshot(root)
    r = install(root, *args, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "--help" in r.stderr
    assert snapshot(root) == before  # refused before any step


def test_a_config_needs_its_flags(root: Path, wheel: Path, inputs: dict[str, Path]) -> None:
    before = snapshot(root)
    r = install(root, wheel=wheel, check=False)
    assert r.returncode == 2 and "--device-id is needed" in r.stderr, r.stderr
    no_trust = [
        a for a in mqtt_flags(inputs) if a not in ("--trust-key", str(inputs["trust"]), str(inputs["trust2"]))
    ]
    r = install(root, *no_trust, wheel=wheel, check=False)
    assert r.returncode == 2 and "--trust-key is needed" in r.stderr, r.stderr
    assert snapshot(root) == before  # refused before any step


def test_help_documents_every_option() -> None:
    r = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    # every option has its own branch, "    --name) ...", in the script's flag parser
    parsed = set(re.findall(r"^ {4}(--[a-z-]+)\) ", INSTALL.read_text(), re.MULTILINE))
    assert parsed, "no options found in the script"
    missing = [flag for flag in parsed if flag not in r.stdout]
    assert not missing, missing


def test_a_real_install_from_the_checkout_runs_and_connects(tmp_path: Path) -> None:
    """No shortcut: the installer makes the venv, builds this checkout and pip-installs it with all
    its dependencies from the configured index, as on a device. Then the installed agent runs
    against a real broker with mutual TLS, its own `status` says it is connected, and SIGTERM stops it
    cleanly."""
    from simulators.broker import Mosquitto
    from simulators.rig import wait_until

    root = tmp_path / "root"
    signer.create_keypair(tmp_path / "keys")
    with Mosquitto(tmp_path / "broker") as broker:
        cert = broker.client_cert("dev-real")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        cmd = [
            "bash", str(INSTALL), "--root", str(root), "--user", USER, "--device-id", "dev-real",
            "--broker", f"{broker.host}:{broker.port}", "--ca", str(cert.ca_path),
            "--cert", str(cert.cert_path), "--key", str(cert.key_path),
            "--trust-key", str(tmp_path / "keys" / "signing.pub"),
        ]  # fmt: skip
        built_before = (ROOT / "build").exists()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        assert "package edge-ml: installed" in r.stdout
        assert (ROOT / "build").exists() == built_before  # built from a copy: the checkout is untouched

        bin_dir = root / "opt" / "edge-agent" / "venv" / "bin"
        config = root / "etc" / "edge-agent" / "agent.toml"
        # The config names /var/lib/edge-agent, as on the device; here the state goes into the root.
        run_env = {**env, "EDGE_AGENT_STATE_DIR": str(root / "var" / "lib" / "edge-agent"),
                   "EDGE_AGENT_API__LISTEN": "127.0.0.1:0"}  # fmt: skip
        log = (tmp_path / "agent.log").open("wb")
        agent = subprocess.Popen(
            [str(bin_dir / "edge-agent"), "run", "--config", str(config)], stdout=log, stderr=log, env=run_env
        )
        try:

            def status() -> dict[str, Any]:
                out = subprocess.run(
                    [str(bin_dir / "edge-agent"), "status", "--config", str(config), "--json"],
                    capture_output=True, text=True, timeout=60, env=run_env,
                )  # fmt: skip
                return json.loads(out.stdout) if out.stdout.strip() else {}

            def connected() -> bool:
                return bool(
                    ((status().get("agent") or {}).get("run") or {}).get("channel", {}).get("connected")
                )

            assert wait_until(connected, 60, interval=0.5), (tmp_path / "agent.log").read_text()[-3000:]
        finally:
            agent.terminate()
            rc = agent.wait(timeout=60)
            log.close()
        assert rc == 0, (tmp_path / "agent.log").read_text()[-3000:]


def test_an_offline_install_from_a_wheelhouse(tmp_path: Path) -> None:
    """An offline device: the wheels are made on a connected machine (here, from the package index),
    and the installer takes everything from that directory. An unreachable index in the
    environment shows that pip does not ask one."""
    src = tmp_path / "src"  # a copy, so that building the wheel leaves nothing in the checkout
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".*", "node_modules", "build", "*.egg-info", "tests")
    )
    wheelhouse = tmp_path / "wheelhouse"
    made = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse), str(src)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    signer.create_keypair(tmp_path / "keys")
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "PIP_"))}
    env["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple/"  # nothing listens on the discard port
    cmd = [
        "bash", str(INSTALL), "--root", str(root), "--user", USER, "--wheelhouse", str(wheelhouse),
        "--device-id", "dev-offline", "--broker", "127.0.0.1:8883",
        "--trust-key", str(tmp_path / "keys" / "signing.pub"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "package edge-ml: installed" in r.stdout
    assert installed_check_config(root)["device_id"] == "dev-offline"
    python = root / "opt" / "edge-agent" / "venv" / "bin" / "python"
    probe = "import onnxruntime, paho.mqtt, agent; print(agent.__file__)"
    where = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60, cwd=root)
    assert where.returncode == 0 and where.stdout.startswith(str(root)), where.stderr
    # An MQTT device gets the base install: neither the IoT Hub SDK nor the control plane's extras.
    absent = "import importlib.util as u; print([m for m in ('azure', 'onnx', 'sklearn') if u.find_spec(m)])"
    extra = subprocess.run([str(python), "-c", absent], capture_output=True, text=True, timeout=60, cwd=root)
    assert extra.returncode == 0 and extra.stdout.strip() == "[]", extra.stdout + extra.stderr
    # and edge-deploy there says which extra it needs, in one line instead of a traceback
    deploy_cli = [str(python.parent / "edge-deploy"), "device", "list"]
    cp = subprocess.run(deploy_cli, capture_output=True, text=True, timeout=60, cwd=root)
    assert cp.returncode == 2 and "pip install 'edge-ml[control-plane]'" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
