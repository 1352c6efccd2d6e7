"""The ``certificates`` check: the device certificate, its key and the CA file of the configured
transport parse, match each other and the device id, and are within their validity (the details are
agent/ops/certs.py's)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from agent.config import AgentConfig
from agent.ops import certs
from agent.ops import status as status_mod
from agent.ops.doctor.report import Result


def _read(field: str, path: Path) -> tuple[bytes | None, Result | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return None, Result(
            "certificates",
            "fail",
            f"cannot read {field} {path} as {status_mod.current_user()}: {exc.strerror}",
            status_mod.run_as_hint(path, "doctor"),
        )


def check_certificates(cfg: AgentConfig, now: datetime) -> list[Result]:
    if cfg.transport == "iothub":
        section, sec = "iothub", cfg.iothub
        cert_path, key_path, ca_path = sec.cert, sec.key, sec.ca
        # iothub.ca is the hub's (or gateway's) server CA: device certificates are not issued by it
        # (IoT Hub takes CA-signed and self-signed thumbprint certificates alike), so no chain check.
        chain_to_ca = False
    else:
        section, m = "mqtt", cfg.mqtt
        cert_path, key_path, ca_path = m.cert, m.key, m.ca
        # This project's PKI (deploy/pki.py) has one CA that signs the broker's and the devices' certs.
        chain_to_ca = True
    if section == "mqtt" and ca_path is None:
        return [
            Result(
                "certificates",
                "warn",
                "mqtt sets no ca, cert and key: the control channel is neither encrypted nor authenticated",
                "set mqtt.ca, mqtt.cert and mqtt.key (mutual TLS); plain MQTT is for a local test broker",
            )
        ]
    files: dict[str, bytes] = {}
    for name, p in (("cert", cert_path), ("key", key_path), ("ca", ca_path)):
        if p is None:
            continue
        data, err = _read(f"{section}.{name}", p)
        if err is not None:
            return [err]
        assert data is not None
        files[name] = data
    results: list[Result] = []
    if "cert" not in files:
        msg = f"{section} authenticates with a connection string (SAS): no device certificate"
        if "ca" in files:
            _, problems = certs.check_ca(files["ca"], now, f"{section}.ca")
            results += [Result("certificates", p.severity, p.message, p.hint) for p in problems]
            msg += f"; {section}.ca parses"
        return results or [Result("certificates", "ok", msg)]
    problems = certs.check_device_cert(
        files["cert"],
        files.get("key"),
        files.get("ca") if chain_to_ca else None,
        cfg.device_id,
        now,
        key_what=f"{section}.key",
        ca_what=f"{section}.ca",
    )
    if not chain_to_ca and "ca" in files:
        problems += certs.check_ca(files["ca"], now, f"{section}.ca")[1]
    if problems:
        return [Result("certificates", p.severity, p.message, p.hint) for p in problems]
    return [
        Result(
            "certificates",
            "ok",
            certs.describe_ok(
                files["cert"],
                now,
                key_checked="key" in files,
                ca_what=f"{section}.ca" if chain_to_ca and "ca" in files else None,
            ),
        )
    ]
