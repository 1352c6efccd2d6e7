"""Fleet provisioning: a device with only a shared claim certificate asks for its own identity.

The device (agent/ops/provision.py) makes its own key, and publishes on
``{prefix}/provisioning/{claim CN}/request`` a JSON document ``{"nonce", "device_id", "csr"}``. This
handler, on the operator listener, checks the policy in ``<home>/provisioning.toml``::

    [claims.factory]                       # accepts the claim certificate CN "claim-factory"
    device_ids = ["sensor-*", "cam-??"]    # fnmatch patterns the device id must match (default "*")
    tags = { site = "lyon" }               # set on the device in the registry

signs the CSR with the device CA (deploy/ca.py), records the device with the policy's tags, and answers
on ``{prefix}/provisioning/{claim CN}/response/{nonce}`` with ``{"ok": true, "device_id",
"certificate", "ca"}`` or ``{"ok": false, "code", "message"}``.

The claim CN comes from the topic, which the broker's ACL (``%u``) binds to the certificate the
request came with, so a claim cannot speak for another. The policy is read on every request: an
operator edits it without restarting anything.
"""

from __future__ import annotations

import fnmatch
import json
import queue
import re
import ssl
import threading
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deploy.ca import Pki, check_device_id
from deploy.config import ControlPlaneConfig
from deploy.registry import Registry
from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.log import get_logger
from edge_core.topics import CLAIM_PREFIX, provisioning_response

log = get_logger("provision")

#: The device picks it with 128 bits from a CSPRNG; anything else is not one of ours.
NONCE_RE = re.compile(r"[0-9a-f]{32}")
POLICY_FILE = "provisioning.toml"


@dataclass(frozen=True)
class ClaimPolicy:
    device_ids: tuple[str, ...] = ("*",)
    tags: Mapping[str, str] = field(default_factory=dict)


def load_policy(home: Path) -> dict[str, ClaimPolicy]:
    """The claims the policy accepts, by claim CN; none when the file does not exist."""
    path = home / POLICY_FILE
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ControlPlaneError(
            ErrorCode.CONFIG_INVALID, f"{path} is not readable TOML: {exc}", "fix the policy file"
        ) from None
    claims: dict[str, ClaimPolicy] = {}
    for name, section in (data.get("claims") or {}).items():
        ids = section.get("device_ids", ["*"])
        tags = section.get("tags", {})
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ControlPlaneError(
                ErrorCode.CONFIG_INVALID, f"{path}: claims.{name}.device_ids is not a list of patterns", ""
            )
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise ControlPlaneError(
                ErrorCode.CONFIG_INVALID, f"{path}: claims.{name}.tags is not a table of strings", ""
            )
        claims[CLAIM_PREFIX + name] = ClaimPolicy(tuple(ids), dict(tags))
    return claims


def _refusal(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"ok": False, "code": str(code), "message": message}


