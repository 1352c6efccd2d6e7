"""Hostile input, sent as an attacker or a broken server would, to one real agent over the real broker.

Every case asserts the documented code (docs/errors.md) and that the image that was serving still
serves: the same ``current`` on disk, the same image in the status, and an answer on the scoring API.
Between the classes of cases a good deployment shows that the agent still takes good manifests.

The classes: the envelope (parsing, signatures), the signed payload (parser differentials, ranges,
dates), the download (sizes, special files, redirects, a trickling server), the bundle (bundle.json
against its files, paths it names, unsafe members).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devicekit import Device

from edge_core import manifest as mf
from simulators.bundle_server import Fault
from simulators.rig import Rig

DEV = "dev-hostile"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    with Rig(tmp_path_factory.mktemp("hostile")) as rig:
        # A short overall deadline, so that a trickling server is cut off within seconds.
        overrides = {"download": {"deadline_base": 3.0, "min_rate": 1 << 20, "timeout": 5.0}}
        agent = rig.add_device(DEV, overrides).start()
        d = Device(rig, agent)
        d.deploy_good()
        yield d


def still_serves(dev: Device) -> None:
    """The scoring API answers for the image that kept serving."""
    inventory = dev.rig.op.report(DEV, "inventory") or {}
    api = inventory.get("runtime", {}).get("api")
    assert api, inventory
    assert httpx.get(f"{api}/v2/health/live", timeout=10).status_code == 200


def good_doc(dev: Device) -> dict[str, Any]:
    dev.version += 1
    b = dev.rig.build_bundle("iris", str(dev.version))
    return dev.rig.manifest(DEV, b, dev.next_gen())


def signed_raw(dev: Device, payload: bytes, key: Ed25519PrivateKey | None = None) -> bytes:
    """An envelope over exactly ``payload``: what a signer that does not canonicalise would send."""
    key = key or dev.rig.key
    sig = key.sign(mf.pae(mf.PAYLOAD_TYPE, payload))
    env = {
        "payloadType": mf.PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": mf.key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps(env).encode()


def payload_text(dev: Device, edit: Callable[[str], str] | None = None, **over: Any) -> bytes:
    """A good manifest's JSON text for the next generation, edited as text (to forge what no JSON
    encoder writes: duplicate keys, NaN, 5,000-digit numbers)."""
    doc = good_doc(dev)
    doc.update(over)
    text = json.dumps(doc)
    return (edit(text) if edit else text).encode()


# --- the envelope ------------------------------------------------------------------------------

ENVELOPES: dict[str, tuple[Callable[[Device], bytes], str]] = {
    "empty": (lambda d: b"", "manifest_malformed"),
    "not json": (lambda d: b"{not json", "manifest_malformed"),
    "not utf8": (lambda d: b'{"payload": "\xff\xfe"}', "manifest_malformed"),
    "a list": (lambda d: b"[]", "manifest_malformed"),
    "a string": (lambda d: b'"manifest"', "manifest_malformed"),
    "a number": (lambda d: b"42", "manifest_malformed"),
    "too large": (lambda d: b'{"pad": "' + b"x" * (mf.MAX_ENVELOPE_BYTES + 1) + b'"}', "manifest_malformed"),
    "two payload keys": (
        lambda d: d.rig.sign(good_doc(d)).replace(b'"payload":', b'"payload":"e30=","payload":', 1),
        "manifest_malformed",
    ),
    "NaN": (lambda d: b'{"payload": NaN, "signatures": [1]}', "manifest_malformed"),
    "Infinity": (lambda d: b'{"payload": -Infinity, "signatures": [1]}', "manifest_malformed"),
    "1e999": (lambda d: b'{"payload": 1e999, "signatures": [1]}', "manifest_malformed"),
    "5000-digit integer": (
        lambda d: b'{"payload": ' + b"9" * 5000 + b', "signatures": [1]}',
        "manifest_malformed",
    ),
    "nested 100000 deep": (lambda d: b"[" * 100_000 + b"]" * 100_000, "manifest_malformed"),
    "nested 33 deep": (lambda d: b'{"a":' * 33 + b"1" + b"}" * 33, "manifest_malformed"),
    "wrong payloadType": (
        lambda d: d.rig.sign(good_doc(d)).replace(mf.PAYLOAD_TYPE.encode(), b"application/json"),
        "manifest_malformed",
    ),
    "no signatures": (
        lambda d: json.dumps({"payloadType": mf.PAYLOAD_TYPE, "payload": "e30="}).encode(),
        "manifest_unsigned",
    ),
    "empty signatures": (
        lambda d: json.dumps({"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": []}).encode(),
        "manifest_unsigned",
    ),
    "signatures an object": (
        lambda d: json.dumps(
            {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": {"keyid": "x"}}
        ).encode(),
        "manifest_malformed",
    ),
    "payload not base64": (
        lambda d: json.dumps(
            {"payloadType": mf.PAYLOAD_TYPE, "payload": "!!!", "signatures": [{"keyid": "k", "sig": "AA=="}]}
        ).encode(),
        "manifest_malformed",
    ),
    "signature without keyid": (
        lambda d: json.dumps(
            {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"sig": "AA=="}]}
        ).encode(),
        "manifest_malformed",
    ),
    "sig not base64": (
        lambda d: json.dumps(
            {
                "payloadType": mf.PAYLOAD_TYPE,
                "payload": "e30=",
                "signatures": [{"keyid": mf.key_id(d.rig.key.public_key()), "sig": "%%%"}],
            }
        ).encode(),
        "manifest_malformed",
    ),
    "a bare manifest": (lambda d: mf.canonical_json(good_doc(d)), "manifest_unsigned"),
    "an untrusted key": (
        lambda d: mf.sign(good_doc(d), Ed25519PrivateKey.generate()),
        "manifest_unknown_key",
    ),
    "a forged signature": (
        lambda d: _swap_payload(d.rig.sign(good_doc(d)), mf.canonical_json({"device_id": DEV})),
        "manifest_bad_signature",
    ),
    "another payload's signature": (
        lambda d: _swap_payload(d.rig.sign(good_doc(d)), mf.canonical_json(good_doc(d))),
        "manifest_bad_signature",
    ),
}


def _swap_payload(envelope: bytes, payload: bytes) -> bytes:
    env = json.loads(envelope)
    env["payload"] = base64.b64encode(payload).decode()
    return json.dumps(env).encode()


@pytest.mark.parametrize("case", list(ENVELOPES), ids=list(ENVELOPES))
def test_hostile_envelope(dev: Device, case: str) -> None:
    make, code = ENVELOPES[case]
    dev.refused(make(dev), code)
    still_serves(dev)


# --- the signed payload -------------------------------------------------------------------------

PAYLOADS: dict[str, tuple[Callable[[Device], bytes], str]] = {
    "not json": (lambda d: b"{device_id", "manifest_malformed"),
    "not utf8": (lambda d: b'{"device_id": "\xff"}', "manifest_malformed"),
    "two device_id keys": (
        lambda d: payload_text(
            d, lambda t: t.replace('"device_id":', '"device_id": "dev-other", "device_id":', 1)
        ),
        "manifest_malformed",
    ),
    "two image keys": (
        lambda d: payload_text(d, lambda t: t.replace('"image":', '"image": {}, "image":', 1)),
        "manifest_malformed",
    ),
    "NaN sample rate": (
        lambda d: payload_text(d, data_collection={"sample_rate": "@NAN@"}, edit=None),
        "manifest_schema",
    ),
    "Infinity sample rate": (
        lambda d: payload_text(d, data_collection={"sample_rate": "@INF@"}),
        "manifest_schema",
    ),
    "5000-digit generation": (
        lambda d: payload_text(d, lambda t: _set_number(t, "generation", "9" * 5000)),
        "manifest_schema",
    ),
    "1e400 size": (lambda d: payload_text(d, lambda t: _set_number(t, "size", "1e400")), "manifest_schema"),
    "nested 40 deep": (lambda d: payload_text(d, runtime=_nest(40)), "manifest_malformed"),
    "a list": (lambda d: b"[]", "manifest_schema"),
    "no device_id": (
        lambda d: payload_text(d, lambda t: t.replace('"device_id"', '"device"', 1)),
        "manifest_schema",
    ),
    "another device": (lambda d: payload_text(d, device_id="dev-other"), "manifest_wrong_device"),
    "expired": (
        lambda d: payload_text(d, issued_at="2020-01-01T00:00:00Z", expires_at="2020-01-02T00:00:00Z"),
        "manifest_expired",
    ),
    "expires before issued": (
        lambda d: payload_text(d, issued_at="2099-01-02T00:00:00Z", expires_at="2099-01-01T00:00:00Z"),
        "manifest_schema",
    ),
    "February 30th": (lambda d: payload_text(d, expires_at="2099-02-30T00:00:00Z"), "manifest_schema"),
    "hour 25": (lambda d: payload_text(d, expires_at="2099-01-01T25:00:00Z"), "manifest_schema"),
    "offset +25:00": (lambda d: payload_text(d, expires_at="2099-01-01T00:00:00+25:00"), "manifest_schema"),
    "a replayed generation": (lambda d: payload_text(d, generation=1), "manifest_replay"),
    "generation 0": (lambda d: payload_text(d, generation=0), "manifest_schema"),
    "generation a string": (lambda d: payload_text(d, generation="7"), "manifest_schema"),
    "generation true": (
        lambda d: payload_text(d, lambda t: _set_number(t, "generation", "true")),
        "manifest_schema",
    ),
    "sha256 not hex": (
        lambda d: payload_text(d, lambda t: _set_str(t, "sha256", "z" * 64)),
        "manifest_schema",
    ),
    "negative size": (lambda d: payload_text(d, lambda t: _set_number(t, "size", "-1")), "manifest_schema"),
    "an ftp URL": (
        lambda d: payload_text(d, lambda t: _set_list(t, "urls", '["ftp://127.0.0.1/x.tar"]')),
        "manifest_schema",
    ),
    "no URL": (lambda d: payload_text(d, lambda t: _set_list(t, "urls", "[]")), "manifest_schema"),
    "sample rate 2": (lambda d: payload_text(d, data_collection={"sample_rate": 2}), "manifest_schema"),
    "a device id with a slash": (lambda d: payload_text(d, device_id="dev/../x"), "manifest_schema"),
}


def _nest(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth):
        doc = {"x": doc}
    return doc


def _set_number(text: str, key: str, literal: str) -> str:
    doc = json.loads(text)
    target = doc["image"] if key in doc["image"] else doc
    target[key] = "@VALUE@"
    return json.dumps(doc).replace('"@VALUE@"', literal)


def _set_str(text: str, key: str, value: str) -> str:
    doc = json.loads(text)
    doc["image"][key] = value
    return json.dumps(doc)


def _set_list(text: str, key: str, literal: str) -> str:
    return _set_number(text, key, literal)


@pytest.mark.parametrize("case", list(PAYLOADS), ids=list(PAYLOADS))
def test_hostile_signed_payload(dev: Device, case: str) -> None:
    make, code = PAYLOADS[case]
    payload = make(dev).replace(b'"@NAN@"', b"NaN").replace(b'"@INF@"', b"Infinity")
    dev.refused(signed_raw(dev, payload), code)
    still_serves(dev)


def test_the_agent_still_takes_good_manifests_after_the_refusals(dev: Device) -> None:
    dev.deploy_good()
    still_serves(dev)


# --- the download -------------------------------------------------------------------------------


class _Redirects(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.path + "x")  # a new URL each time: a loop, not a repeat
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def redirect_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/loop"
    finally:
        server.shutdown()
        server.server_close()


def _with_urls(dev: Device, urls: list[str]) -> dict[str, Any]:
    doc = good_doc(dev)
    doc["image"]["urls"] = urls
    return doc


def test_a_file_url_naming_a_directory(dev: Device, tmp_path: Path) -> None:
    dev.failed(_with_urls(dev, [tmp_path.as_uri()]), "download_failed")
    still_serves(dev)


def test_a_file_url_naming_a_fifo_does_not_hang_the_deployer(dev: Device, tmp_path: Path) -> None:
    fifo = tmp_path / "bundle.tar"
    os.mkfifo(fifo)
    status = dev.failed(_with_urls(dev, [fifo.as_uri()]), "download_failed")
    assert "not a regular file" in status["error"]["message"]
    still_serves(dev)


def test_a_file_url_naming_dev_zero_reads_no_more_than_declared(dev: Device) -> None:
    status = dev.failed(_with_urls(dev, ["file:///dev/zero"]), "download_failed")
    assert "not a regular file" in status["error"]["message"]
    partials = list((dev.agent.state_dir / "store" / "downloads").glob("*.partial"))
    assert all(p.stat().st_size <= 1 << 20 for p in partials)
    still_serves(dev)


def test_a_missing_file_url(dev: Device, tmp_path: Path) -> None:
    dev.failed(_with_urls(dev, [(tmp_path / "nothing.tar").as_uri()]), "download_failed")
    still_serves(dev)


def test_a_redirect_loop(dev: Device, redirect_url: str) -> None:
    status = dev.failed(_with_urls(dev, [redirect_url]), "download_failed")
    assert "redirects" in status["error"]["message"]
    still_serves(dev)


def test_a_server_that_trickles_is_cut_off_by_the_download_deadline(dev: Device) -> None:
    doc = good_doc(dev)
    name = Path(doc["image"]["urls"][0]).name
    dev.rig.server.set_fault(name, Fault(rate_bytes_per_s=64))  # under every read timeout, for ever
    try:
        status = dev.failed(doc, "download_failed")
    finally:
        dev.rig.server.set_fault(name, None)
    assert "did not finish within" in status["error"]["message"]
    still_serves(dev)


def test_a_wrong_digest(dev: Device) -> None:
    doc = good_doc(dev)
    doc["image"]["sha256"] = hashlib.sha256(b"another bundle").hexdigest()
    dev.failed(doc, "digest_mismatch")
    still_serves(dev)


def test_a_declared_size_smaller_than_the_bundle(dev: Device) -> None:
    doc = good_doc(dev)
    doc["image"]["size"] -= 100
    dev.failed(doc, "size_exceeded")
    still_serves(dev)


def test_an_http_404(dev: Device) -> None:
    dev.failed(_with_urls(dev, [dev.rig.server.url_for("no-such.tar")]), "download_failed")
    still_serves(dev)


# --- the bundle ---------------------------------------------------------------------------------


def _member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **kw: Any
) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


MODEL = b"not an onnx model, never loaded: every case is refused before that"


def _meta(dev: Device, **over: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format": 1,
        "name": "iris",
        "version": str(dev.version),
        "files": {"model.onnx": _entry(MODEL)},
        "models": [],
        "entry_script": None,
        "wheels": [],
    }
    meta.update(over)
    return meta


def _bundle_doc(
    dev: Device, meta: dict[str, Any] | bytes, members: list[tuple[tarfile.TarInfo, bytes]]
) -> dict[str, Any]:
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    path = dev.rig.bundles_dir / f"crafted-{dev.generation + 1}.tar"
    with tarfile.open(path, "w") as tar:
        ti = tarfile.TarInfo("bundle.json")
        ti.size = len(meta_bytes)
        tar.addfile(ti, io.BytesIO(meta_bytes))
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if m.isreg() else None)
    doc = good_doc(dev)
    data = path.read_bytes()
    doc["image"].update(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), urls=[dev.rig.server.url_for(path.name)]
    )
    return doc


BUNDLES: dict[
    str, tuple[Callable[[Device], tuple[dict[str, Any] | bytes, list[tuple[tarfile.TarInfo, bytes]]]], str]
] = {
    "bundle.json not json": (lambda d: (b"{", [_member("model.onnx", MODEL)]), "bundle_invalid"),
    "bundle.json two name keys": (
        lambda d: (
            json.dumps(_meta(d)).replace('"name":', '"name": "x", "name":', 1).encode(),
            [_member("model.onnx", MODEL)],
        ),
        "bundle_invalid",
    ),
    "bundle.json NaN": (
        lambda d: (
            json.dumps(_meta(d, smoke_test="@N@")).replace('"@N@"', "NaN").encode(),
            [_member("model.onnx", MODEL)],
        ),
        "bundle_invalid",
    ),
    "bundle.json nested 200 deep": (
        lambda d: (json.dumps(_meta(d, tags=_nest(200))).encode(), [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "bundle.json a list": (lambda d: (b"[]", [_member("model.onnx", MODEL)]), "bundle_invalid"),
    "an unknown format": (lambda d: (_meta(d, format=2), [_member("model.onnx", MODEL)]), "bundle_invalid"),
    "format true": (lambda d: (_meta(d, format=True), [_member("model.onnx", MODEL)]), "bundle_invalid"),
    "no format": (
        lambda d: ({k: v for k, v in _meta(d).items() if k != "format"}, [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "another name": (lambda d: (_meta(d, name="other"), [_member("model.onnx", MODEL)]), "bundle_invalid"),
    "no files table": (
        lambda d: ({k: v for k, v in _meta(d).items() if k != "files"}, [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "a file not listed": (
        lambda d: (_meta(d), [_member("model.onnx", MODEL), _member("extra.py", b"import os")]),
        "bundle_invalid",
    ),
    "a listed file missing": (
        lambda d: (
            _meta(d, files={"model.onnx": _entry(MODEL), "gone.bin": _entry(b"x")}),
            [_member("model.onnx", MODEL)],
        ),
        "bundle_invalid",
    ),
    "a file with another sha256": (
        lambda d: (_meta(d), [_member("model.onnx", MODEL[:-1] + b"!")]),
        "bundle_invalid",
    ),
    "a file of another size": (lambda d: (_meta(d), [_member("model.onnx", MODEL + b"x")]), "bundle_invalid"),
    "a files entry without sha256": (
        lambda d: (_meta(d, files={"model.onnx": {"size": len(MODEL)}}), [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "a model file outside the image": (
        lambda d: (
            _meta(d, models=[{"name": "m", "file": "../../../../etc/passwd"}]),
            [_member("model.onnx", MODEL)],
        ),
        "bundle_invalid",
    ),
    "an absolute model file": (
        lambda d: (_meta(d, models=[{"name": "m", "file": "/etc/passwd"}]), [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "an entry script that is not a file": (
        lambda d: (_meta(d, entry_script="../score.py"), [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "a wheel that is not a file": (
        lambda d: (_meta(d, wheels=["/tmp/evil.whl"]), [_member("model.onnx", MODEL)]),
        "bundle_invalid",
    ),
    "an absolute member": (lambda d: (_meta(d), [_member("/tmp/edge-hostile-abs", b"x")]), "unsafe_archive"),
    "a dotdot member": (lambda d: (_meta(d), [_member("../edge-hostile-up", b"x")]), "unsafe_archive"),
    "a symlink member": (
        lambda d: (_meta(d), [_member("model.onnx", kind=tarfile.SYMTYPE, linkname="/etc/shadow")]),
        "unsafe_archive",
    ),
    "a hard link member": (
        lambda d: (_meta(d), [_member("model.onnx", kind=tarfile.LNKTYPE, linkname="bundle.json")]),
        "unsafe_archive",
    ),
    "a fifo member": (lambda d: (_meta(d), [_member("pipe", kind=tarfile.FIFOTYPE)]), "unsafe_archive"),
    "a device member": (
        lambda d: (_meta(d), [_member("null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)]),
        "unsafe_archive",
    ),
    "a member twice": (
        lambda d: (_meta(d), [_member("model.onnx", MODEL), _member("./model.onnx", MODEL)]),
        "unsafe_archive",
    ),
    "a backslash in a name": (lambda d: (_meta(d), [_member("a\\b", b"x")]), "unsafe_archive"),
}


@pytest.mark.parametrize("case", list(BUNDLES), ids=list(BUNDLES))
def test_hostile_bundle(dev: Device, case: str) -> None:
    make, code = BUNDLES[case]
    dev.version += 1
    meta, members = make(dev)
    dev.failed(_bundle_doc(dev, meta, members), code)
    assert not Path("/tmp/edge-hostile-abs").exists()
    images = dev.agent.state_dir / "store" / "images"
    assert sorted(p.name for p in images.iterdir()) == sorted(
        p.name for p in images.iterdir() if (p / "bundle.json").exists()
    )
    still_serves(dev)


def test_the_agent_still_takes_good_manifests_at_the_end(dev: Device) -> None:
    dev.deploy_good()
    still_serves(dev)
    assert dev.agent.running
