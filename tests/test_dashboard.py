"""The dashboard in a real browser (Debian's chromium, driven by selenium through chromedriver),
against `edge-deploy serve` as a real process, a real mosquitto broker and real `edge-agent`s:

the page loads and shows the fleet; it follows a rollout to its end live (the wave progress moves
without a reload); a rollback clicked on the page, through its confirmation dialog, reaches the
devices (their status shows the old image again).

A PNG screenshot per test goes to $EDGE_TEST_ARTIFACTS (else the test's tmp folder); with
EDGE_UPDATE_DOCS_SCREENSHOT=1 the last one also replaces docs/dashboard.png (the README's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy import cli
from deploy.registry import Registry
from simulators import models
from simulators.broker import free_port
from simulators.rig import Rig, wait_until

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not CHROMEDRIVER.exists(), reason="chromium-driver is not installed (bash dev.sh setup installs it)"
)

DEVICES = ["dev-1", "dev-2", "dev-3"]
DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


class Fleet:
    def __init__(self, rig: Rig, home: Path, api: str, token: str, shots: Path) -> None:
        self.rig, self.home, self.api, self.token, self.shots = rig, home, api, token, shots
        self.http = httpx.Client(
            base_url=api.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def sha(self, ref: str) -> str:
        name, version = ref.split(":")
        reg = Registry(self.home / "registry.db")
        try:
            return reg.image(name, int(version)).sha256
        finally:
            reg.close()


def _cli(home: Path, *argv: str) -> None:
    assert cli.main(["--home", str(home), *argv]) == 0, argv


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("dash")
    home, src = work / "home", work / "src"
    src.mkdir()
    shots = Path(os.environ.get("EDGE_TEST_ARTIFACTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with Rig(work / "rig") as rig:
        (home / "keys").mkdir(parents=True)
        for suffix in ("key", "pub"):  # the control plane signs with the key the devices trust
            (home / "keys" / f"signing.{suffix}").write_bytes(
                (rig.pubkey_path.parent / f"signing.{suffix}").read_bytes()
            )
        cert = rig.broker.client_cert("operator")
        files, api_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        (home / "config.toml").write_text(
            f"""
[broker]
host = "{rig.broker.host}"
port = {rig.broker.operator_port}
ca = "{cert.ca_path}"
cert = "{cert.cert_path}"
key = "{cert.key_path}"
prefix = "{rig.broker.prefix}"

[serve]
listen = "127.0.0.1:{files}"
poll = 0.2

[api]
listen = "127.0.0.1:{api_port}"
"""
        )
        for d in DEVICES:
            rig.add_device(d, {"telemetry": {"interval": 0.3}, "runtime": {"workers": 1}}).start()
        for d in DEVICES:
            rig.wait_status(d, lambda s: s.get("state") == "idle", timeout=60)
        _cli(home, "model", "register", "mlp", str(models.mlp(src / "m1.onnx", seed=1)))
        _cli(home, "model", "register", "mlp", str(models.mlp(src / "m2.onnx", seed=2)))
        _cli(home, "image", "build", "--name", "clf", "--model", "mlp=mlp:1")
        _cli(home, "image", "build", "--name", "clf", "--model", "mlp=mlp:2")
        _cli(home, "device", "list", "--json")  # learns the devices from their retained reports
        for d in DEVICES:
            _cli(home, "device", "tag", d, "fleet=edge", *(["ring=canary"] if d == "dev-1" else []))

        # `edge-deploy serve` as a real process: artifacts for the agents, the API and page for us
        log = open(home / "serve.log", "ab")  # noqa: SIM115 - open for the process's whole life
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "--home", str(home), "serve"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:
            api = f"http://127.0.0.1:{api_port}/"
            assert wait_until(lambda: (home / "api.token").exists(), 20)
            token = (home / "api.token").read_text().strip()
            f = Fleet(rig, home, api, token, shots)

            def up() -> bool:
                try:
                    return f.http.get("/api/devices").status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(up, 20, 0.2), (home / "serve.log").read_text()
            # everything on clf:1 first, driven by serve, so that a later rollback has somewhere to go
            dep = f.http.post(
                "/api/deployments",
                json={"image": "clf:1", "tag_query": {"fleet": "edge"}, "policy": {"canary": 3}},
            ).json()
            assert wait_until(
                lambda: f.http.get(f"/api/deployments/{dep['id']}").json()["state"] == "succeeded", 90
            )
            yield f
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()


@pytest.fixture(scope="module")
def browser(fleet: Fleet) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.implicitly_wait(0)
    try:
        driver.get(f"{fleet.api}#token={fleet.token}")
        yield driver
    finally:
        driver.quit()


def _shot(browser: Any, fleet: Fleet, name: str, docs: bool = False) -> None:
    path = fleet.shots / f"{name}.png"
    assert browser.save_screenshot(str(path)), path
    if docs and os.environ.get("EDGE_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(path, DOCS_PNG)


def _rows(browser: Any) -> dict[str, dict[str, str]]:
    """The fleet table as the page shows it, read in one script: the page re-renders the table on
    every event, so elements found one by one would go stale between two reads."""
    rows: dict[str, dict[str, str]] = browser.execute_script(
        """const out = {};
        for (const tr of document.querySelectorAll('#fleet tbody tr'))
          out[tr.dataset.device] = {image: tr.querySelector('td.image').textContent,
            state: tr.querySelector('td.state').textContent, tags: tr.querySelector('td.tags').textContent};
        return out;"""
    )
    return rows


def _click(browser: Any, css: str) -> None:
    """Click what ``css`` finds, found again when a re-render replaced it in between."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False

    assert wait_until(attempt, 10, 0.1), css


