"""Fleet provisioning, the device's side: with only a claim certificate, get an identity of its own.

Called by ``edge-agent run`` before the daemon opens its channel. When ``provisioning.claim_cert`` is
set and ``<identity_dir>/device.pem`` does not exist yet, the agent

1. makes its own EC P-256 key (``device.key``, 0600), once: a retry after a lost answer sends the
   same key, which the control plane then signs again instead of refusing it as a takeover;
2. connects with the claim certificate, subscribes to ``.../response/<nonce>`` (a fresh random nonce
   per request) and publishes ``{"nonce", "device_id", "csr"}`` on ``.../request``;
3. checks the answer (the CA signed it, its CN is the id asked for, its key is ours) and writes
   ``device.pem`` atomically, last: its presence is what "provisioned" means.

A refusal or no answer is logged with its stable code, and asked again after a backoff (the device
has no other identity to run with). Once provisioned the claim is never used again: the
configuration is pointed at ``device.pem``/``device.key``, and ``device_id`` is the certificate's CN.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig
from edge_core.errors import ErrorCode
from edge_core.fsutil import atomic_write
from edge_core.log import get_logger
from edge_core.retry import backoff_delays
from edge_core.topics import provisioning_request, provisioning_response

log = get_logger("provision")


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value.decode() if isinstance(value, bytes) else value


def identity_paths(cfg: AgentConfig) -> tuple[Path, Path]:
    d = cfg.provisioning.identity_dir or cfg.state_dir / "identity"
    return d / "device.pem", d / "device.key"


def requested_id(cfg: AgentConfig) -> str:
    pv = cfg.provisioning
    if pv.device_id_source == "machine-id":
        raw = pv.machine_id_file.read_text().strip()
    elif pv.device_id_source == "hostname":
        raw = socket.gethostname()
    else:
        raw = pv.device_id or cfg.device_id
    return pv.device_id_template.replace("{id}", raw)


def _own_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, mode=0o600)
    path.parent.chmod(0o700)
    return key


def _csr(key: ec.EllipticCurvePrivateKey, device: str) -> str:
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    return req.public_bytes(serialization.Encoding.PEM).decode()


def request_once(cfg: AgentConfig, claim_cn: str, device: str, csr: str) -> dict[str, Any]:
    """One request over the claim's connection: the answer document, or :class:`Refused` (timeout)."""
    pv, m = cfg.provisioning, cfg.mqtt
    nonce = secrets.token_hex(16)
    answer_topic = provisioning_response(m.prefix, claim_cn, nonce)
    answers: list[bytes] = []
    subscribed, answered = threading.Event(), threading.Event()
    # The broker makes the client id the claim CN whatever we send; clean start: nothing to keep.
    client = mqtt.Client(client_id=claim_cn, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(m.ca),
        certfile=str(pv.claim_cert),
        keyfile=str(pv.claim_key),
        cert_reqs=ssl.CERT_REQUIRED,
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc == 0:
            c.subscribe(answer_topic, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        answers.append(bytes(msg.payload))
        answered.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(m.host, m.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise Refused(ErrorCode.PROVISIONING_TIMEOUT, f"cannot reach {m.host}:{m.port}: {exc}") from None
    client.loop_start()
    try:
        if not subscribed.wait(pv.timeout):
            raise Refused(
                ErrorCode.PROVISIONING_TIMEOUT, "the broker did not accept the claim's subscription"
            )
        body = {"nonce": nonce, "device_id": device, "csr": csr}
        client.publish(provisioning_request(m.prefix, claim_cn), json.dumps(body), qos=1)
        if not answered.wait(pv.timeout):
            raise Refused(
                ErrorCode.PROVISIONING_TIMEOUT,
                f"no answer on {answer_topic} in {pv.timeout}s (is `edge-deploy provision serve` running?)",
            )
    finally:
        client.loop_stop()
        client.disconnect()
    try:
        doc: dict[str, Any] = json.loads(answers[0])
    except ValueError:
        raise Refused(ErrorCode.PROVISIONING_REFUSED, "the answer is not JSON") from None
    return doc


def _check_answer(
    cfg: AgentConfig, doc: dict[str, Any], device: str, key: ec.EllipticCurvePrivateKey
) -> bytes:
    if not doc.get("ok"):
        raise Refused(str(doc.get("code", ErrorCode.PROVISIONING_REFUSED)), str(doc.get("message", "")))
    try:
        pem = str(doc["certificate"]).encode()
        cert = x509.load_pem_x509_certificate(pem)
        assert cfg.mqtt.ca is not None  # validate() requires it with provisioning
        ca = x509.load_pem_x509_certificate(cfg.mqtt.ca.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (KeyError, ValueError, TypeError) as exc:
        raise Refused(
            ErrorCode.PROVISIONING_REFUSED, f"the certificate in the answer is not valid: {exc}"
        ) from None
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if _cn(cert) != device or ours != theirs:
        raise Refused(
            ErrorCode.PROVISIONING_REFUSED, "the certificate in the answer is not for this device's key"
        )
    return pem


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def ensure_identity(cfg: AgentConfig, sleep: Callable[[float], bool] = _sleep) -> bool:
    """Point ``cfg`` at this device's own identity, provisioning it first if need be.

    Returns False when ``sleep`` (given the backoff delay; True: stop) asked to stop before it had one.
    """
    if cfg.provisioning.claim_cert is None:
        return True
    cert_path, key_path = identity_paths(cfg)
    if not cert_path.is_file():
        assert cfg.provisioning.claim_cert is not None
        claim_cn = _cn(x509.load_pem_x509_certificate(cfg.provisioning.claim_cert.read_bytes()))
        device = requested_id(cfg)
        key = _own_key(key_path)
        csr = _csr(key, device)
        delay = backoff_delays(cfg.provisioning.backoff_min, cfg.provisioning.backoff_max)
        attempt = 0
        while True:
            log.info("provision.requesting", device_id=device, claim=claim_cn, attempt=attempt + 1)
            try:
                pem = _check_answer(cfg, request_once(cfg, claim_cn, device, csr), device, key)
                break
            except Refused as exc:
                wait = delay(attempt)
                log.error(
                    "provision.refused",
                    code=exc.code,
                    message=exc.message,
                    device_id=device,
                    retry_in_s=round(wait, 1),
                )
            attempt += 1
            if sleep(wait):
                return False
        atomic_write(cert_path, pem, mode=0o644)  # last: its presence means "provisioned"
        log.info("provision.done", device_id=device, cert=str(cert_path))
    cfg.device_id = _cn(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    cfg.mqtt.cert, cfg.mqtt.key = cert_path, key_path
    return True
