"""The control plane's certificate authority on disk: ``<home>/pki``.

:mod:`deploy.pki` makes certificates; this module keeps them. It owns one layout, so the commands
that create (``pki init``), use (``device enroll``, ``broker config``) and withdraw (``device
revoke``) identities agree on where everything is:

* ``ca.pem`` / ``ca.key``: the CA that signs the broker, the operator and every device;
* ``operator.pem`` / ``.key``: the control plane's own MQTT identity (CN ``operator``);
* ``broker.pem`` / ``.key``: the broker's server certificate, its SANs the ``--broker-host`` names;
* ``issued/<device>-<serial>.pem``: every device certificate issued, so that a revocation can name
  its serial numbers (the device's key is never kept here: it leaves in the install bundle only);
* ``revoked.json`` and ``crl.pem``: the revoked serials and the CRL the broker reads (``crlfile``).

The directory is 0700 and keys 0600: whoever reads ``ca.key`` can mint any device or the operator.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from deploy import pki
from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.fsutil import atomic_write
from edge_core.topics import CLAIM_PREFIX

OPERATOR_CN = "operator"
#: A device id is a certificate CN, an MQTT username in ACL patterns and a file name here.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: An expired CRL makes OpenSSL refuse *every* client certificate, so the whole fleet would be locked
#: out on the day it lapses; a long nextUpdate trades freshness (every revoke re-signs it anyway)
#: for never having that outage.
CRL_VALIDITY = timedelta(days=3650)


def check_device_id(device: str) -> str:
    if not DEVICE_ID_RE.fullmatch(device):
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"device id {device!r} is not valid",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return device


@dataclass(frozen=True)
class Pki:
    """The files of one control plane's PKI (they need not exist yet)."""

    root: Path

    @classmethod
    def of_home(cls, home: Path) -> Pki:
        return cls(home.absolute() / "pki")

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def operator(self) -> Path:
        return self.root / "operator.pem"

    @property
    def operator_key(self) -> Path:
        return self.root / "operator.key"

    @property
    def broker(self) -> Path:
        return self.root / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def revoked(self) -> Path:
        return self.root / "revoked.json"

    @property
    def issued(self) -> Path:
        return self.root / "issued"

    def exists(self) -> bool:
        return self.ca.is_file() and self.ca_key.is_file()

    def require(self) -> None:
        if not self.exists():
            raise ControlPlaneError(
                ErrorCode.PKI_MISSING,
                f"no certificate authority in {self.root}",
                "run `edge-deploy pki init --broker-host HOST` first (or pass the right --home)",
            )

    # -- creation ----------------------------------------------------------------------------------

    def init(self, broker_hosts: list[str], *, force: bool = False) -> dict[str, Any]:
        """Create the CA, the operator identity, the broker's certificate and an empty CRL."""
        if self.exists() and not force:
            raise ControlPlaneError(
                ErrorCode.ALREADY_EXISTS,
                f"a certificate authority already exists in {self.root}",
                "keep it (every enrolled device trusts it), or pass --force to replace it and "
                "re-enroll every device",
            )
        if not broker_hosts:
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT,
                "the broker's certificate needs at least one host name or address",
                "pass --broker-host with the name devices dial (repeatable)",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        ca_cert, ca_key = pki.create_ca(f"edge-ml fleet CA ({self.root.parent.name})")
        pki.write_pem(self.ca_key, ca_key, private=True)
        pki.write_pem(self.ca, ca_cert, private=False)
        op_cert, op_key = pki.issue_cert(ca_cert, ca_key, OPERATOR_CN)
        pki.write_pem(self.operator_key, op_key, private=True)
        pki.write_pem(self.operator, op_cert, private=False)
        try:
            br_cert, br_key = pki.issue_cert(ca_cert, ca_key, broker_hosts[0], server=True, sans=broker_hosts)
        except ValueError as exc:
            raise ControlPlaneError(ErrorCode.INVALID_ARGUMENT, str(exc), "fix --broker-host") from None
        pki.write_pem(self.broker_key, br_key, private=True)
        pki.write_pem(self.broker, br_cert, private=False)
        # A new CA makes every earlier issue and revocation meaningless.
        for old in self.issued.glob("*.pem") if self.issued.is_dir() else []:
            old.unlink()
        self._write_revoked({})
        return {
            "ca": str(self.ca),
            "operator_cert": str(self.operator),
            "broker_cert": str(self.broker),
            "broker_hosts": broker_hosts,
            "crl": str(self.crl),
        }

    def _issuer(self) -> tuple[bytes, bytes]:
        self.require()
        return self.ca.read_bytes(), self.ca_key.read_bytes()

    def issue_device(self, device: str) -> tuple[bytes, bytes]:
        """A new key and certificate for ``device``; returns ``(cert_pem, key_pem)``."""
        ca_cert, ca_key = self._issuer()
        cert, key = pki.issue_cert(ca_cert, ca_key, check_device_id(device))
        self._record(device, cert)
        return cert, key

    def sign_csr(self, device: str, csr_pem: bytes) -> bytes:
        """Sign a device's CSR (its key never leaves the device); the CN must be ``device``."""
        check_device_id(device)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise ControlPlaneError(
                ErrorCode.CSR_INVALID, f"not a PEM certificate signing request: {exc}", _CSR_HINT
            ) from None
        if not csr.is_signature_valid:
            raise ControlPlaneError(
                ErrorCode.CSR_INVALID, "the CSR's self-signature does not verify", _CSR_HINT
            )
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else ""
        if cn != device:
            raise ControlPlaneError(
                ErrorCode.CSR_INVALID,
                f"the CSR's CN is {cn!r}, not the device id {device!r}: the broker knows a device by its CN",
                _CSR_HINT,
            )
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ControlPlaneError(ErrorCode.CSR_INVALID, "the CSR's key is neither EC nor RSA", _CSR_HINT)
        cert = _sign_public_key(*self._issuer(), device, public_key)
        self._record(device, cert)
        return cert

    def issue_claim(self, name: str) -> tuple[str, bytes, bytes]:
        """A claim certificate for fleet provisioning: CN ``claim-NAME``, from the device CA.

        It is recorded under ``issued/`` like a device's, so ``device revoke claim-NAME`` revokes it.
        Returns ``(cn, cert_pem, key_pem)``; the key is shared by every device built with it.
        """
        cn = check_device_id(CLAIM_PREFIX + name)
        ca_cert, ca_key = self._issuer()
        cert, key = pki.issue_cert(ca_cert, ca_key, cn)
        self._record(cn, cert)
        return cn, cert, key

    def issued_public_keys(self, device: str) -> list[bytes]:
        """The DER public keys of every certificate issued to ``device`` (the provisioning handler
        re-signs only for a key it has signed before, so that a lost answer can be asked again)."""
        keys = []
        for p in self.issued.glob(f"{device}-*.pem") if self.issued.is_dir() else []:
            cert = x509.load_pem_x509_certificate(p.read_bytes())
            if pki.cert_common_name(p.read_bytes()) == device:
                keys.append(
                    cert.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                )
        return keys

    def revoked_devices(self) -> set[str]:
        return {str(v["device"]) for v in self._read_revoked().values()}

    def _record(self, device: str, cert_pem: bytes) -> None:
        self.issued.mkdir(mode=0o700, exist_ok=True)
        serial = x509.load_pem_x509_certificate(cert_pem).serial_number
        pki.write_pem(self.issued / f"{device}-{serial:x}.pem", cert_pem, private=False)

    # -- revocation --------------------------------------------------------------------------------

    def _read_revoked(self) -> dict[str, dict[str, Any]]:
        if not self.revoked.is_file():
            return {}
        data: dict[str, dict[str, Any]] = json.loads(self.revoked.read_text())
        return data

    def _write_revoked(self, revoked: dict[str, dict[str, Any]]) -> None:
        atomic_write(
            self.revoked, (json.dumps(revoked, indent=2, sort_keys=True) + "\n").encode(), mode=0o644
        )
        ca_cert, ca_key = self._issuer()
        pki.write_pem(self.crl, make_crl(ca_cert, ca_key, [int(s, 16) for s in revoked]), private=False)

    def revoke(self, device: str) -> list[str]:
        """Revoke every certificate issued to ``device``; returns their serials (hex)."""
        check_device_id(device)
        self.require()
        serials = sorted(
            p.stem.removeprefix(f"{device}-")
            for p in (self.issued.glob(f"{device}-*.pem") if self.issued.is_dir() else [])
            if pki.cert_common_name(p.read_bytes()) == device
        )
        if not serials:
            raise ControlPlaneError(
                ErrorCode.DEVICE_NOT_FOUND,
                f"no certificate was issued to {device!r} by this control plane",
                "check the id; `ls HOME/pki/issued` lists the certificates issued",
            )
        revoked = self._read_revoked()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for s in serials:
            revoked.setdefault(s, {"device": device, "revoked_at": now})
        self._write_revoked(revoked)
        return serials


_CSR_HINT = (
    "on the device: openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
    "-keyout device.key -subj /CN=DEVICE -out device.csr"
)


def _sign_public_key(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    device: str,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
) -> bytes:
    """Issue a client certificate for a public key we did not generate, with the extensions
    :func:`deploy.pki.issue_cert` gives its own: re-issuing that template here keeps a CSR-signed
    certificate indistinguishable, for the broker and for ``edge-agent doctor``, from one we keyed."""
    template_pem, _ = pki.issue_cert(ca_cert_pem, ca_key_pem, device)
    template = x509.load_pem_x509_certificate(template_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(template.issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    for ext in template.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(public_key)
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_crl(ca_cert_pem: bytes, ca_key_pem: bytes, serials: list[int]) -> bytes:
    """A CRL signed by the CA listing ``serials`` (empty is valid: the broker needs a file)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - pki.CLOCK_SKEW)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial in sorted(serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
