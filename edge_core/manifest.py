"""The deployment manifest: canonical encoding, signing envelope and pure verification.

A manifest travels inside a DSSE envelope (the in-toto / Sigstore "Dead Simple Signing Envelope")::

    {"payloadType": "application/vnd.edge-ml.manifest+json",
     "payload": "<base64 of the canonical JSON encoding of the manifest>",
     "signatures": [{"keyid": "<sha256 of the raw Ed25519 public key, hex>", "sig": "<base64>"}]}

The signature is Ed25519 over DSSE's pre-authentication encoding of (payloadType, payload bytes).
Carrying the signed bytes verbatim means the verifier never re-canonicalises JSON it does not trust
yet: it checks the signature over exactly the bytes it received, then parses them. See
docs/manifest.md.

:func:`verify` is pure: bytes, trusted keys, the device id, the current time and the last accepted
generation in; a :class:`Manifest` or a :class:`ManifestRefused` out. It does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_core import strictjson
from edge_core.errors import ErrorCode, ManifestRefused

PAYLOAD_TYPE = "application/vnd.edge-ml.manifest+json"
#: Larger messages are refused before any parsing: a manifest is a few hundred bytes.
MAX_ENVELOPE_BYTES = 256 * 1024


@dataclass(frozen=True)
class ImageRef:
    name: str
    version: str
    sha256: str
    size: int
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A verified manifest. Only :func:`verify` should construct one from untrusted bytes."""

    device_id: str
    deployment_id: str
    generation: int
    issued_at: datetime
    expires_at: datetime
    image: ImageRef
    rollout_id: str | None = None
    runtime: Mapping[str, Any] = field(default_factory=dict)
    data_collection: Mapping[str, Any] = field(default_factory=dict)
    #: The canonical payload bytes that were signed; stored so a restart re-verifies nothing.
    payload: bytes = b""
    keyid: str = ""

    def data_collector(self) -> DataCollector:
        """The Azure ML data-collector part of ``data_collection``, resolved (see :func:`data_collector`)."""
        return data_collector(self.data_collection)

    @classmethod
    def from_payload(cls, payload: bytes, keyid: str = "") -> Manifest:
        """Build from payload bytes that were verified before (e.g. read back from local state)."""
        doc = strictjson.loads(payload)
        img = doc["image"]
        return cls(
            device_id=doc["device_id"],
            deployment_id=doc["deployment_id"],
            generation=doc["generation"],
            issued_at=parse_time(doc["issued_at"]),
            expires_at=parse_time(doc["expires_at"]),
            image=ImageRef(img["name"], img["version"], img["sha256"], img["size"], tuple(img["urls"])),
            rollout_id=doc.get("rollout_id"),
            runtime=doc.get("runtime", {}),
            data_collection=doc.get("data_collection", {}),
            payload=payload,
            keyid=keyid,
        )


# --- the data collector -------------------------------------------------------------------------

#: ``data_collection.rolling_rate``: how finely collected data is split into blobs (Azure ML's names).
ROLLING_RATES = ("Minute", "Hour", "Day", "Month", "Year")
#: The collections the scoring API fills itself, from the HTTP request and response (Azure ML's
#: reserved names); every other name is a ``Collector(name=...)`` in score.py.
PAYLOAD_COLLECTIONS = ("request", "response")


@dataclass(frozen=True)
class DataCollector:
    """What a manifest's ``data_collection`` asks of Azure ML's data collector (docs/manifest.md)."""

    #: enabled collection -> its sampling rate (the collection's own, else the section's, else 1)
    collections: Mapping[str, float] = field(default_factory=dict)
    rolling_rate: str = "Hour"
    #: the legacy ModelDataCollector (Azure ML's ``collect_model_data``)
    collect_model_data: bool = False
    #: request headers recorded with the ``request`` collection (``request_logging.capture_headers``)
    capture_headers: tuple[str, ...] = ()
    endpoint_name: str | None = None
    deployment_name: str | None = None
    subscription_id: str = "default"
    resource_group: str = "default"
    workspace_name: str = "default"

    @property
    def active(self) -> bool:
        return bool(self.collections) or self.collect_model_data


