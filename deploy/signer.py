"""Signing keys and signed manifests for the control plane.

Private keys are PKCS#8 PEM files written with mode 0600; public keys are SubjectPublicKeyInfo PEM,
the form the agent's ``trust.keys`` setting takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_core import manifest as mf
from edge_core.fsutil import atomic_write


def write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o600)


def create_keypair(out_dir: Path, name: str = "signing") -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub``; return their paths and the key id.
    Refuses to overwrite an existing private key: losing it would orphan every device that trusts it."""
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path, mf.key_id(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Validate against the same JSON Schema the agent uses, then sign. A control plane that signed
    what every agent would refuse would only move the error to the fleet."""
    if (problem := mf.schema_error(manifest)) is not None:
        raise ValueError(f"manifest does not match the schema: {problem}")
    return mf.sign(manifest, key)
