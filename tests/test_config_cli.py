"""Configuration (defaults -> TOML -> environment -> validation naming the field) and the two CLIs,
run as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config
from edge_core.errors import ConfigError


def write(tmp: Path, text: str) -> Path:
    (tmp / "trusted.pub").write_text("placeholder")
    p = tmp / "agent.toml"
    p.write_text(text)
    return p


BASE = 'device_id = "dev-1"\nstate_dir = "state"\n[trust]\nkeys = ["trusted.pub"]\n'


def test_defaults_file_and_env_layering(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + "[mqtt]\nport = 1883\nhost = 'broker.local'\n")
    cfg = config.load(p, env={"EDGE_AGENT_MQTT__PORT": "8884", "EDGE_AGENT_DOWNLOAD__RETRIES": "7"})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.download.retries) == ("broker.local", 8884, 7)
    assert cfg.state_dir == tmp_path / "state"  # relative to the file
    assert cfg.trust.keys == [tmp_path / "trusted.pub"]
    assert cfg.mqtt.session_expiry > 0  # default kept


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        (BASE + "[mqtt]\nport = 'high'\n", {}, "mqtt.port"),
        (BASE + "[mqtt]\nport = 70000\n", {}, "mqtt.port"),
        (BASE + "[mqtt]\nhots = 'x'\n", {}, "mqtt.hots"),
        (BASE, {"EDGE_AGENT_DOWNLOAD__TIMEOUT": "soon"}, "download.timeout"),
        (BASE + "[mqtt]\nca = 'missing-ca.pem'\ncert = 'c.pem'\nkey = 'k.pem'\n", {}, "mqtt.ca"),
        (BASE + "[mqtt]\nca = 'missing-ca.pem'\n", {}, "mqtt"),
        ('state_dir = "s"\n[trust]\nkeys = ["trusted.pub"]\n', {}, "device_id"),
        ('device_id = "a/b"\n[trust]\nkeys = ["trusted.pub"]\n', {}, "device_id"),
        ('device_id = "d"\n', {}, "trust.keys"),
        ('device_id = "d"\n[trust]\nkeys = ["nope.pub"]\n', {}, "trust.keys[0]"),
        (BASE + "[store]\nkeep_images = 1\n", {}, "store.keep_images"),
        (BASE + "[mqtt]\nsession_expiry = 0\n", {}, "mqtt.session_expiry"),
        ("mqtt = 3\n" + BASE, {}, "mqtt"),
        ("device_id = \n", {}, "--config"),
    ],
)
def test_validation_names_the_field(tmp_path: Path, text: str, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(write(tmp_path, text), env=env)
    assert ei.value.field == field, ei.value
    assert ei.value.code == "config_invalid"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, input=stdin, timeout=60
    )


def test_agent_cli_reports_a_bad_config_and_exits_2(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + "[mqtt]\nport = 'high'\n")
    r = run("agent.ops.cli", "run", "--config", str(p))
    assert r.returncode == 2
    assert "mqtt.port" in r.stderr and "expected an integer" in r.stderr
    good = write(tmp_path, BASE)
    # check-config loads the trust keys as run does (wiring.validate_for_run): give it a real one
    key = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "trusted.pub").write_bytes(
        key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    ok = run("agent.ops.cli", "check-config", "--config", str(good))
    assert ok.returncode == 0 and json.loads(ok.stdout)["device_id"] == "dev-1"


def test_iothub_without_its_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # The base install has no `azure` package at all (the SDK is the [iothub] extra): then
    # find_spec("azure.iot.device") raises instead of answering None, and must still become the
    # refusal that names the extra, not a traceback. A None in sys.modules hides a package.
    from agent.ops import wiring

    for name in [m for m in sys.modules if m == "azure" or m.startswith("azure.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "azure", None)
    cfg = config.AgentConfig(device_id="dev-1", transport="iothub")
    with pytest.raises(ConfigError, match=r"pip install 'edge-ml\[iothub\]'"):
        wiring.check_channel_package(cfg)


def test_deploy_cli_keys_manifest_sign_verify(tmp_path: Path) -> None:
    from deploy import bundle

    r = run("deploy.cli", "keys", "create", "--out", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    keyid = json.loads(r.stdout)["keyid"]
    assert (tmp_path / "keys/signing.key").stat().st_mode & 0o777 == 0o600
    again = run("deploy.cli", "keys", "create", "--out", str(tmp_path / "keys"))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr

    (tmp_path / "model.onnx").write_bytes(b"m")
    b = tmp_path / "iris-3.tar"
    digest = bundle.build(b, "iris", "3", {"model.onnx": tmp_path / "model.onnx"})
    r = run(
        "deploy.cli",
        "manifest",
        "create",
        "--device",
        "dev-1",
        "--bundle",
        str(b),
        "--url",
        "http://h/iris-3.tar",
        "--generation",
        "4",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["image"] == {
        "name": "iris",
        "version": "3",
        "sha256": digest,
        "size": b.stat().st_size,
        "urls": ["http://h/iris-3.tar"],
    }
    signed = run(
        "deploy.cli", "manifest", "sign", "-", "--key", str(tmp_path / "keys/signing.key"), stdin=r.stdout
    )
    assert signed.returncode == 0, signed.stderr
    env = tmp_path / "signed.json"
    env.write_text(signed.stdout)
    pub = str(tmp_path / "keys/signing.pub")
    v = run("deploy.cli", "manifest", "verify", str(env), "--pubkey", pub, "--device", "dev-1")
    assert v.returncode == 0 and json.loads(v.stdout)["keyid"] == keyid
    v = run(
        "deploy.cli",
        "manifest",
        "verify",
        str(env),
        "--pubkey",
        pub,
        "--device",
        "dev-1",
        "--last-generation",
        "4",
    )
    assert v.returncode == 1 and json.loads(v.stdout)["code"] == "manifest_replay"
    v = run("deploy.cli", "manifest", "verify", str(env), "--pubkey", pub, "--device", "dev-2")
    assert v.returncode == 1 and json.loads(v.stdout)["code"] == "manifest_wrong_device"

    bad = json.loads(r.stdout)
    bad["image"]["sha256"] = "nothex"
    s = run(
        "deploy.cli",
        "manifest",
        "sign",
        "-",
        "--key",
        str(tmp_path / "keys/signing.key"),
        stdin=json.dumps(bad),
    )
    assert s.returncode == 2 and "image/sha256" in s.stderr


@pytest.mark.parametrize(
    "text", ['{"device_id": "a", "device_id": "b"}', '{"generation": NaN}', "[" * 64 + "]" * 64]
)
def test_manifest_sign_refuses_what_the_agent_would(tmp_path: Path, text: str) -> None:
    """The signer reads with the agent's strict reader: nothing is signed that a device refuses."""
    assert run("deploy.cli", "keys", "create", "--out", str(tmp_path / "keys")).returncode == 0
    doc = tmp_path / "m.json"
    doc.write_text(text)
    r = run("deploy.cli", "manifest", "sign", str(doc), "--key", str(tmp_path / "keys/signing.key"))
    assert r.returncode == 2 and r.stdout == ""
    assert "invalid_argument" in r.stderr and "strict JSON" in r.stderr
