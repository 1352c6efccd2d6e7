"""A small X.509 PKI for the MQTT broker and its clients.

The broker authenticates every client by its TLS certificate and uses the certificate's common name
as the MQTT username (mosquitto's ``use_identity_as_username``); the ACL then confines a device to
its own topic subtree (see :func:`edge_core.topics.mosquitto_device_acl`). So a device's identity
*is* the CN of the certificate this module issues, and an operator's tooling uses it to enrol devices.

The client id is tied to the CN as well: on the devices' listener ``use_username_as_clientid`` replaces
it with the CN, or device A's certificate connecting as ``dev-b`` would log dev-b off and take its
session. Operators keep their own client ids (their processes share one certificate and connect at
the same time), so they connect to a listener of their own that trusts only a second CA, one that
issues operator certificates and nothing else: create two CAs with :func:`create_ca`, sign device
certificates with the first and operator certificates with the second. docs/status.md shows the
mosquitto configuration (simulators/broker.py writes it), and the same rule on EMQX, HiveMQ, AWS IoT
Core and Azure IoT Hub.

Choices, and why:

* EC P-256 keys signed with SHA-256: small, fast to generate (tests make many) and accepted by every
  TLS stack the fleet runs (OpenSSL 1.1 on old devices included).
* Certificates carry Subject/Authority Key Identifiers and key usages that strict verifiers (OpenSSL
  3 with ``X509_STRICT``, Python >= 3.13's default context) require.
* Validity starts a few minutes in the past so that a device whose clock runs slightly behind the
  issuing machine's still accepts a certificate issued just now.
* Keys are written unencrypted (PKCS#8 PEM) with mode 0600: the daemon must start unattended, so
  the protection of a key is the file's permissions, and :func:`write_pem` never lets a key exist on
  disk, even briefly, with looser ones.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_core.fsutil import atomic_write

__all__ = [
    "cert_common_name",
    "cert_expiry",
    "create_ca",
    "issue_cert",
    "write_pem",
]

#: How far in the past a certificate's validity starts, to tolerate devices with a slow clock.
CLOCK_SKEW = timedelta(minutes=5)

#: Characters that must not appear in a client certificate's CN: the CN becomes the MQTT username,
#: which mosquitto substitutes for ``%u`` in ACL topic patterns; a ``/``, ``+`` or ``#`` there would
#: change which topics the pattern grants.
_FORBIDDEN_CLIENT_CN_CHARS = frozenset("/+#\x00")

_IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    if not common_name or not common_name.strip():
        raise ValueError("common_name must not be empty")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _aware(value: datetime, what: str) -> datetime:
    """Refuse naive datetimes: whether they mean UTC or local time is a guess we should not make."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (e.g. datetime.now(UTC))")
    return value.astimezone(UTC)


def create_ca(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """Create a self-signed certificate authority.

    Returns ``(cert_pem, key_pem)``. The CA may sign end-entity certificates only (path length 0):
    this PKI has no intermediate CAs, so nothing it issues should be able to act as one.
    """
    if days <= 0:
        raise ValueError("days must be positive")
    key = _new_key()
    name = _name(common_name)
    now = datetime.now(UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_issuer(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, _IssuerKey]:
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported CA key type {type(ca_key).__name__}: use an EC or RSA key")
    # A mismatched pair would produce certificates that no verifier accepts; fail at issue time instead.
    if ca_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != ca_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError("the CA key does not belong to the CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError("the issuer certificate is not a CA (basicConstraints CA=true is missing)")
    return ca_cert, ca_key


def _authority_key_identifier(ca_cert: x509.Certificate, ca_key: _IssuerKey) -> x509.AuthorityKeyIdentifier:
    """Copy the CA's own key identifier when it has one, so chain building matches them exactly."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _general_names(sans: Sequence[str]) -> list[x509.GeneralName]:
    """Parse each subject alternative name: an IP literal becomes an IPAddress, anything else a DNSName.

    TLS clients match an IP-literal host only against IPAddress entries, never against a DNSName that
    happens to spell the address, so the distinction matters.
    """
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in sans:
        san = raw.strip()
        if not san:
            raise ValueError("empty subject alternative name")
        try:
            ip = ipaddress.ip_address(san)
        except ValueError:
            key = san.lower()
            general: x509.GeneralName = x509.DNSName(san)
        else:
            key = str(ip)
            general = x509.IPAddress(ip)
        if key not in seen:
            seen.add(key)
            names.append(general)
    return names


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    if days <= 0:
        raise ValueError("days must be positive")
    if not_before is not None:
        start = _aware(not_before, "not_before")
        end = _aware(not_after, "not_after") if not_after is not None else start + timedelta(days=days)
    elif not_after is not None:
        end = _aware(not_after, "not_after")
        start = datetime.now(UTC) - CLOCK_SKEW
        if start >= end:
            # An explicitly past not_after (an expired certificate, for tests): start `days` before it.
            start = end - timedelta(days=days)
    else:
        start = datetime.now(UTC) - CLOCK_SKEW
        end = start + CLOCK_SKEW + timedelta(days=days)
    if start >= end:
        raise ValueError(
            f"not_before ({start.isoformat()}) must be earlier than not_after ({end.isoformat()})"
        )
    return start, end


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    server: bool = False,
    sans: Sequence[str] = (),
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue an end-entity certificate signed by the CA; returns ``(cert_pem, key_pem)``.

    A client certificate (the default) is for a device (CN = device id) or an operator; its CN is
    the MQTT username, so it must not contain ``/``, ``+`` or ``#``. A server certificate
    (``server=True``) is for the broker: clients check the host they dialled against its subject
    alternative names, so when ``sans`` is empty the CN is used as the only DNS name.

    ``days`` (825, the longest validity browsers ever accepted for TLS certificates) sets the
    lifetime unless ``not_after`` is given. Both bounds may be set explicitly, in the past too, which
    is how tests make expired or not-yet-valid certificates. Datetimes must be timezone-aware.
    """
    if not server and _FORBIDDEN_CLIENT_CN_CHARS.intersection(common_name):
        raise ValueError(
            f"client common name {common_name!r} contains one of '/', '+', '#' or NUL: it is used as the "
            "MQTT username in ACL topic patterns"
        )
    subject = _name(common_name)
    ca_cert, ca_key = _load_issuer(ca_cert_pem, ca_key_pem)
    start, end = _validity(days, not_before, not_after)

    key = _new_key()
    public_key = key.public_key()
    aki = _authority_key_identifier(ca_cert, ca_key)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                # ECDHE-ECDSA handshakes need only signatures; no key encipherment with EC keys.
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    names = _general_names(sans if sans or not server else [common_name])
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def write_pem(path: str | os.PathLike[str], data: bytes, private: bool) -> None:
    """Write PEM data atomically (readers see the old file or the new one, never a partial one) and
    durably. A private key is created 0600 and never exists with looser permissions, not even
    between creation and a later chmod; certificates get 0644."""
    atomic_write(Path(path), data, mode=0o600 if private else 0o644)


def cert_expiry(cert_pem: bytes) -> datetime:
    """The certificate's notAfter, as an aware UTC datetime."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def cert_common_name(cert_pem: bytes) -> str:
    """The subject's common name: for a device certificate, the device id."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        raise ValueError("certificate subject has no common name")
    value = attributes[0].value
    return value.decode() if isinstance(value, bytes) else value
