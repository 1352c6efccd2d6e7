"""The control plane's HTTP API (deploy/web/) on a real registry: every endpoint, the token, coded
errors for bad input, the OpenAPI document against the route table, and the event stream.

The registry is filled through its own entry points: models and images by the `edge-deploy` command
line (real ONNX files, real bundles), devices and heartbeats by ``ingest``, which is what `serve`
does with the reports it receives. The browser and real agents are tests/test_dashboard.py's."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy import cli, config
from deploy.config import ApiConfig
from deploy.registry import Registry
from deploy.web import ApiServer, check_exposure, ensure_token
from deploy.web.routes import ROUTES
from edge_core.errors import ConfigError
from simulators import models

DEVICES = ["dev-a", "dev-b", "dev-c"]


class Api:
    def __init__(self, server: ApiServer, home: Path) -> None:
        self.server, self.home = server, home
        self.token = (home / "api.token").read_text().strip()
        self.http = httpx.Client(
            base_url=server.url.rstrip("/"), headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        r = self.http.request(method, path, json=body)
        assert r.status_code == 200, (method, path, r.status_code, r.text)
        return r.json()

    def refused(self, status: int, code: str, method: str, path: str, **kw: Any) -> dict[str, str]:
        r = self.http.request(method, path, **kw)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        err: dict[str, str] = r.json()["error"]
        assert err["code"] == code and err["message"], err
        return err


def _report(reg: Registry, device: str, image: str | None, state: str = "active", gen: int = 1) -> None:
    status: dict[str, Any] = {"state": state, "generation": gen}
    if image:
        name, version = image.split(":")
        status["active"] = {"name": name, "version": version}
    reg.ingest([(device, "online", time.time(), {"online": True}), (device, "status", time.time(), status)])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("web") / "home"
    src = home.parent / "src"
    src.mkdir()
    argv = ["--home", str(home)]
    assert cli.main([*argv, "init"]) == 0  # no registry is made outside a home
    assert (
        cli.main([*argv, "model", "register", "mlp", str(models.mlp(src / "m.onnx")), "--tag", "task=t"]) == 0
    )
    for _ in range(2):
        assert cli.main([*argv, "image", "build", "--name", "clf", "--model", "mlp=mlp:1"]) == 0
    reg = Registry(home / "registry.db")
    for d in DEVICES:
        _report(reg, d, "clf:1")
    # two heartbeat windows of dev-a on clf:1: 100 requests at 10 ms, 300 at 20 ms, 4 errors
    t = time.time()
    reg.add_heartbeats(
        [
            (
                "dev-a",
                t - 20,
                {
                    "models": {
                        "clf": {"model": "clf", "version": "1", "requests": 100, "errors": 0, "p99_ms": 10.0}
                    }
                },
            ),
            (
                "dev-a",
                t - 5,
                {
                    "models": {
                        "clf": {"model": "clf", "version": "1", "requests": 300, "errors": 4, "p99_ms": 20.0}
                    }
                },
            ),
        ]
    )
    reg.close()
    cfg = config.load(home)
    server = ApiServer.from_config(cfg, "127.0.0.1:0").start()
    try:
        yield Api(server, home)
    finally:
        server.stop()


def test_the_token_file_is_made_private_and_every_api_route_needs_it(api: Api, tmp_path: Path) -> None:
    path = api.home / "api.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(api.token) >= 32
    assert ensure_token(path) == api.token  # read back, not replaced
    anon = httpx.Client(base_url=api.server.url.rstrip("/"), timeout=10)
    for r in ROUTES:
        path_ = r.path.replace("{", "").replace("}", "")
        resp = anon.request(r.method, path_, json={} if r.method == "POST" else None)
        assert resp.status_code == 401, (r.path, resp.status_code)
        assert resp.json()["error"]["code"] == "unauthorized" and "api.token" in resp.json()["error"]["hint"]
    wrong = anon.get("/api/devices", headers={"Authorization": "Bearer " + "x" * 43})
    assert wrong.status_code == 401
    # the page itself holds no data and loads without the token, from this server only
    page = anon.get("/")
    assert page.status_code == 200 and '<table id="fleet">' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere (no CDN)
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert anon.get("/app.js").status_code == 200 and anon.get("/app.css").status_code == 200


def test_off_loopback_needs_a_token_or_mutual_tls_unless_allowed() -> None:
    open_api = ApiConfig(require_token=False)
    check_exposure(open_api, "127.0.0.1")  # loopback: fine
    check_exposure(ApiConfig(), "0.0.0.0")  # the token: fine
    with pytest.raises(ConfigError, match=r"api\.listen"):
        check_exposure(open_api, "0.0.0.0")
    with pytest.raises(ConfigError):
        check_exposure(open_api, "192.168.1.10")
    check_exposure(ApiConfig(require_token=False, allow_open=True), "0.0.0.0")
    check_exposure(ApiConfig(require_token=False, client_ca=Path("ca.pem")), "0.0.0.0")


def test_openapi_document_and_route_table_agree(api: Api) -> None:
    doc = api.ok("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(r.method, r.path) for r in ROUTES}
    # every documented route answers (a coded answer from its handler, never "no such route")
    values = {"name": "clf", "version": "1", "device_id": "dev-a", "command": "pause"}
    dep = api.ok("POST", "/api/deployments", {"image": "clf:1", "devices": ["dev-c"]})
    values["deployment_id"] = dep["id"]
    for (method, path), op in ((k, doc["paths"][k[1]][k[0].lower()]) for k in sorted(documented)):
        for p in op["parameters"]:
            if p["in"] == "path":
                path = path.replace("{" + p["name"] + "}", values[p["name"]])
        if path == "/api/events":
            with api.http.stream("GET", path) as r:
                assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
            continue
        body: dict[str, Any] = (
            {"set": {}} if path.endswith("/tags") else {"image": "nope:1", "devices": ["dev-a"]}
        )
        r = api.http.request(method, path, json=body if method == "POST" else None)
        assert r.status_code != 404 or r.json()["error"]["code"] != "no_such_route", (method, path)
    api.ok("POST", f"/api/deployments/{dep['id']}/abort")


def test_read_endpoints(api: Api) -> None:
    ms = api.ok("GET", "/api/models?tag=task=t")
    assert [m["ref"] for m in ms] == ["mlp:1"] and ms[0]["images"] == ["clf:1", "clf:2"]
    assert api.ok("GET", "/api/models?tag=task=other") == []
    assert api.ok("GET", "/api/models/mlp/1")["inputs"][0]["name"] == "x"
    images = {i["ref"]: i for i in api.ok("GET", "/api/images?model=mlp:1")}
    assert set(images) == {"clf:1", "clf:2"}
    assert images["clf:1"]["devices"] == DEVICES and images["clf:2"]["devices"] == []
    assert api.ok("GET", "/api/images/clf/2")["models"] == ["mlp:1"]

    devices = {d["id"]: d for d in api.ok("GET", "/api/devices")}
    assert set(devices) == set(DEVICES)
    a = devices["dev-a"]
    assert (a["image"], a["state"], a["online"], a["requests"]) == ("clf:1", "active", True, 400)
    assert a["error_rate"] == pytest.approx(0.01) and a["p99_ms"] == pytest.approx(17.5)  # weighted
    assert devices["dev-b"]["p99_ms"] is None
    show = api.ok("GET", "/api/devices/dev-a")
    assert show["status"]["state"] == "active" and isinstance(show["history"], list)

    m = api.ok("GET", "/api/metrics?window=60&step=60")
    (series,) = m["series"]
    assert series["image"] == "clf:1" and sum(p["requests"] for p in series["points"]) == 400


def test_write_endpoints_tag_create_and_commands(api: Api) -> None:
    row = api.ok("POST", "/api/devices/dev-b/tags", {"set": {"ring": "canary", "site": "x"}})
    assert row["tags"] == {"ring": "canary", "site": "x"}
    row = api.ok("POST", "/api/devices/dev-b/tags", {"remove": ["site"]})
    assert row["tags"] == {"ring": "canary"}

    dep = api.ok(
        "POST",
        "/api/deployments",
        {
            "image": "clf:2",
            "tag_query": {"ring": "canary"},
            "policy": {"canary": 1, "gate": {"min_requests": 5}},
        },
    )
    assert (dep["state"], dep["devices"], dep["image"]) == ("running", 1, "clf:2")
    assert dep["target"] == {"tags": {"ring": "canary"}} and dep["policy"]["gate"]["min_requests"] == 5
    assert api.ok("GET", f"/api/deployments/{dep['id']}")["members"][0]["device_id"] == "dev-b"
    assert dep["id"] in [d["id"] for d in api.ok("GET", "/api/deployments?device=dev-b")]
    assert dep["id"] in [d["id"] for d in api.ok("GET", "/api/deployments?image=clf:2&state=running")]
    assert api.ok("GET", "/api/deployments?model=nomodel") == []

    # one rollout per device: refused with the owner's id
    err = api.refused(
        409, "device_busy", "POST", "/api/deployments", json={"image": "clf:1", "devices": ["dev-b"]}
    )
    assert dep["id"] in err["message"]
    # commands are recorded for `serve`; what the state table does not allow is refused
    api.refused(409, "deployment_state_conflict", "POST", f"/api/deployments/{dep['id']}/resume")
    paused = api.ok("POST", f"/api/deployments/{dep['id']}/pause")
    assert paused["state"] == "running"  # recorded; no serve runs here to carry it out
    events = api.ok("GET", f"/api/deployments/{dep['id']}")["events"]
    assert {"kind": "command", "detail": {"command": "pause"}}.items() <= events[-1].items()
    reg = Registry(api.home / "registry.db")
    try:
        assert reg.deployment(dep["id"])["command"] == "pause"
        reg.update_deployment(dep["id"], state="aborted", command=None)  # as if serve had aborted it
    finally:
        reg.close()
    assert api.ok("GET", f"/api/deployments/{dep['id']}")["state"] == "aborted"


def test_bad_input_gets_coded_errors_and_changes_nothing(api: Api) -> None:
    before = api.ok("GET", "/api/deployments")
    api.refused(404, "no_such_route", "GET", "/api/nothing")
    api.refused(405, "no_such_route", "DELETE", "/api/devices")
    api.refused(
        400,
        "malformed_json",
        "POST",
        "/api/deployments",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    api.refused(
        404, "image_not_found", "POST", "/api/deployments", json={"image": "nope:1", "devices": ["dev-a"]}
    )
    api.refused(
        404, "device_not_found", "POST", "/api/deployments", json={"image": "clf:1", "devices": ["ghost"]}
    )
    api.refused(
        400,
        "no_matching_devices",
        "POST",
        "/api/deployments",
        json={"image": "clf:1", "tag_query": {"ring": "none"}},
    )
    api.refused(400, "invalid_argument", "POST", "/api/deployments", json={"image": "clf:1"})
    api.refused(
        400,
        "invalid_argument",
        "POST",
        "/api/deployments",
        json={"image": "clf:1", "devices": ["dev-a"], "policy": {"canary": 0}},
    )
    api.refused(
        400,
        "invalid_argument",
        "POST",
        "/api/deployments",
        json={"image": "clf:1", "devices": ["dev-a"], "policy": {"no_such": 1}},
    )
    api.refused(400, "invalid_argument", "POST", "/api/deployments", json={"image": 5})
    api.refused(
        400, "invalid_argument", "POST", "/api/deployments", json={"image": "clf:x", "devices": ["dev-a"]}
    )
    api.refused(400, "invalid_argument", "POST", "/api/deployments", json=["clf:1"])
    api.refused(404, "deployment_not_found", "GET", "/api/deployments/dep-none")
    api.refused(404, "deployment_not_found", "POST", "/api/deployments/dep-none/pause")
    api.refused(400, "invalid_argument", "POST", f"/api/deployments/{before[0]['id']}/explode")
    api.refused(404, "device_not_found", "GET", "/api/devices/ghost")
    api.refused(400, "invalid_argument", "POST", "/api/devices/dev-a/tags", json={"set": {"bad key!": "v"}})
    api.refused(400, "invalid_argument", "POST", "/api/devices/dev-a/tags", json={"set": {"k": 1}})
    api.refused(400, "invalid_argument", "POST", "/api/devices/dev-a/tags", json={"colour": "red"})
    api.refused(404, "model_not_found", "GET", "/api/models/nope/1")
    api.refused(400, "invalid_argument", "GET", "/api/models/mlp/one")
    api.refused(400, "invalid_argument", "GET", "/api/metrics?window=-1")
    api.refused(400, "invalid_argument", "GET", "/api/devices?tag=novalue")
    assert api.ok("GET", "/api/deployments") == before
    assert api.ok("GET", "/api/devices/dev-a")["tags"] == {}


def test_the_event_stream_carries_device_and_deployment_changes(api: Api) -> None:
    got: list[tuple[str, Any]] = []
    ready = threading.Event()
    mine: dict[str, str] = {}

    def seen_both() -> bool:
        device = any(k == "device" and d["id"] == "dev-c" and d["state"] == "updating" for k, d in got)
        dep = any(k == "deployment" and d["id"] == mine.get("id") for k, d in got)
        return device and dep

    def read() -> None:
        with api.http.stream("GET", "/api/events", timeout=15) as r:
            kind = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                    if kind == "hello":
                        ready.set()
                elif line.startswith("data: ") and kind != "hello":
                    got.append((kind, json.loads(line[6:])))
                    if seen_both():
                        return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(1.2)  # the watcher's first pass records the present; changes come after it
    reg = Registry(api.home / "registry.db")
    try:
        _report(reg, "dev-c", "clf:2", state="updating", gen=7)  # a report, as serve ingests it
    finally:
        reg.close()
    dep = api.ok("POST", "/api/deployments", {"image": "clf:2", "devices": ["dev-a"]})
    mine["id"] = dep["id"]
    t.join(15)
    assert seen_both(), got
    devices = [d for k, d in got if k == "device" and d["id"] == "dev-c"]
    assert devices[-1]["image"] == "clf:2" and devices[-1]["generation"] == 7, devices
    deps = [d for k, d in got if k == "deployment" and d["id"] == dep["id"]]
    assert deps[0]["state"] == "running" and deps[0]["events"][0]["kind"], deps
    api.ok("POST", f"/api/deployments/{dep['id']}/abort")


def test_the_cli_and_the_api_read_the_same_registry_alike(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """The read paths of the command line and of the API agree, field for field where they share one."""

    def cli_json(*argv: str) -> Any:
        capsys.readouterr()
        assert cli.main(["--home", str(api.home), *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    by_cli = cli_json("model", "list")
    by_api = api.ok("GET", "/api/models")
    assert [{k: m[k] for k in by_cli[0]} for m in by_api] == by_cli
    images = cli_json("image", "list", "--model", "mlp:1")
    assert [{k: i[k] for k in images[0]} for i in api.ok("GET", "/api/images?model=mlp:1")] == images
    devices = cli_json("device", "list", "--offline")
    keys = ("id", "tags", "online", "state", "image", "generation", "status")
    assert [{k: d[k] for k in keys} for d in api.ok("GET", "/api/devices")] == [
        {k: d[k] for k in keys} for d in devices
    ]
    deps = cli_json("deploy", "list")
    listed = [{k: v for k, v in d.items() if k != "members"} for d in api.ok("GET", "/api/deployments")]
    assert listed == deps
    one = deps[0]["id"]
    assert api.ok("GET", f"/api/deployments/{one}") == cli_json("deploy", "show", one)


def test_serve_goes_on_without_the_api_when_its_port_is_taken(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.web import start_api

    taken = f"127.0.0.1:{api.server.port}"
    assert start_api(config.load(api.home), taken) is None
    assert "cannot listen on" in capsys.readouterr().err
