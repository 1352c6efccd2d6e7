"""The ``channel`` check: the control channel's server is reachable, step by step (DNS, TCP, TLS with
the client certificate), so the message says which step failed. It sends nothing above TLS: no MQTT
packet, so it cannot take over the running agent's session."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.ops.doctor.report import Result

#: The port the IoT Hub device SDK dials (MQTT over TLS); it cannot be configured.
IOTHUB_PORT = 8883
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
