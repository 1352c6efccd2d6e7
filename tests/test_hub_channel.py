"""The IoT Hub transport's pure parts (twin merge patches, connection strings) and its configuration.
The SDK against a hub is in test_iothub_e2e.py."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent.channel.iothub import _strip_nulls, apply_patch, merge_patch, status_from_twin
from agent.config import parse_connection_string
from edge_core import manifest as mf
from edge_core.errors import ConfigError
from simulators.iothub import twin_problem


def _random_doc(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if depth > 3 or kind < 0.35:
        return rng.choice([None, 0, 1, "a", "b", True, [1, 2], [rng.randint(0, 3)]])
    return {rng.choice("abcdef"): _random_doc(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_merge_patch_turns_the_old_document_into_the_new_one() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        old, new = _random_doc(rng), _random_doc(rng)
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        held = _strip_nulls(old)  # what a hub can hold: no nulls
        patch = merge_patch(held, new)
        expected = _strip_nulls(new)
        assert apply_patch(held, patch if patch is not None else {}) == expected, (held, new, patch)
        if held == expected:
            assert patch is None


def test_merge_patch_deletes_keys_the_new_document_no_longer_has() -> None:
    old = {"state": "failed", "error": {"code": "digest_mismatch", "hint": "x"}, "progress": {"bytes": 5}}
    new = {"state": "active", "error": None, "progress": None}
    assert merge_patch(old, new) == {"state": "active", "error": None, "progress": None}
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}) == {"a": {"c": None}}
    assert merge_patch({"a": [1, 2]}, {"a": [1]}) == {"a": [1]}  # arrays are replaced whole
    assert merge_patch({"a": 1}, {"a": {"b": None, "c": 2}}) == {"a": {"c": 2}}


def test_status_from_twin_puts_back_the_nulls_the_schema_requires() -> None:
    doc = status_from_twin({"state": "active", "generation": 3})
    assert doc["state"] == "active" and doc["error"] is None and doc["rejected"] is None
    assert set(mf.schema("status")["required"]) <= set(doc)


def test_twin_problem_names_what_iot_hub_refuses() -> None:
    assert twin_problem({"edge": {"status": {"state": "active"}}}) is None
    assert "'a.b'" in (twin_problem({"edge": {"a.b": 1}}) or "")
    assert "'$x'" in (twin_problem({"$x": 1}) or "")
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(12):
        node["k"] = {}
        node = node["k"]
    assert "deeper" in (twin_problem(deep) or "")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("HostName=h;DeviceId=d", "SharedAccessKey"),
        ("HostName=h;SharedAccessKey=k", "DeviceId"),
        ("DeviceId=d;SharedAccessKey=k", "HostName"),
        ("HostName=h;DeviceId;SharedAccessKey=k", "not KEY=VALUE"),
        ("", "not KEY=VALUE"),
    ],
)
def test_malformed_connection_strings_say_what_is_missing(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_connection_string(text)
    assert exc.value.field == "iothub.connection_string" and needle in exc.value.message


def test_connection_string_keeps_base64_padding() -> None:
    parts = parse_connection_string("HostName=hub.example;DeviceId=d-1;SharedAccessKey=YWJjZA==")
    assert parts == {"HostName": "hub.example", "DeviceId": "d-1", "SharedAccessKey": "YWJjZA=="}


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "trust.pub").write_text("key")
    (tmp_path / "dev.crt").write_text("cert")
    (tmp_path / "dev.key").write_text("key")
    (tmp_path / "cs").write_text("HostName=hub.example;DeviceId=dev-1;SharedAccessKey=YWJjZA==\n")
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "dev-1"\ntransport = "iothub"\n[trust]\nkeys = ["trust.pub"]\n' + body)
    return path


def test_iothub_config_with_a_connection_string_file(tmp_path: Path) -> None:
    cfg = config_mod.load(_write(tmp_path, '[iothub]\nconnection_string_file = "cs"\n'), env={})
    assert cfg.transport == "iothub" and cfg.iothub.connection_string_file == tmp_path / "cs"
    assert cfg.iothub.read_connection_string().startswith("HostName=hub.example;")
    assert cfg.control_endpoint() == "hub.example:8883"
    (tmp_path / "cs").write_text(
        "HostName=hub.example;DeviceId=dev-1;SharedAccessKey=YWJjZA==;GatewayHostName=gw\n"
    )
    assert cfg.control_endpoint() == "gw:8883"  # through an IoT Edge gateway


def test_iothub_config_with_x509(tmp_path: Path) -> None:
    body = '[iothub]\nhostname = "hub.example"\ncert = "dev.crt"\nkey = "dev.key"\n'
    cfg = config_mod.load(_write(tmp_path, body), env={})
    assert cfg.iothub.cert == tmp_path / "dev.crt" and cfg.control_endpoint() == "hub.example:8883"


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ("", "iothub", "either a connection string"),
        ('[iothub]\nconnection_string_file = "cs"\ncert = "dev.crt"\nkey = "dev.key"\n', "iothub", "either"),
        ('[iothub]\nconnection_string_file = "missing"\n', "iothub.connection_string_file", "does not exist"),
        ('[iothub]\nhostname = "h"\ncert = "gone.crt"\nkey = "dev.key"\n', "iothub.cert", "does not exist"),
        ('[iothub]\ncert = "dev.crt"\nkey = "dev.key"\n', "iothub.hostname", "hostname, cert and key"),
        ('[iothub]\nconnection_string = "HostName=h;DeviceId=other;SharedAccessKey=k"\n',
         "iothub.connection_string", "is for device 'other'"),
        ('[iothub]\nconnection_string_file = "cs"\nkeepalive = "often"\n', "iothub.keepalive", "integer"),
        ('[iothub]\nconnection_string_file = "cs"\nkeepalive = 2\n', "iothub.keepalive", "between 5"),
        ('[iothub]\nconnection_string_file = "cs"\nport = 443\n', "iothub.port", "unknown setting"),
        ('[iothub]\nconnection_string_file = "cs"\nsastoken_ttl = 60\n', "iothub.sastoken_ttl", ">= 300"),
    ],
)  # fmt: skip
def test_bad_iothub_config_names_the_field(tmp_path: Path, body: str, field: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_mod.load(_write(tmp_path, body), env={})
    assert exc.value.field == field and needle in exc.value.message, (exc.value.field, exc.value.message)


def test_unknown_transport_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    path.write_text(path.read_text().replace('"iothub"', '"amqp"'))
    with pytest.raises(ConfigError) as exc:
        config_mod.load(path, env={})
    assert exc.value.field == "transport"


def _channel(tmp_path: Path) -> Any:
    from agent.channel.iothub import HubChannel
    from agent.config import IotHubConfig

    (tmp_path / "cs").write_text("HostName=127.0.0.9;DeviceId=d;SharedAccessKey=YWJjZA==")
    ch = HubChannel("d", IotHubConfig(connection_string_file=tmp_path / "cs"))
    got: list[bytes] = []
    ch._on_desired = got.append
    return ch, got


def test_desired_versions_stale_gaps_and_rereads(tmp_path: Path) -> None:
    """No hub needed: the version bookkeeping on the SDK's callbacks, fed by hand."""
    ch, got = _channel(tmp_path)
    ch._take_desired({"$version": 3, "edge": {"manifest": "m3"}}, full=True)
    ch._take_desired({"$version": 3, "edge": {"manifest": "m3"}}, full=False)  # the same patch again
    ch._take_desired({"$version": 4, "edge": {"manifest": "m4"}}, full=False)
    ch._take_desired({"$version": 3, "edge": {"manifest": "m3"}}, full=True)  # a read overtaken by v4
    assert got == [b"m3", b"m4"] and not ch._refetch
    ch._take_desired({"$version": 6, "other": 1}, full=False)  # v5 never arrived
    assert ch._refetch and ch._desired_version == 6
    ch._take_desired({"$version": 6, "edge": {"manifest": "m5"}}, full=True)  # the re-read
    ch._take_desired({"$version": 7, "edge": {"manifest": None}}, full=False)  # cleared: nothing to do
    ch._take_desired({"$version": 8, "edge": {"manifest": {"payload": "x"}}}, full=False)
    assert got == [b"m3", b"m4", b"m5", b'{"payload": "x"}']