def data_collector(section: Mapping[str, Any]) -> DataCollector:
    """Resolve the data-collector keys of a ``data_collection`` section that passed the schema.

    As in Azure ML's deployment YAML: a collection is collected only with ``enabled: true``; its
    ``sampling_rate`` defaults to the section's ``sampling_rate``, which defaults to 1.0; a rate of 0
    collects nothing, so it is left out. ``rolling_rate`` is matched without regard to case."""
    default_rate = float(section.get("sampling_rate", 1.0))
    rates: dict[str, float] = {}
    for name, spec in (section.get("collections") or {}).items():
        if isinstance(spec, Mapping) and spec.get("enabled") is True:
            rate = float(spec.get("sampling_rate", default_rate))
            if rate > 0:
                rates[str(name)] = rate
    rolling = str(section.get("rolling_rate", "Hour"))
    rolling = next((r for r in ROLLING_RATES if r.lower() == rolling.lower()), "Hour")
    ws = section.get("workspace") or {}
    return DataCollector(
        collections=rates,
        rolling_rate=rolling,
        collect_model_data=bool(section.get("collect_model_data", False)),
        capture_headers=tuple(
            str(h).lower() for h in (section.get("request_logging") or {}).get("capture_headers") or ()
        ),
        endpoint_name=section.get("endpoint_name"),
        deployment_name=section.get("deployment_name"),
        subscription_id=str(ws.get("subscription_id", "default")),
        resource_group=str(ws.get("resource_group", "default")),
        workspace_name=str(ws.get("name", "default")),
    )


# --- encoding ---------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8, no NaN: same object, same bytes."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: binds the payload type into what is signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def sign(manifest: Mapping[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    """Return the signed envelope (bytes, ready to publish) for a manifest document."""
    payload = canonical_json(manifest)
    sig = private_key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }
    return canonical_json(envelope)


@cache
def schema(name: str = "manifest") -> dict[str, Any]:
    """A JSON Schema shipped in the package: ``manifest`` or ``status``."""
    text = resources.files("edge_core").joinpath(f"schemas/{name}.schema.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


@cache
def _validator(name: str = "manifest") -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(name))


