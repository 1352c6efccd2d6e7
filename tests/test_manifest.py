"""The pure verifier: every refusal code, from bytes alone (no broker needed here; the same cases
run end to end through a real broker in test_agent_refusals.py)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy import signer
from edge_core import manifest as mf
from edge_core.errors import ErrorCode, ManifestRefused

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
TRUSTED = {mf.key_id(KEY.public_key()): KEY.public_key()}


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema_version": 1,
        "device_id": "dev-1",
        "deployment_id": "dep-1",
        "generation": 5,
        "issued_at": "2026-11-25T11:00:00Z",
        "expires_at": "2026-11-26T11:00:00Z",
        "image": {"name": "iris", "version": "1", "sha256": "a" * 64, "size": 10, "urls": ["http://x/b.tar"]},
    }
    d.update(over)
    return d


def verify(data: bytes, last: int = 0, keys: Any = TRUSTED) -> mf.Manifest:
    return mf.verify(data, keys, device_id="dev-1", now=NOW, last_generation=last)


def refused(data: bytes, code: ErrorCode, **kw: Any) -> ManifestRefused:
    with pytest.raises(ManifestRefused) as ei:
        verify(data, **kw)
    assert ei.value.code == code, ei.value
    assert ei.value.message and ei.value.hint
    return ei.value


def test_good_manifest_round_trips() -> None:
    m = verify(mf.sign(doc(), KEY))
    assert (m.generation, m.image.name, m.image.size, m.keyid) == (5, "iris", 10, mf.key_id(KEY.public_key()))
    assert json.loads(m.payload) == doc()


def test_canonical_encoding_is_deterministic() -> None:
    a = doc()
    b = dict(reversed(list(doc().items())))
    assert mf.canonical_json(a) == mf.canonical_json(b)
    assert mf.sign(a, KEY) == mf.sign(b, KEY)  # Ed25519 is deterministic too


def test_refusals() -> None:
    refused(b"{not json", ErrorCode.MANIFEST_MALFORMED)
    refused(b"[1,2]", ErrorCode.MANIFEST_MALFORMED)
    refused(b"x" * (mf.MAX_ENVELOPE_BYTES + 1), ErrorCode.MANIFEST_MALFORMED)
    refused(mf.canonical_json(doc()), ErrorCode.MANIFEST_UNSIGNED)
    env = json.loads(mf.sign(doc(), KEY))
    refused(mf.canonical_json({**env, "signatures": []}), ErrorCode.MANIFEST_UNSIGNED)
    other = Ed25519PrivateKey.generate()
    refused(mf.sign(doc(), other), ErrorCode.MANIFEST_UNKNOWN_KEY)
    # a signature from a trusted key id over other bytes
    tampered = dict(env, payload=base64.b64encode(mf.canonical_json(doc(generation=99))).decode())
    refused(mf.canonical_json(tampered), ErrorCode.MANIFEST_BAD_SIGNATURE)
    # a forged signature under the trusted key id
    forged = dict(
        env,
        signatures=[{"keyid": env["signatures"][0]["keyid"], "sig": base64.b64encode(b"\0" * 64).decode()}],
    )
    refused(mf.canonical_json(forged), ErrorCode.MANIFEST_BAD_SIGNATURE)
    refused(mf.sign(doc(generation="five"), KEY), ErrorCode.MANIFEST_SCHEMA)
    refused(mf.sign(doc(extra=1), KEY), ErrorCode.MANIFEST_SCHEMA)
    refused(mf.sign(doc(image={**doc()["image"], "sha256": "XYZ"}), KEY), ErrorCode.MANIFEST_SCHEMA)
    refused(mf.sign(doc(device_id="dev-2"), KEY), ErrorCode.MANIFEST_WRONG_DEVICE)
    refused(mf.sign(doc(expires_at="2026-11-25T11:30:00Z"), KEY), ErrorCode.MANIFEST_EXPIRED)
    refused(mf.sign(doc(), KEY), ErrorCode.MANIFEST_REPLAY, last=5)
    refused(mf.sign(doc(), KEY), ErrorCode.MANIFEST_REPLAY, last=6)
    assert verify(mf.sign(doc(), KEY), last=4).generation == 5


def test_schema_error_names_the_field() -> None:
    err = refused(mf.sign(doc(image={**doc()["image"], "size": -1}), KEY), ErrorCode.MANIFEST_SCHEMA)
    assert "image/size" in err.message


def test_one_trusted_signature_among_unknown_ones_is_enough() -> None:
    env = json.loads(mf.sign(doc(), KEY))
    env["signatures"].insert(0, {"keyid": "f" * 64, "sig": base64.b64encode(b"\1" * 64).decode()})
    assert verify(mf.canonical_json(env)).generation == 5


def test_signer_refuses_what_agents_would_refuse() -> None:
    with pytest.raises(ValueError, match="image"):
        signer.sign_manifest(doc(image={}), KEY)


def test_expiry_is_checked_against_the_given_clock() -> None:
    data = mf.sign(doc(), KEY)
    later = NOW + timedelta(days=2)
    with pytest.raises(ManifestRefused) as ei:
        mf.verify(data, TRUSTED, device_id="dev-1", now=later, last_generation=0)
    assert ei.value.code == ErrorCode.MANIFEST_EXPIRED