def _text(browser: Any, css: str) -> str:
    text: str = browser.execute_script("return document.querySelector(arguments[0])?.textContent ?? ''", css)
    return text


def test_the_page_shows_the_fleet_and_a_devices_history(fleet: Fleet, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    assert wait_until(lambda: set(_rows(browser)) == set(DEVICES), 15), _rows(browser)
    rows = _rows(browser)
    assert all(r["image"] == "clf:1" and r["state"] == "active" for r in rows.values()), rows
    assert "ring=canary" in rows["dev-1"]["tags"]
    # the token went from the address bar into the session
    assert "token" not in browser.current_url
    # search narrows the table
    box = browser.find_element(By.ID, "search")
    box.send_keys("canary")
    assert wait_until(lambda: set(_rows(browser)) == {"dev-1"}, 5)
    box.clear()
    box.send_keys(" ")  # an input event with an empty query shows all again
    assert wait_until(lambda: set(_rows(browser)) == set(DEVICES), 5)
    _click(browser, "#fleet tr[data-device='dev-2'] th button")
    assert wait_until(lambda: '"state": "active"' in _text(browser, "#device-status"), 10)
    history = _text(browser, "#device-history tbody")
    assert "clf:1" in history and "succeeded" in history
    # the registry shows what uses what
    assert wait_until(
        lambda: (
            "dev-1" in browser.find_element(By.CSS_SELECTOR, "#images tr[data-image='clf:1'] td.running").text
        ),
        5,
    )
    _shot(browser, fleet, "fleet")


def test_a_rollout_is_followed_live_to_its_end(fleet: Fleet, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.execute_script("window.__sameDocument = 'yes'")  # gone if the page reloads
    dep = fleet.http.post(
        "/api/deployments",
        json={"image": "clf:2", "tag_query": {"fleet": "edge"}, "policy": {"canary": 1, "growth": 2}},
    ).json()
    row = f"#deployments tr[data-deployment='{dep['id']}']"
    # the new deployment reaches the page by the event stream; select it
    assert wait_until(lambda: bool(browser.find_elements(By.CSS_SELECTOR, row)), 10)
    _click(browser, f"{row} th button")
    seen: list[str] = []

    def settled() -> bool:
        text = _text(browser, "#dep-summary")
        if not seen or seen[-1] != text:
            seen.append(text)
        return "state succeeded" in text

    assert wait_until(settled, 60, 0.1), seen
    done = {t.split(" · ")[2] for t in seen if t.count(" · ") >= 2}
    # more than the first and the last view: the waves' progress moved on the page while we watched
    assert len(done) >= 2 and "3/3 devices done" in done, seen
    assert browser.execute_script("return window.__sameDocument") == "yes"
    waves = browser.execute_script(
        "return [...document.querySelectorAll('#waves .wave')].map(w => [w.dataset.wave, w.textContent])"
    )
    assert [w[0] for w in waves] == ["1", "2"] and all("active" in w[1] for w in waves), waves
    assert wait_until(lambda: all(r["image"] == "clf:2" for r in _rows(browser).values()), 10), _rows(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "#progress-plot svg polyline")
    sha2 = fleet.sha("clf:2")
    assert all(fleet.rig.agents[d].current_image() == sha2 for d in DEVICES)
    _shot(browser, fleet, "rollout")


def test_a_rollback_clicked_on_the_page_reaches_the_devices(fleet: Fleet, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    dep_id = fleet.http.get("/api/deployments?image=clf:2").json()[-1]["id"]
    button = f"#deployments tr[data-deployment='{dep_id}'] button[data-action='rollback']"
    _click(browser, button)
    dialog = browser.find_element(By.ID, "confirm")
    assert wait_until(lambda: dialog.get_attribute("open") is not None, 5)
    assert dep_id in _text(browser, "#confirm-text")
    _shot(browser, fleet, "rollback-confirm")
    # cancel first: nothing is recorded
    browser.find_element(By.ID, "confirm-cancel").click()
    time.sleep(0.5)
    assert fleet.http.get(f"/api/deployments/{dep_id}").json()["state"] == "succeeded"
    _click(browser, button)
    assert wait_until(lambda: dialog.get_attribute("open") is not None, 5)
    browser.find_element(By.ID, "confirm-ok").click()

    def back() -> bool:
        rows = _rows(browser)
        return len(rows) == 3 and all(r["image"] == "clf:1" and r["state"] == "active" for r in rows.values())

    assert wait_until(back, 60, 0.2), _rows(browser)
    sha1 = fleet.sha("clf:1")
    assert all(fleet.rig.agents[d].current_image() == sha1 for d in DEVICES)
    final = fleet.http.get(f"/api/deployments/{dep_id}").json()
    assert final["state"] == "rolled_back" and {m["state"] for m in final["members"]} == {"reverted"}
    assert wait_until(lambda: "state rolled_back" in _text(browser, "#dep-summary"), 10)
    _shot(browser, fleet, "rolled-back", docs=True)
    print(json.dumps({"screenshots": str(fleet.shots)}))