def schema_error(doc: Any, name: str = "manifest") -> str | None:
    """The first violation of a shipped schema by a document, as "path: message", or None."""
    errors = sorted(_validator(name).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {errors[0].message}{more}"


def parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp, strictly: ValueError for an impossible date (February 30th) or an offset
    beyond +-23:59, which the schema's pattern lets through."""
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- verification -----------------------------------------------------------------------------

#: strictjson reasons that say a value is out of any allowed range (the rest: not one JSON document).
_OUT_OF_RANGE = frozenset({"non_finite", "int_too_long"})


def _refuse(code: ErrorCode, message: str, hint: str) -> ManifestRefused:
    return ManifestRefused(code, message, hint)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _refuse(ErrorCode.MANIFEST_MALFORMED, f"{what} is not a base64 string", "re-sign the manifest")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise _refuse(ErrorCode.MANIFEST_MALFORMED, f"{what} is not valid base64: {exc}", "re-sign") from None


def verify(
    data: bytes,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    *,
    device_id: str,
    now: datetime,
    last_generation: int,
) -> Manifest:
    """Verify a signed manifest envelope. Pure: no I/O, no clock, no globals.

    Checks, in this order (cheapest and least trusting first): size and JSON shape of the envelope;
    a signature by a trusted key over the exact payload bytes; the payload against the JSON Schema;
    that it names this device; that it has not expired; that its generation is above
    ``last_generation`` (a replayed or rolled-back manifest is refused; a rollback is a *new*
    generation naming the old image).
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise _refuse(
            ErrorCode.MANIFEST_MALFORMED,
            f"message is {len(data)} bytes, more than the {MAX_ENVELOPE_BYTES} a manifest may have",
            "publish a signed manifest envelope, not a bundle",
        )
    try:
        env = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise _refuse(
            ErrorCode.MANIFEST_MALFORMED,
            f"the envelope is not strict JSON: {exc}",
            "publish a signed manifest envelope",
        ) from None
    if not isinstance(env, dict):
        raise _refuse(
            ErrorCode.MANIFEST_MALFORMED, "envelope is not a JSON object", "publish a signed envelope"
        )
    if "payload" not in env or not env.get("signatures"):
        raise _refuse(
            ErrorCode.MANIFEST_UNSIGNED,
            "message carries no signature (expected a DSSE envelope with payload and signatures)",
            "sign it with `edge-deploy manifest sign`",
        )
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise _refuse(
            ErrorCode.MANIFEST_MALFORMED,
            f"payloadType is {env.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}",
            "sign it with `edge-deploy manifest sign`",
        )
    sigs = env["signatures"]
    if not isinstance(sigs, list):
        raise _refuse(ErrorCode.MANIFEST_MALFORMED, "signatures is not a list", "re-sign the manifest")
    payload = _b64(env["payload"], "payload")
    signed_input = pae(PAYLOAD_TYPE, payload)

    keyid = ""
    seen_trusted = False
    for entry in sigs:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise _refuse(
                ErrorCode.MANIFEST_MALFORMED, "a signature entry has no keyid", "re-sign the manifest"
            )
        key = trusted_keys.get(entry["keyid"])
        if key is None:
            continue
        seen_trusted = True
        try:
            key.verify(_b64(entry.get("sig"), "sig"), signed_input)
        except InvalidSignature:
            continue
        keyid = entry["keyid"]
        break
    if not keyid:
        if not seen_trusted:
            ids = ", ".join(str(e.get("keyid"))[:16] for e in sigs if isinstance(e, dict))
            raise _refuse(
                ErrorCode.MANIFEST_UNKNOWN_KEY,
                f"signed by key(s) {ids} which this device does not trust",
                "sign with a key listed in the agent's trust.keys, or add its public key there",
            )
        raise _refuse(
            ErrorCode.MANIFEST_BAD_SIGNATURE,
            "signature does not verify over the payload (tampered or signed by another key)",
            "re-sign the manifest; if you did not change it, treat this as an attack",
        )

    try:
        doc = strictjson.loads(payload)
    except strictjson.StrictJSONError as exc:
        # A number no range can hold is a schema violation; anything else means the bytes are not one
        # unambiguous JSON document, whoever signed them.
        code = ErrorCode.MANIFEST_SCHEMA if exc.reason in _OUT_OF_RANGE else ErrorCode.MANIFEST_MALFORMED
        raise _refuse(
            code, f"the signed payload is not strict JSON: {exc}", "re-sign it with edge-deploy"
        ) from None
    fix = "fix the manifest against edge_core/schemas/manifest.schema.json and re-sign"
    if (problem := schema_error(doc)) is not None:
        raise _refuse(ErrorCode.MANIFEST_SCHEMA, problem, fix)
    try:
        m = Manifest.from_payload(payload, keyid)
    except ValueError as exc:  # a timestamp that matches the pattern but names no instant
        raise _refuse(ErrorCode.MANIFEST_SCHEMA, f"issued_at or expires_at: {exc}", fix) from None
    if m.device_id != device_id:
        raise _refuse(
            ErrorCode.MANIFEST_WRONG_DEVICE,
            f"manifest is for device {m.device_id!r}, this is {device_id!r}",
            "publish each device its own manifest",
        )
    if m.expires_at <= m.issued_at:
        raise _refuse(
            ErrorCode.MANIFEST_SCHEMA, "expires_at is not after issued_at", "fix the validity window"
        )
    if now >= m.expires_at:
        raise _refuse(
            ErrorCode.MANIFEST_EXPIRED,
            f"manifest expired at {format_time(m.expires_at)} (device time {format_time(now)})",
            "issue a new manifest with a later expires_at; check the device clock",
        )
    if m.generation <= last_generation:
        raise _refuse(
            ErrorCode.MANIFEST_REPLAY,
            f"generation {m.generation} is not above the last accepted generation {last_generation}",
            "publish a new generation; to roll back, issue a new generation naming the old image",
        )
    return m
