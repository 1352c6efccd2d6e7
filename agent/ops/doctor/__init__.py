"""``edge-agent doctor``: checks of a device's setup, each with a verdict, a message and a hint.

The checks look at what the agent needs to work, in the order it needs it: its config, its
certificates and trusted keys, the control channel (DNS, TCP, TLS with the client certificate), the
disk, its SQLite files, onnxruntime's execution providers and the scoring API's port. None of them
changes anything the agent owns: databases are opened read-only, the TLS probe sends no MQTT packet
(so it cannot take over the running agent's session), and the port check binds only while no agent
runs. Verdicts and check names are listed in docs/cli.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agent import config as config_mod
from agent.config import AgentConfig, RuntimeConfig
from agent.ops import certs
from agent.ops import status as status_mod
from edge_core.errors import ConfigError

Verdict = Literal["ok", "warn", "fail"]

#: The port the IoT Hub device SDK dials (MQTT over TLS); it cannot be configured.
IOTHUB_PORT = 8883
DEFAULT_TIMEOUT_S = 5.0
#: After a TLS 1.3 handshake the server checks the client certificate and, when it refuses it, sends
#: an alert; the client's handshake has already completed by then, so wait this long for the alert.
_TLS13_ALERT_WAIT_S = 1.0
#: OpenSSL's names for the alerts a server sends when it refuses the client's certificate.
_CLIENT_CERT_REFUSED = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)

CHECKS = ("config", "certificates", "trust-keys", "channel", "disk", "state-db", "onnxruntime", "api-port")


@dataclass(frozen=True)
class Result:
    check: str
    verdict: Verdict
    message: str
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "verdict": self.verdict,
            "message": self.message,
            "hint": self.hint or None,
        }


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.verdict == "fail" for r in results) else 0


def format_human(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.verdict:<6}{r.check:<15}{r.message}")
        if r.hint and r.verdict != "ok":
            lines.append(f"{'':<21}hint: {r.hint}")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


# --- config ------------------------------------------------------------------------------------


def _env_name(field: str) -> str:
    base = field.split("[", 1)[0]
    return config_mod.ENV_PREFIX + base.upper().replace(".", "__")


def check_config(path: Path | None, env: Mapping[str, str]) -> tuple[AgentConfig | None, Result]:
    try:
        cfg = config_mod.load(path, env=env)
    except ConfigError as exc:
        if exc.field == "--config":
            hint = "give --config the agent's TOML config file and fix its TOML syntax"
        else:
            var = _env_name(exc.field)
            where = f"in {path}" if path is not None else "in the config"
            hint = f"fix {exc.field} {where}" + (
                f"; it is also set in the environment ({var})" if var in env else f" (or {var})"
            )
            if path is None:
                hint += (
                    "; give --config the agent's config file (the service's is /etc/edge-agent/agent.toml)"
                )
        return None, Result("config", "fail", exc.message, hint)
    src = str(path) if path is not None else "defaults and environment"
    return cfg, Result(
        "config",
        "ok",
        f"{src} loads and validates (device_id {cfg.device_id}, transport {cfg.transport}, "
        f"state_dir {cfg.state_dir})",
    )


# --- certificates and trusted keys ------------------------------------------------------------


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


def check_trust_keys(cfg: AgentConfig) -> list[Result]:
    from edge_core import manifest as mf

    ids: list[str] = []
    results: list[Result] = []
    for i, path in enumerate(cfg.trust.keys):
        field = f"trust.keys[{i}]"
        try:
            ids.append(mf.key_id(mf.load_public_key(path.read_bytes()))[:16])
        except OSError as exc:
            results.append(
                Result(
                    "trust-keys",
                    "fail",
                    f"cannot read {field} {path} as {status_mod.current_user()}: {exc.strerror}",
                    status_mod.run_as_hint(path, "doctor"),
                )
            )
        except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
            results.append(
                Result(
                    "trust-keys",
                    "fail",
                    f"{field} {path} is not an Ed25519 public key in PEM: {exc}",
                    "use the control plane's signing.pub (`edge-deploy keys create` writes it); the agent "
                    "refuses to start with this file",
                )
            )
    if results:
        return results
    return [Result("trust-keys", "ok", f"{len(ids)} Ed25519 key(s) trusted: keyid {', '.join(ids)}")]


# --- the control channel ----------------------------------------------------------------------


def _resolve(host: str, port: int, timeout: float) -> list[Any]:
    """getaddrinfo with a deadline: it has none of its own, and a dead resolver blocks for minutes."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            box["error"] = exc

    t = threading.Thread(target=work, name="doctor-dns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    infos: list[Any] = box["infos"]
    return infos


def _connect(host: str, port: int, deadline: float, timeout: float, section: str) -> socket.socket | Result:
    where = f"{host}:{port}"
    fix_host = (
        "mqtt.host"
        if section == "mqtt"
        else "iothub.hostname (or HostName= in the connection string, or iothub.gateway_hostname)"
    )
    try:
        infos = _resolve(host, port, max(deadline - time.monotonic(), 0.01))
    except TimeoutError:
        return Result(
            "channel",
            "fail",
            f"DNS: looking up {host} did not answer within {timeout:g} s",
            "check the device's DNS resolver (/etc/resolv.conf, systemd-resolved) and its network",
        )
    except OSError as exc:  # socket.gaierror, mostly
        return Result(
            "channel",
            "fail",
            f"DNS: cannot resolve {host}: {exc.strerror or exc}",
            f"check {fix_host} and the device's DNS resolver",
        )
    last: Result | None = None
    for family, kind, proto, _name, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            sock.connect(addr)
            return sock
        except ConnectionRefusedError:
            last = Result(
                "channel",
                "fail",
                f"{where}: connection refused (nothing listens on that port, or a firewall rejects it)",
                "start the broker, or fix mqtt.host and mqtt.port"
                if section == "mqtt"
                else f"check {fix_host}: nothing accepts connections on port {port} there",
            )
        except TimeoutError:
            last = Result(
                "channel",
                "fail",
                f"{where}: no answer within {timeout:g} s (the host is down, or a firewall drops packets)",
                f"check the network path to {where} (routing, firewall), or try a longer --timeout",
            )
        except OSError as exc:
            last = Result(
                "channel",
                "fail",
                f"{where}: cannot connect: {exc.strerror or exc}",
                "check the device's network (interface, route, firewall)",
            )
        sock.close()
        if time.monotonic() >= deadline:
            break
    assert last is not None
    return last


def _tls_context(
    ca: Path | None, cert: Path | None, key: Path | None, section: str
) -> ssl.SSLContext | Result:
    # The same settings the agent's paho client uses (agent/channel/mqtt.py): PROTOCOL_TLS_CLIENT
    # verifies the server's certificate and host name against the configured CA only.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=str(ca))
        else:
            ctx.load_default_certs()
    except (ssl.SSLError, OSError) as exc:
        return Result(
            "channel", "fail", f"cannot load {section}.ca {ca}: {exc}", "see the certificates check"
        )
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            return Result(
                "channel",
                "fail",
                f"cannot present the client certificate ({section}.cert with {section}.key): {exc}",
                "see the certificates check: the key must be the certificate's, unencrypted PEM",
            )
    return ctx


def _refused_cert(exc: ssl.SSLError, where: str, section: str) -> Result:
    return Result(
        "channel",
        "fail",
        f"{where}: the server rejected the client certificate (TLS alert {exc.reason})",
        f"the server does not accept {section}.cert: it is expired, revoked or from a CA the server does not "
        "trust; issue the device a certificate from the CA the server trusts for clients",
    )


def probe_channel(
    host: str,
    port: int,
    *,
    timeout: float,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    tls: bool,
    section: str = "mqtt",
) -> Result:
    """TCP connect and, with ``tls``, a TLS handshake presenting the client certificate. Sends nothing
    above TLS, so the server never sees a client that could take over the running agent's session."""
    where = f"{host}:{port}"
    start = time.monotonic()
    deadline = start + timeout
    ctx: ssl.SSLContext | None = None
    if tls:
        made = _tls_context(ca, cert, key, section)
        if isinstance(made, Result):
            return made
        ctx = made
    conn = _connect(host, port, deadline, timeout, section)
    if isinstance(conn, Result):
        return conn
    if ctx is None:
        conn.close()
        return Result("channel", "ok", f"{section} {where}: TCP connection accepted (plain MQTT, no TLS)")
    try:
        with ctx.wrap_socket(conn, server_hostname=host) as tls_sock:
            version = tls_sock.version() or "TLS"
            elapsed = time.monotonic() - start
            if version == "TLSv1.3" and cert is not None:
                tls_sock.settimeout(max(min(_TLS13_ALERT_WAIT_S, deadline - time.monotonic()), 0.05))
                try:
                    if tls_sock.recv(1) == b"":
                        return Result(
                            "channel",
                            "fail",
                            f"{where}: the server closed the connection right after the TLS handshake",
                            f"the server probably refused {section}.cert; see its log for why",
                        )
                except TimeoutError:
                    pass  # silent: it accepted the certificate and waits for the client's first packet
                except ssl.SSLError as exc:
                    if exc.reason in _CLIENT_CERT_REFUSED:
                        return _refused_cert(exc, where, section)
                    raise
    except ssl.SSLCertVerificationError as exc:
        return Result(
            "channel",
            "fail",
            f"{where}: the server's certificate is not trusted: {exc.verify_message}",
            f"set {section}.ca to the CA that signed the server's certificate, and connect by a name that "
            "is in the certificate's subject alternative names",
        )
    except ssl.SSLError as exc:
        if exc.reason in _CLIENT_CERT_REFUSED:
            return _refused_cert(exc, where, section)
        if exc.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and cert is None:
            return Result(
                "channel",
                "fail",
                f"{where}: the TLS handshake failed: the server requires a client certificate",
                f"set {section}.cert and {section}.key",
            )
        return Result(
            "channel",
            "fail",
            f"{where}: the TLS handshake failed: {exc.reason or exc}",
            f"check that {where} is the server's TLS port (MQTT over TLS: 8883) and that it speaks TLS 1.2+",
        )
    except TimeoutError:
        return Result(
            "channel",
            "fail",
            f"{where}: the TLS handshake did not finish within {timeout:g} s",
            f"check that {where} is a TLS port (MQTT over TLS: 8883), not plain MQTT (1883)",
        )
    except OSError as exc:
        return Result(
            "channel",
            "fail",
            f"{where}: the connection broke during the TLS handshake: {exc.strerror or exc}",
            f"the server may refuse {section}.cert or this client's TLS version; see the server's log",
        )
    authn = "client certificate accepted" if cert is not None else "no client certificate"
    trust = f"{section}.ca" if ca is not None else "the system's CAs"
    return Result(
        "channel",
        "ok",
        f"{section} {where}: {version} handshake in {elapsed * 1000:.0f} ms, server certificate verified by "
        f"{trust}, {authn}",
    )


def check_channel(cfg: AgentConfig, timeout: float, *, iothub_port: int = IOTHUB_PORT) -> list[Result]:
    if cfg.transport == "iothub":
        hub = cfg.iothub
        host = hub.endpoint_host()
        return [
            probe_channel(
                host,
                iothub_port,
                timeout=timeout,
                ca=hub.ca,
                cert=hub.cert,
                key=hub.key,
                tls=True,
                section="iothub",
            )
        ]
    m = cfg.mqtt
    return [
        probe_channel(m.host, m.port, timeout=timeout, ca=m.ca, cert=m.cert, key=m.key, tls=m.ca is not None)
    ]


# --- disk ----------------------------------------------------------------------------------------


def disk_verdict(free_bytes: int, margin_bytes: int) -> Verdict:
    """fail below download.disk_margin (no deployment can pass the agent's space check), warn below
    twice the margin (only small bundles can), ok above."""
    if free_bytes < margin_bytes:
        return "fail"
    if free_bytes < 2 * margin_bytes:
        return "warn"
    return "ok"


def _existing(path: Path) -> Path:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if p.is_dir():
                return p
    return Path("/")


def check_disk(cfg: AgentConfig) -> list[Result]:
    sd = cfg.state_dir
    results: list[Result] = []
    try:
        is_dir = sd.is_dir()
    except OSError:
        is_dir = True  # a parent is not searchable: the write test below says so, and as whom to run
    if not is_dir and os.path.lexists(sd):
        results.append(Result("disk", "fail", f"state_dir {sd} is not a directory", "fix state_dir"))
    elif not is_dir:
        results.append(
            Result(
                "disk",
                "warn",
                f"state_dir {sd} does not exist: the agent creates it when it first starts",
                "start the agent once, or check state_dir in the config",
            )
        )
    else:
        try:
            fd, tmp = tempfile.mkstemp(dir=sd, prefix=".doctor-")
        except OSError as exc:
            hint = (
                "the file system is mounted read-only: remount it read-write"
                if exc.errno == errno.EROFS
                else status_mod.run_as_hint(sd, "doctor")
            )
            results.append(
                Result(
                    "disk",
                    "fail",
                    f"state_dir {sd} is not writable by {status_mod.current_user()}: {exc.strerror}",
                    hint,
                )
            )
        else:
            os.close(fd)
            os.unlink(tmp)
    where = _existing(sd)
    free = shutil.disk_usage(where).free
    margin = cfg.download.disk_margin
    verdict = disk_verdict(free, margin)
    # the deployer wants room for the bundle and its unpacked copy on top of the margin
    largest = max(free - margin, 0) // 2
    msg = f"{_size(free)} free on {where} (download.disk_margin {_size(margin)})"
    if verdict == "fail":
        results.append(
            Result(
                "disk",
                "fail",
                msg + ": below the margin, every deployment fails with insufficient_disk",
                "free space on that file system, or lower download.disk_margin",
            )
        )
    elif verdict == "warn":
        results.append(
            Result(
                "disk",
                "warn",
                msg + f": below twice the margin, bundles over {_size(largest)} cannot be installed",
                "free space on that file system, or lower download.disk_margin",
            )
        )
    else:
        results.append(Result("disk", "ok", msg + f"; bundles up to {_size(largest)} fit"))
    return results


# --- state databases -----------------------------------------------------------------------------

_DAMAGED_HINT = {
    "agent.db": "stop the agent and restore agent.db from a backup; moving it aside makes the device forget "
    "its deployment history and accept any generation (the active image keeps serving from store/current)",
    "telemetry.db": "restart the agent: it moves a damaged telemetry.db aside (log buffer.quarantined) and "
    "starts an empty one; the records not yet uploaded are lost",
}


def check_state_dbs(cfg: AgentConfig) -> list[Result]:
    results = []
    for name in ("agent.db", "telemetry.db"):
        path = cfg.state_dir / name
        try:
            present = path.exists()
        except OSError:
            present = True  # not reachable: opening it below says so, and as whom to run
        if not present:
            results.append(Result("state-db", "ok", f"{name} does not exist yet (the agent creates it)"))
            continue

        def quick_check(db: sqlite3.Connection) -> tuple[list[str], int]:
            rows = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
            return rows, int(db.execute("PRAGMA user_version").fetchone()[0])

        try:
            rows, version = status_mod.read_db(path, quick_check)
        except Exception as exc:  # sqlite3.Error, or OSError from a vanished file
            if not os.access(path, os.R_OK):
                results.append(
                    Result(
                        "state-db",
                        "fail",
                        f"cannot open {path} read-only as {status_mod.current_user()}: {exc}",
                        status_mod.run_as_hint(path, "doctor"),
                    )
                )
            else:
                results.append(
                    Result(
                        "state-db",
                        "fail",
                        f"{path} is not a readable SQLite database: {exc}",
                        _DAMAGED_HINT[name],
                    )
                )
            continue
        if rows != ["ok"]:
            results.append(
                Result(
                    "state-db",
                    "fail",
                    f"{path}: quick_check found {len(rows)} problem(s), the first: {rows[0]}",
                    _DAMAGED_HINT[name],
                )
            )
            continue
        if name == "telemetry.db":
            from agent.telemetry.buffer import SCHEMA_VERSION

            if version > SCHEMA_VERSION:
                results.append(
                    Result(
                        "state-db",
                        "warn",
                        f"{path}: schema version {version} is newer than this agent's ({SCHEMA_VERSION}): "
                        "a newer agent wrote it, this one will not use it (buffer_unavailable)",
                        "upgrade the agent again, or move the file away (its records are lost to the upload)",
                    )
                )
                continue
        results.append(Result("state-db", "ok", f"{name}: quick_check ok ({_size(path.stat().st_size)})"))
    return results


# --- onnxruntime -------------------------------------------------------------------------------


def check_onnxruntime(cfg: AgentConfig) -> list[Result]:
    try:
        import onnxruntime as ort

        from agent.serving.runtime import CPU, choose_providers

        available = list(ort.get_available_providers())
        version = str(ort.__version__)
    except Exception as exc:  # a broken install raises anything from ImportError to OSError
        return [
            Result(
                "onnxruntime",
                "fail",
                f"onnxruntime cannot be imported: {exc}",
                "reinstall the agent's Python environment (onnxruntime, or the build for the device's "
                "accelerator)",
            )
        ]
    preference = cfg.runtime.execution_providers
    chosen = choose_providers(preference, available)[0]
    msg = f"onnxruntime {version} would use {chosen}; available: {', '.join(available) or 'none'}"
    first = preference[0] if preference else CPU
    # The default list means "whatever accelerator this host has": CPU on a CPU-only host is what
    # was asked for. Only a list the operator wrote himself says an accelerator is expected.
    chose_list = preference != RuntimeConfig().execution_providers
    if chosen == CPU and first != CPU and chose_list:
        return [
            Result(
                "onnxruntime",
                "warn",
                f"onnxruntime {version} would use {chosen}: no accelerator of runtime.execution_providers "
                f"({first} first) is in this build (available: {', '.join(available) or 'none'})",
                "install the accelerator's onnxruntime build and drivers (onnxruntime-gpu, "
                "onnxruntime-openvino, the Vitis AI runtime), or put CPUExecutionProvider first in "
                "runtime.execution_providers",
            )
        ]
    return [Result("onnxruntime", "ok", msg)]


# --- the scoring API's port ----------------------------------------------------------------------


def _port_owner(port: int) -> str:
    import psutil

    try:
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
                except psutil.Error:
                    return f"pid {c.pid}"
    except (psutil.Error, OSError):
        pass
    return "another process"


def check_api_port(cfg: AgentConfig, agent: dict[str, Any]) -> list[Result]:
    api = cfg.api
    if not api.enabled:
        return [Result("api-port", "ok", "the scoring API is disabled (api.enabled = false)")]
    if agent["running"]:
        run = agent["run"] or {}
        if run.get("api"):
            return [
                Result("api-port", "ok", f"the running agent (pid {run.get('pid')}) serves on {run['api']}")
            ]
        return [
            Result(
                "api-port",
                "warn",
                f"the running agent (pid {run.get('pid')}) reports no scoring API address",
                "see the agent's log (api.*); it may still be starting",
            )
        ]
    listen = api.listen
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(str(path))
                except OSError:
                    pass  # a socket file left behind: the agent replaces it
                else:
                    return [
                        Result(
                            "api-port",
                            "warn",
                            f"another process listens on {path}; the agent would take the path over",
                            "stop that process, or set api.listen to another path",
                        )
                    ]
        return [Result("api-port", "ok", f"{listen}: free (no agent running)")]
    host, _, port_s = listen.rpartition(":")
    host, port = host.strip("[]"), int(port_s)
    if port == 0:
        return [Result("api-port", "ok", f"{listen}: the agent picks a free port when it starts")]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # the same options as the agent's bind (agent/serving/api.py): a port in TIME_WAIT is not "taken"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return [
                    Result(
                        "api-port",
                        "fail",
                        f"{listen} is taken by {_port_owner(port)} and no agent is running: the agent could "
                        "not serve",
                        "stop that process, or set api.listen to a free port",
                    )
                ]
            if exc.errno == errno.EADDRNOTAVAIL:
                return [
                    Result(
                        "api-port",
                        "fail",
                        f"{listen}: {host} is not an address of this host",
                        "set api.listen to an address of this host (127.0.0.1: local applications only)",
                    )
                ]
            if exc.errno == errno.EACCES:
                return [
                    Result(
                        "api-port",
                        "fail",
                        f"{listen}: {status_mod.current_user()} may not bind ports below 1024",
                        "use a port >= 1024, or give the service CAP_NET_BIND_SERVICE",
                    )
                ]
            return [Result("api-port", "fail", f"cannot bind {listen}: {exc.strerror}", "fix api.listen")]
    return [Result("api-port", "ok", f"{listen} is free to bind (no agent running)")]


