"""Inspection of the device's X.509 certificates: pure functions over PEM bytes and a clock.

``edge-agent doctor`` reports with them what is wrong with a device's certificate before the broker
refuses it with a bare TLS alert, and the daemon can use them to log an expired certificate at start.
Every problem carries a stable ``code`` (docs/cli.md), a message that says what is wrong and a hint
that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "EXPIRY_WARNING",
    "CertInfo",
    "CertProblem",
    "check_ca",
    "check_device_cert",
    "describe_ok",
    "inspect_cert",
    "load_certs",
]

#: A device certificate that expires within this is reported (warn) while there is time to renew it.
EXPIRY_WARNING = timedelta(days=30)
#: Longest chain walked from the device certificate to the CA; this project issues none deeper than 1.
_MAX_CHAIN = 8

Severity = Literal["warn", "fail"]


@dataclass(frozen=True)
class CertInfo:
    subject: str  # RFC 4514
    subject_cn: str | None
    issuer: str
    issuer_cn: str | None
    serial: int
    not_before: datetime  # aware, UTC
    not_after: datetime
    fingerprint_sha256: str
    is_ca: bool
    sans: tuple[str, ...]
    #: "valid", "expired" or "not_yet_valid", at the ``now`` given to :func:`inspect_cert`.
    validity: str
    #: Whole days from ``now`` to not_after (negative once expired).
    days_left: int


@dataclass(frozen=True)
class CertProblem:
    severity: Severity
    code: str
    message: str
    hint: str


def load_certs(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; ValueError when there is none or one is damaged."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError("no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    return x509.load_pem_x509_certificates(pem)


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _info(cert: x509.Certificate, now: datetime) -> CertInfo:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(v) for v in san_ext.get_values_for_type(x509.DNSName)) + tuple(
            str(v) for v in san_ext.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        sans = ()
    validity = "not_yet_valid" if now < nb else "expired" if now > na else "valid"
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        subject_cn=_cn(cert.subject),
        issuer=cert.issuer.rfc4514_string(),
        issuer_cn=_cn(cert.issuer),
        serial=cert.serial_number,
        not_before=nb,
        not_after=na,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        is_ca=is_ca,
        sans=sans,
        validity=validity,
        days_left=(na - now).days,
    )


def _utc(now: datetime) -> datetime:
    # A naive clock would be compared with UTC validity bounds as if it were UTC: refuse the guess.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    return now.astimezone(UTC)


def inspect_cert(pem: bytes, now: datetime) -> CertInfo:
    """The first certificate of a PEM file (the leaf, in a chain file), seen at ``now``."""
    return _info(load_certs(pem)[0], _utc(now))


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _ago(delta: timedelta) -> str:
    secs = abs(delta.total_seconds())
    days, hours = int(secs // 86400), int(secs // 3600)
    if days:
        return f"{days} day{'s' if days != 1 else ''}"
    return f"{hours} hour{'s' if hours != 1 else ''}" if hours else "minutes"


def _name_of(info: CertInfo) -> str:
    return f"CN={info.subject_cn}" if info.subject_cn is not None else info.subject or "(empty subject)"


def _validity_problems(
    info: CertInfo, now: datetime, what: str, warn_within: timedelta | None, renew: str
) -> list[CertProblem]:
    if info.validity == "not_yet_valid":
        return [
            CertProblem(
                "fail",
                "cert_not_yet_valid",
                f"{what} {_name_of(info)} is not valid before {_day(info.not_before)} "
                f"(in {_ago(info.not_before - now)}; the device's clock says {_day(now)})",
                "check the device's clock (NTP, or an RTC battery), or issue a certificate valid from now",
            )
        ]
    if info.validity == "expired":
        return [
            CertProblem(
                "fail",
                "cert_expired",
                f"{what} {_name_of(info)} expired on {_day(info.not_after)} "
                f"({_ago(now - info.not_after)} ago)",
                renew,
            )
        ]
    if warn_within is not None and info.not_after - now <= warn_within:
        return [
            CertProblem(
                "warn",
                "cert_expiring",
                f"{what} {_name_of(info)} expires on {_day(info.not_after)} "
                f"(in {_ago(info.not_after - now)})",
                renew,
            )
        ]
    return []


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _chains_to(leaf: x509.Certificate, extra: list[x509.Certificate], roots: list[x509.Certificate]) -> bool:
    """Whether signatures lead from ``leaf`` through ``extra`` (intermediates shipped with it) to one of
    ``roots``. Signature and issuer name only: validity is reported on its own, and the broker applies
    its own policy on top."""
    root_fps = {r.fingerprint(hashes.SHA256()) for r in roots}
    current, pool = leaf, list(extra)
    for _ in range(_MAX_CHAIN):
        if current.fingerprint(hashes.SHA256()) in root_fps:
            return True
        if any(_issued_by(current, r) for r in roots):
            return True
        nxt = next((c for c in pool if _issued_by(current, c)), None)
        if nxt is None:
            return False
        pool.remove(nxt)
        current = nxt
    return False


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_ca(
    ca_pem: bytes, now: datetime, what: str = "CA certificate"
) -> tuple[list[x509.Certificate], list[CertProblem]]:
    """The CA file's certificates, and what is wrong with them (unparseable, expired, not yet valid)."""
    now = _utc(now)
    try:
        cas = load_certs(ca_pem)
    except ValueError as exc:
        return [], [
            CertProblem(
                "fail",
                "ca_invalid",
                f"{what} is not a PEM X.509 certificate: {exc}",
                "point it at the CA certificate in PEM (-----BEGIN CERTIFICATE-----)",
            )
        ]
    problems: list[CertProblem] = []
    for ca in cas:
        info = _info(ca, now)
        for p in _validity_problems(info, now, what, None, "install the CA's renewed certificate"):
            problems.append(CertProblem(p.severity, "ca_" + p.code.removeprefix("cert_"), p.message, p.hint))
    return cas, problems