def handle_request(
    home: Path, ca: Pki, registry: Registry, claim_cn: str, request: Mapping[str, Any]
) -> dict[str, Any]:
    """The answer to one request (its nonce already checked): a certificate or a stable refusal."""
    policy = load_policy(home).get(claim_cn)
    if policy is None:
        return _refusal(ErrorCode.PROVISIONING_REFUSED, f"the policy accepts no claim {claim_cn!r}")
    device = request.get("device_id")
    csr = request.get("csr")
    if not isinstance(device, str) or not isinstance(csr, str):
        return _refusal(ErrorCode.PROVISIONING_REFUSED, "the request needs device_id and csr (strings)")
    try:
        check_device_id(device)
    except ControlPlaneError as exc:
        return _refusal(ErrorCode.PROVISIONING_REFUSED, exc.message)
    # A claim CN is a username with its own topics in the ACL: no device may take one as its id.
    if device.startswith(CLAIM_PREFIX) or not any(fnmatch.fnmatchcase(device, p) for p in policy.device_ids):
        return _refusal(
            ErrorCode.PROVISIONING_REFUSED,
            f"device id {device!r} is not allowed for {claim_cn} (patterns: {', '.join(policy.device_ids)})",
        )
    if device in ca.revoked_devices():
        return _refusal(ErrorCode.PROVISIONING_REVOKED, f"device {device!r} was revoked")
    try:
        public = x509.load_pem_x509_csr(csr.encode()).public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except ValueError as exc:
        return _refusal(ErrorCode.PROVISIONING_REFUSED, f"not a PEM certificate signing request: {exc}")
    known = ca.issued_public_keys(device)
    # Any claim holder could otherwise ask for an existing device's id and take its place; the same
    # key again is the device itself asking once more after a lost answer.
    if known and der not in known:
        return _refusal(
            ErrorCode.PROVISIONING_CONFLICT,
            f"device {device!r} already has a certificate for another key",
        )
    try:
        cert = ca.sign_csr(device, csr.encode())
    except ControlPlaneError as exc:
        return _refusal(ErrorCode.PROVISIONING_REFUSED, f"{exc.code}: {exc.message}")
    registry.provision_device(device, policy.tags)
    log.info("provision.issued", device=device, claim=claim_cn, tags=dict(policy.tags))
    return {"ok": True, "device_id": device, "certificate": cert.decode(), "ca": ca.ca.read_text()}


class ProvisioningService:
    """The operator-side MQTT client: requests arrive on paho's thread and are answered by whoever
    calls :meth:`step` (the registry's connection belongs to that thread)."""

    def __init__(self, cfg: ControlPlaneConfig, registry: Registry) -> None:
        cfg.validate_broker()
        self.cfg, self.registry, self.ca = cfg, registry, Pki.of_home(cfg.home)
        b = cfg.broker
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._client = mqtt.Client(client_id=f"provision-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        if b.ca and b.cert and b.key:
            self._client.tls_set(
                ca_certs=str(b.ca),
                certfile=str(b.cert),
                keyfile=str(b.key),
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._subscribed = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.on_message = self._on_message
        self.answered = 0

    def start(self, timeout: float = 10.0) -> None:
        b = self.cfg.broker
        try:
            self._client.connect(b.host, b.port, keepalive=30)
        except OSError as exc:
            raise ControlPlaneError(
                ErrorCode.BROKER_UNREACHABLE,
                f"cannot reach the broker at {b.host}:{b.port}: {exc}",
                "check [broker] in config.toml and that the broker runs",
            ) from None
        self._client.loop_start()  # paho reconnects by itself; requests wait in our queue
        if not self._subscribed.wait(timeout):
            self.stop()
            raise ControlPlaneError(
                ErrorCode.BROKER_UNREACHABLE,
                f"no subscription on {b.host}:{b.port} within {timeout}s",
                "check that the operator certificate is the operator listener's",
            )

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc == 0:
            client.subscribe(f"{self.cfg.broker.prefix}/provisioning/+/request", qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put((msg.topic, bytes(msg.payload)))

    def step(self, timeout: float = 0.0) -> int:
        """Answer the requests waiting (after at most ``timeout`` s for the first); returns how many."""
        done = 0
        try:
            topic, payload = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                done += self._answer(topic, payload)
                topic, payload = self._queue.get_nowait()
        except queue.Empty:
            return done

    def _answer(self, topic: str, payload: bytes) -> int:
        claim_cn = topic.split("/")[-2]
        try:
            request = json.loads(payload)
        except ValueError:
            return 0
        nonce = request.get("nonce") if isinstance(request, dict) else None
        if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
            log.warning("provision.bad_request", claim=claim_cn)  # no answer topic we may write to
            return 0
        answer = handle_request(self.cfg.home, self.ca, self.registry, claim_cn, request)
        if not answer["ok"]:
            log.warning("provision.refused", claim=claim_cn, code=answer["code"], message=answer["message"])
        self._client.publish(
            provisioning_response(self.cfg.broker.prefix, claim_cn, nonce), json.dumps(answer), qos=1
        )
        self.answered += 1
        return 1
