"""The scoring API with TLS and client certificates, on a real agent over the real broker.

Off loopback the agent refuses to expose an API that authenticates nobody (config_invalid, exit 2);
with ``api.cert``/``api.key`` it speaks HTTPS; with ``api.client_ca`` a client without a certificate
of that CA is refused in the handshake, health checks included, and one with it is served.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy import pki
from edge_core.errors import ConfigError
from simulators.rig import AgentProcess, Rig

DEV = "dev-tls-api"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("api-pki")
    ca, ca_key = pki.create_ca("api test CA")
    other_ca, other_key = pki.create_ca("another CA")
    server, server_key = pki.issue_cert(ca, ca_key, "edge-api", server=True, sans=["127.0.0.1", "localhost"])
    client, client_key = pki.issue_cert(ca, ca_key, "scoring-client")
    stranger, stranger_key = pki.issue_cert(other_ca, other_key, "stranger")
    out = {
        "ca": ca, "server": server, "server_key": server_key, "client": client, "client_key": client_key,
        "stranger": stranger, "stranger_key": stranger_key,
    }  # fmt: skip
    paths = {}
    for name, data in out.items():
        paths[name] = d / f"{name}.pem"
        pki.write_pem(paths[name], data, private=name.endswith("key"))
    return paths


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]
) -> Iterator[tuple[Rig, AgentProcess]]:
    with Rig(tmp_path_factory.mktemp("api-tls")) as rig:
        api = {"listen": "127.0.0.1:0", "cert": str(certs["server"]), "key": str(certs["server_key"]),
               "client_ca": str(certs["ca"])}  # fmt: skip
        a = rig.add_device(DEV, {"api": api}).start()
        rig.wait_status(DEV, lambda s: bool((s.get("runtime") or {}).get("api")), timeout=30)
        yield rig, a


def _api_url(rig: Rig) -> str:
    status = rig.op.report(DEV) or {}
    url = str(status["runtime"]["api"])
    assert url.startswith("https://127.0.0.1:"), url
    return url


def _ctx(certs: dict[str, Path], cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    if cert is not None:
        ctx.load_cert_chain(certs[cert], certs[f"{cert}_key"])
    return ctx


def test_a_client_with_a_certificate_of_the_ca_is_served(
    agent: tuple[Rig, AgentProcess], certs: dict[str, Path]
) -> None:
    rig, _ = agent
    with httpx.Client(verify=_ctx(certs, "client")) as c:
        r = c.get(_api_url(rig) + "/v2/health/live")
    assert r.status_code == 200 and r.json() == {"live": True}


@pytest.mark.parametrize("cert", [None, "stranger"], ids=["no certificate", "another CA's certificate"])
def test_other_clients_are_refused_in_the_handshake(
    agent: tuple[Rig, AgentProcess], certs: dict[str, Path], cert: str | None
) -> None:
    rig, a = agent
    url = _api_url(rig) + "/v2/health/live"
    with (
        httpx.Client(verify=_ctx(certs, cert)) as c,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        c.get(url)
    assert a.running


def test_plain_http_is_not_served(agent: tuple[Rig, AgentProcess]) -> None:
    rig, _ = agent
    with pytest.raises(httpx.HTTPError):
        httpx.get(_api_url(rig).replace("https://", "http://") + "/v2/health/live", timeout=5)


def _config(tmp_path: Path, api: str) -> Path:
    key = tmp_path / "k.pem"
    key.write_text("unused")
    p = tmp_path / "agent.toml"
    p.write_text(f'device_id = "d"\n[trust]\nkeys = ["{key}"]\n[api]\n{api}\n')
    return p


@pytest.mark.parametrize(
    ("api", "field"),
    [
        ('listen = "0.0.0.0:8080"', "api.listen"),
        ('listen = "192.0.2.7:8080"', "api.listen"),
        ('listen = "[::]:8080"', "api.listen"),
        ('listen = "127.0.0.1:8080"\ncert = "server.pem"', "api.cert"),
        ('listen = "127.0.0.1:8080"\nclient_ca = "k.pem"', "api.client_ca"),
    ],
    ids=["any address", "a LAN address", "any v6 address", "cert without key", "client CA without TLS"],
)
def test_config_refusals(tmp_path: Path, api: str, field: str) -> None:
    from agent import config

    (tmp_path / "server.pem").write_text("x")
    with pytest.raises(ConfigError) as ei:
        config.load(_config(tmp_path, api), env={})
    assert ei.value.field == field


def test_an_exposed_api_with_a_token_or_an_explicit_opt_out_is_accepted(tmp_path: Path) -> None:
    from agent import config

    (tmp_path / "token").write_text("s3cret")
    assert config.load(_config(tmp_path, 'listen = "0.0.0.0:8080"\ntoken_file = "token"'), env={})
    assert config.load(_config(tmp_path, 'listen = "0.0.0.0:8080"\nallow_unauthenticated = true'), env={})


def test_the_agent_refuses_to_start_exposed_without_authentication(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 'listen = "0.0.0.0:8080"')
    r = subprocess.run(
        [sys.executable, "-m", "agent.ops.cli", "check-config", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r
    assert "api.listen" in r.stderr and "nothing authenticates" in r.stderr