def check_device_cert(
    cert_pem: bytes,
    key_pem: bytes | None,
    ca_pem: bytes | None,
    device_id: str,
    now: datetime,
    *,
    warn_within: timedelta = EXPIRY_WARNING,
    what: str = "device cert",
    key_what: str = "the key",
    ca_what: str = "the CA",
) -> list[CertProblem]:
    """What is wrong with a device's client certificate, ``[]`` when nothing is.

    Checks that it parses, is valid at ``now`` (fail when expired or not yet valid, warn within
    ``warn_within`` of its expiry), that ``key_pem`` is its private key, that its CN is ``device_id``
    (the broker's ACL knows the device by its CN; warn), that it is meant for TLS clients, and that
    it chains to ``ca_pem`` by signature (fail). ``key_pem`` or ``ca_pem`` None: that check is skipped.
    ``what``, ``key_what`` and ``ca_what`` name the files in the messages (e.g. the config fields).
    """
    now = _utc(now)
    problems: list[CertProblem] = []
    try:
        chain = load_certs(cert_pem)
    except ValueError as exc:
        return [
            CertProblem(
                "fail",
                "cert_invalid",
                f"{what} is not a PEM X.509 certificate: {exc}",
                "point it at the device's certificate in PEM (-----BEGIN CERTIFICATE-----)",
            )
        ]
    leaf = chain[0]
    info = _info(leaf, now)
    renew = (
        f"renew the device certificate: issue a new one for CN={device_id or info.subject_cn} from the "
        "fleet's CA, install it in place of the old one and restart the agent"
    )
    problems += _validity_problems(info, now, what, warn_within, renew)

    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # TypeError: the key is encrypted; the agent starts unattended and cannot ask for a passphrase
            problems.append(
                CertProblem(
                    "fail",
                    "key_invalid",
                    f"{key_what} is not an unencrypted PEM private key: {exc}",
                    "install the certificate's private key in PEM, without a passphrase, readable only by "
                    "the agent (mode 0600)",
                )
            )
        else:
            if _spki(key.public_key()) != _spki(leaf.public_key()):
                problems.append(
                    CertProblem(
                        "fail",
                        "key_mismatch",
                        f"{key_what} does not belong to {what} {_name_of(info)}: their public keys differ",
                        "install the key the certificate was issued for, or issue a certificate for this key",
                    )
                )

    if device_id and info.subject_cn != device_id:
        problems.append(
            CertProblem(
                "warn",
                "cert_cn_mismatch",
                f"{what} {_name_of(info)} is not for device_id {device_id!r}: the broker knows the device "
                "by its certificate's CN, so its ACL will refuse the device's topics",
                f"issue a certificate with CN={device_id}, or set device_id to the certificate's CN",
            )
        )

    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        problems.append(
            CertProblem(
                "warn",
                "cert_not_client",
                f"{what} {_name_of(info)} is not for TLS clients (its extended key usage lacks clientAuth)",
                "issue a client certificate (edge-deploy and deploy/pki.py issue_cert do by default)",
            )
        )

    if ca_pem is not None:
        roots, ca_problems = check_ca(ca_pem, now, ca_what)
        problems += ca_problems
        if roots and not _chains_to(leaf, chain[1:], roots):
            ca_names = ", ".join(_name_of(_info(r, now)) for r in roots)
            problems.append(
                CertProblem(
                    "fail",
                    "cert_untrusted",
                    f"{what} {_name_of(info)} was not issued by {ca_what} ({ca_names}): "
                    f"it was issued by {info.issuer or '(empty issuer)'}",
                    "issue the device a certificate from the CA the broker trusts, or set the CA file to "
                    "the CA that issued it",
                )
            )
    return problems


def describe_ok(
    cert_pem: bytes, now: datetime, *, what: str = "device cert", key_checked: bool, ca_what: str | None
) -> str:
    """A one-line summary of a certificate without problems, for ``edge-agent doctor``."""
    info = inspect_cert(cert_pem, now)
    parts = [
        f"{what} {_name_of(info)} valid until {info.not_after.strftime('%Y-%m-%d')} ({info.days_left} days)"
    ]
    if key_checked:
        parts.append("key matches")
    if ca_what:
        parts.append(f"issued by {ca_what}")
    return "; ".join(parts)
