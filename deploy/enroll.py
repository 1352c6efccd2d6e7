"""A device's install bundle: everything ``systemd/install.sh`` needs, laid out as it installs it.

``certs/ca.pem``, ``certs/device.pem``, ``certs/device.key`` (absent when the device sent a CSR and
keeps its key), ``trust/signing.pub`` and an ``agent.toml`` whose relative paths name those files.
install.sh copies the files to the same places under /etc/edge-agent and writes the same agent.toml,
so the bundle also runs in place: ``edge-agent run --config BUNDLE/agent.toml``.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509

from deploy.ca import Pki, check_device_id
from deploy.config import ControlPlaneConfig
from edge_core.errors import ControlPlaneError, ErrorCode
from edge_core.fsutil import atomic_write
from edge_core.topics import CLAIM_PREFIX


def agent_toml(device: str, host: str, port: int, with_key: bool) -> str:
    key = (
        'key = "certs/device.key"\n'
        if with_key
        else '# key = "certs/device.key"   (the one your CSR was made with)\n'
    )
    return (
        "# edge-agent configuration, written by `edge-deploy device enroll` (docs/config.md).\n"
        "# Relative paths are relative to this file's directory.\n"
        f'device_id = "{device}"\nstate_dir = "/var/lib/edge-agent"\ntransport = "mqtt"\n\n'
        f'[mqtt]\nhost = "{host}"\nport = {port}\n'
        f'ca = "certs/ca.pem"\ncert = "certs/device.pem"\n{key}\n'
        '[trust]\nkeys = ["trust/signing.pub"]\n'
    )


def _split_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT, f"--broker {text!r} is not HOST:PORT", "e.g. broker.example:8883"
        )
    return host.strip("[]"), int(port)


def enroll(
    cfg: ControlPlaneConfig,
    device: str,
    *,
    csr: Path | None = None,
    out: Path | None = None,
    broker: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    check_device_id(device)
    if device.startswith(CLAIM_PREFIX):
        # a claim CN has provisioning topics in the device ACL: a device named so would share them
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"device id {device!r} starts with {CLAIM_PREFIX!r}, which names claim certificates",
            "choose another id; `edge-deploy pki claim NAME` issues claims",
        )
    ca = Pki.of_home(cfg.home)
    ca.require()
    pub = cfg.signing_key.with_suffix(".pub")
    if not pub.is_file():
        raise ControlPlaneError(
            ErrorCode.FILE_UNREADABLE,
            f"no manifest signing public key at {pub}",
            "run `edge-deploy keys create` (or `edge-deploy pki init`, which creates it)",
        )
    host, port = _split_broker(broker) if broker else (cfg.broker.host, cfg.broker.device_port)
    dest = out or Path(f"{device}-bundle")
    if dest.exists() and not force:
        raise ControlPlaneError(
            ErrorCode.ALREADY_EXISTS, f"{dest} already exists", "pass --force to replace it, or another --out"
        )
    if csr is not None:
        try:
            csr_pem = csr.read_bytes()
        except OSError as exc:
            raise ControlPlaneError(
                ErrorCode.FILE_UNREADABLE, f"cannot read {csr}: {exc.strerror}", "check the path"
            ) from None
        cert, key = ca.sign_csr(device, csr_pem), None
    else:
        cert, key = ca.issue_device(device)
    files: dict[str, tuple[bytes, int]] = {
        "certs/ca.pem": (ca.ca.read_bytes(), 0o644),
        "certs/device.pem": (cert, 0o644),
        "trust/signing.pub": (pub.read_bytes(), 0o644),
        "agent.toml": (agent_toml(device, host, port, key is not None).encode(), 0o644),
    }
    if key is not None:
        files["certs/device.key"] = (key, 0o600)
    if dest.name.endswith((".tar", ".tar.gz", ".tgz")):
        _write_tar(dest, files)
        where = f"{device}-bundle"
        unpack = f"mkdir {where} && tar -xf {dest.name} -C {where} && "
    else:
        _write_dir(dest, files)
        where, unpack = str(dest), ""
    q = shlex.quote
    install = (
        f"{unpack}sudo systemd/install.sh --device-id {q(device)} --broker {q(host)}:{port} "
        f"--ca {q(where)}/certs/ca.pem --cert {q(where)}/certs/device.pem "
        f"--key {q(where + '/certs/device.key') if key is not None else 'DEVICE.key'} "
        f"--trust-key {q(where)}/trust/signing.pub"
    )
    return {
        "device": device,
        "bundle": str(dest),
        "files": sorted(files),
        "serial": f"{x509.load_pem_x509_certificate(cert).serial_number:x}",
        "install": install,
    }


def _write_dir(dest: Path, files: dict[str, tuple[bytes, int]]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o700)  # it holds a private key until it is installed
    for rel, (data, mode) in files.items():
        (dest / rel).parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(dest / rel, data, mode=mode)


def _write_tar(dest: Path, files: dict[str, tuple[bytes, int]]) -> None:
    gz = dest.name.endswith(("gz", ".tgz"))
    with (
        tempfile.NamedTemporaryFile(dir=dest.parent or ".", delete=False) as tmp,
        tarfile.open(fileobj=tmp, mode="w:gz") if gz else tarfile.open(fileobj=tmp, mode="w") as tar,
    ):
        for rel, (data, fmode) in sorted(files.items()):
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), fmode
            tar.addfile(info, io.BytesIO(data))
    Path(tmp.name).chmod(0o600)
    Path(tmp.name).replace(dest)