# --- all of them ---------------------------------------------------------------------------------


def run_checks(
    config_path: Path | None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> list[Result]:
    env = os.environ if env is None else env
    now = datetime.now(UTC) if now is None else now
    cfg, first = check_config(config_path, env)
    if cfg is None:
        return [first]  # every other check reads the config: they would only repeat its failure
    agent: dict[str, Any] = {"running": False, "run": None}
    with contextlib.suppress(OSError):  # an unreadable state_dir is the disk check's to report
        if cfg.state_dir.is_dir():
            agent = status_mod.read_agent(cfg.state_dir)
    steps: list[tuple[str, Callable[[], list[Result]]]] = [
        ("certificates", lambda: check_certificates(cfg, now)),
        ("trust-keys", lambda: check_trust_keys(cfg)),
        ("channel", lambda: check_channel(cfg, timeout)),
        ("disk", lambda: check_disk(cfg)),
        ("state-db", lambda: check_state_dbs(cfg)),
        ("onnxruntime", lambda: check_onnxruntime(cfg)),
        ("api-port", lambda: check_api_port(cfg, agent)),
    ]
    results = [first]
    for name, step in steps:
        try:
            results += step()
        except Exception as exc:  # a check that breaks must not hide the others' verdicts
            results.append(
                Result(
                    name,
                    "fail",
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a bug",
                )
            )
    return results
