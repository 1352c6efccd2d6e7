"""End to end through real parts: a real edge-agent process, a real mosquitto with mutual TLS and
an ACL, a real HTTP server. Every hostile input gets its own test; after each, the previous image
is still the active one, the status says exactly what was refused and why, and the agent goes on to
accept the next good manifest (the next test starts by deploying one)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devicekit import Device

from edge_core import manifest as mf
from simulators.bundle_server import Fault
from simulators.rig import Rig

DEV = "dev-e2e"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    with Rig(tmp_path_factory.mktemp("e2e")) as rig:
        agent = rig.add_device(DEV).start()
        d = Device(rig, agent)
        d.deploy_good()
        yield d


def good_doc(dev: Device, **over: Any) -> dict[str, Any]:
    dev.version += 1
    b = dev.rig.build_bundle("iris", str(dev.version))
    return dev.rig.manifest(DEV, b, dev.next_gen(), **over)


def test_happy_path_reports_inventory_online_and_history(dev: Device) -> None:
    status = dev.deploy_good()
    assert status["error"] is None and status["rejected"] is None
    assert status["active"]["name"] == "iris" and status["active"]["version"] == str(dev.version)
    inv = dev.rig.op.report(DEV, "inventory")
    assert (
        inv
        and inv["device_id"] == DEV
        and "CPUExecutionProvider" in inv["onnxruntime"]["execution_providers"]
    )
    assert inv["cpu"]["count"] >= 1 and inv["memory_bytes"] > 0 and inv["disk"]["free_bytes"] > 0
    assert (dev.rig.op.report(DEV, "online") or {}).get("online") is True
    from agent.update.state import StateDB

    db = StateDB(dev.agent.state_dir / "agent.db")
    try:
        assert [t[2] for t in db.history(dev.generation)] == [
            "received",
            "downloading",
            "verifying",
            "installing",
            "activating",
            "active",
        ]
    finally:
        db.close()


def test_malformed_json(dev: Device) -> None:
    dev.refused(b'{"payloadType": "application/vnd.edge-ml.manifest+json", "payload": ', "manifest_malformed")
    dev.deploy_good()


def test_schema_violation(dev: Device) -> None:
    doc = good_doc(dev)
    doc["image"]["size"] = "big"
    dev.refused(mf.sign(doc, dev.rig.key), "manifest_schema")
    dev.deploy_good()


def test_unsigned(dev: Device) -> None:
    dev.refused(mf.canonical_json(good_doc(dev)), "manifest_unsigned")
    dev.deploy_good()


def test_unknown_key(dev: Device) -> None:
    dev.refused(mf.sign(good_doc(dev), Ed25519PrivateKey.generate()), "manifest_unknown_key")
    dev.deploy_good()


def test_bad_signature(dev: Device) -> None:
    env = json.loads(dev.rig.sign(good_doc(dev)))
    doc = json.loads(base64.b64decode(env["payload"]))
    doc["image"]["urls"] = ["http://127.0.0.1:9/evil.tar"]  # attacker swaps the URL, keeps the signature
    env["payload"] = base64.b64encode(mf.canonical_json(doc)).decode()
    dev.refused(mf.canonical_json(env), "manifest_bad_signature")
    dev.deploy_good()


def test_expired(dev: Device) -> None:
    doc = good_doc(dev, issued_at="2020-01-01T00:00:00Z", expires_at="2020-01-02T00:00:00Z")
    dev.refused(dev.rig.sign(doc), "manifest_expired")
    dev.deploy_good()


def test_replayed_generation(dev: Device) -> None:
    doc = good_doc(dev)
    doc["generation"] = dev.generation - 1  # an old generation, validly signed: a replay
    dev.refused(dev.rig.sign(doc), "manifest_replay")
    dev.deploy_good()


def test_digest_mismatch_from_a_corrupt_server(dev: Device) -> None:
    doc = good_doc(dev)
    name = Path(doc["image"]["urls"][0]).name
    dev.rig.server.set_fault(name, Fault(corrupt=True))
    try:
        dev.failed(doc, "digest_mismatch")
    finally:
        dev.rig.server.set_fault(name, None)
    dev.deploy_good()


def test_download_cut_halfway_is_resumed_not_restarted(dev: Device) -> None:
    doc = good_doc(dev)
    name = Path(doc["image"]["urls"][0]).name
    # a bigger bundle so "halfway" is meaningful
    big = dev.rig.build_bundle("iris", str(dev.version), {"model.onnx": bytes(range(256)) * 4096})
    doc = dev.rig.manifest(DEV, big, doc["generation"])
    half = doc["image"]["size"] // 2
    dev.rig.server.set_fault(name, Fault(cut_after=half, cut_times=1))
    try:
        dev.rig.deploy(DEV, doc)
        status = dev.rig.wait_active(DEV, doc["generation"])
    finally:
        dev.rig.server.set_fault(name, None)
    gets = [r for r in dev.rig.server.requests if r.name == name and r.method == "GET"]
    assert len(gets) == 2, gets
    assert gets[0].range is None
    assert gets[1].range == f"bytes={half}-", gets[1]
    assert gets[1].status == 206 and gets[1].bytes_sent == doc["image"]["size"] - half
    dev.active_sha = doc["image"]["sha256"]
    dev.assert_previous_still_active(status)


def test_server_sends_more_than_declared(dev: Device) -> None:
    doc = good_doc(dev)
    dev.rig.server.set_fault(Path(doc["image"]["urls"][0]).name, Fault(extra_bytes=4096))
    dev.failed(doc, "size_exceeded")
    dev.deploy_good()


def test_not_enough_disk(dev: Device) -> None:
    doc = good_doc(dev)
    doc["image"]["size"] = 1 << 40  # 1 TiB: more than this disk has
    dev.failed(doc, "insufficient_disk")
    requests_for = [r for r in dev.rig.server.requests if r.name == Path(doc["image"]["urls"][0]).name]
    assert requests_for == []  # refused before downloading a byte
    dev.deploy_good()


def _evil_bundle(dev: Device, member: tarfile.TarInfo, name: str) -> dict[str, Any]:
    dev.version += 1
    meta = json.dumps({"name": "iris", "version": str(dev.version)}).encode()
    path = dev.rig.bundles_dir / name
    with tarfile.open(path, "w") as tar:
        ti = tarfile.TarInfo("bundle.json")
        ti.size = len(meta)
        tar.addfile(ti, io.BytesIO(meta))
        tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return dev.rig.manifest(DEV, path, dev.next_gen())


def _ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize(
    "member",
    [
        _ti("/tmp/edge-evil-absolute", size=4),
        _ti("../../edge-evil-dotdot", size=4),
        _ti("model.onnx", tarfile.SYMTYPE, linkname="/etc/shadow"),
        _ti("null", tarfile.CHRTYPE, devmajor=1, devminor=3),
    ],
    ids=["absolute", "dotdot", "symlink", "device"],
)
def test_hostile_archive(dev: Device, member: tarfile.TarInfo) -> None:
    doc = _evil_bundle(dev, member, f"evil-{member.name.replace('/', '_')}.tar")
    dev.failed(doc, "unsafe_archive")
    assert not Path("/tmp/edge-evil-absolute").exists()
    assert not (dev.agent.state_dir.parent.parent / "edge-evil-dotdot").exists()
    dev.deploy_good()


def test_unreachable_url_retries_with_backoff_then_fails(dev: Device) -> None:
    doc = good_doc(dev)
    doc["image"]["urls"] = ["http://127.0.0.1:9/iris.tar"]  # discard port: connection refused
    dev.failed(doc, "download_failed")
    retries = [json.loads(line) for line in dev.agent.log_text().splitlines() if '"download.retry"' in line]
    mine = [r for r in retries if r["url"] == "http://127.0.0.1:9/iris.tar"]
    assert len(mine) == 2  # 3 attempts configured: 2 waits between them
    assert all(r["delay_s"] > 0 for r in mine)
    dev.deploy_good()


def test_transient_server_errors_are_retried(dev: Device) -> None:
    doc = good_doc(dev)
    name = Path(doc["image"]["urls"][0]).name
    dev.rig.server.set_fault(name, Fault(status=503, status_times=2))
    try:
        dev.rig.deploy(DEV, doc)
        dev.rig.wait_active(DEV, doc["generation"])
    finally:
        dev.rig.server.set_fault(name, None)
    assert [r.status for r in dev.rig.server.requests if r.name == name] == [503, 503, 200]
    dev.active_sha = doc["image"]["sha256"]


def test_second_url_is_used_when_the_first_is_gone(dev: Device) -> None:
    doc = good_doc(dev)
    doc["image"]["urls"].insert(0, dev.rig.server.url_for("no-such-bundle.tar"))
    dev.rig.deploy(DEV, doc)
    dev.rig.wait_active(DEV, doc["generation"])
    dev.active_sha = doc["image"]["sha256"]


def test_rollback_is_a_new_generation_naming_the_old_image(dev: Device) -> None:
    old = dev.rig.op.report(DEV)["active"]  # type: ignore[index]
    dev.deploy_good()
    prev_bundle = dev.rig.bundles_dir / f"iris-{old['version']}.tar"
    assert dev.agent.state_dir.joinpath("store/images", old["sha256"]).is_dir()  # kept for rollback
    doc = dev.rig.manifest(DEV, prev_bundle, dev.next_gen())
    dev.rig.server.set_fault(prev_bundle.name, Fault(status=500, status_times=100))  # must not be needed
    try:
        dev.rig.deploy(DEV, doc)
        status = dev.rig.wait_active(DEV, doc["generation"])
    finally:
        dev.rig.server.set_fault(prev_bundle.name, None)
    assert status["active"]["sha256"] == old["sha256"] == dev.agent.current_image()
    dev.active_sha = old["sha256"]


def test_retained_redelivery_is_not_a_replay(dev: Device) -> None:
    """After a restart the broker delivers the same retained manifest again: not an attack."""
    dev.deploy_good()
    assert dev.agent.stop() == 0  # SIGTERM: a clean exit
    offline = dev.rig.op.wait_for(DEV, lambda o: o.get("online") is False, kind="online")
    assert offline["reason"] == "shutdown"
    log_before = dev.agent.log_text()
    dev.agent.start()
    dev.rig.op.wait_for(DEV, lambda o: o.get("online") is True, kind="online", timeout=15)
    # The redelivered retained manifest is processed before this newer one (same topic, in order).
    dev.deploy_good()
    after = dev.agent.log_text()[len(log_before) :]
    assert '"manifest.refused"' not in after
    assert after.count('"manifest.accepted"') == 1
