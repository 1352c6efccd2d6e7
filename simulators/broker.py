"""A real mosquitto broker, configured like production, for tests, the demo and the simulators.

Running the actual broker rather than a fake is the point: the ACL (a device reads only its own
``desired`` topic), certificate authentication (the certificate CN is the MQTT username, and on the
device listener the client id too), retained messages and persistence across a crash are exactly the
behaviours the agent relies on, and a fake would only encode our assumptions about them.

With TLS the broker has two listeners (``per_listener_settings true``), because devices and operators
need opposite rules about the client id:

* the **device listener** (:attr:`Mosquitto.port`) replaces every client id with the certificate's CN
  (``use_username_as_clientid``). Otherwise device A's certificate connecting with client id ``dev-b``
  would log dev-b off and take over its session: the ACL would keep A out of dev-b's topics, but not
  stop the denial of service. Its ACL holds only the device patterns.
* the **operator listener** (:attr:`Mosquitto.operator_port`) keeps the client's own id, because every
  operator process (``edge-deploy``, ``serve``, the simulators' bridges) presents the one operator
  certificate with an ``operator-<random>`` id, and forcing them all to ``operator`` would have them
  log each other off. Since nothing stops a client there from claiming any id, the listener trusts
  only a separate operator CA (:attr:`Mosquitto.operator_ca_path`): a device certificate cannot open
  a session on it at all, and its ACL holds only the operator users.

Both listeners are one broker: retained messages and sessions are shared, so what an operator
publishes reaches the devices.

Everything lives in one work directory: the CAs, the server and client certificates, the ACLs, the
configuration, the persistence database and the logs. The certificates are made once and reused by
:meth:`Mosquitto.restart` and by a later :class:`Mosquitto` on the same directory, so clients that
were handed certificates keep working across restarts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psutil

from deploy import pki
from edge_core.topics import DEFAULT_PREFIX, mosquitto_device_acl, mosquitto_operator_acl

__all__ = ["BrokerError", "ClientCert", "Mosquitto", "find_mosquitto", "free_port"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
#: Debian and Ubuntu install the broker in /usr/sbin, which is not on a normal user's PATH.
_FALLBACK_BINARIES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker could not be found, configured or started."""


@dataclass(frozen=True)
class ClientCert:
    """The files a client needs for mutual TLS: paho's ``tls_set(ca_certs, certfile, keyfile)``."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the broker's CA and presenting this certificate.

        Prefer it to paho's ``tls_set``, which builds its context with the deprecated
        ``ssl.PROTOCOL_TLS``: ``client.tls_set_context(cert.ssl_context())``.
        """
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_path))
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context


def find_mosquitto() -> str:
    """Locate the mosquitto binary, or explain how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_BINARIES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "mosquitto is not installed (not on PATH, nor in /usr/sbin): install it with "
        "`apt-get install mosquitto` (Debian/Ubuntu) or your platform's package manager"
    )


def free_port(host: str) -> int:
    """Ask the kernel for a free TCP port on ``host``.

    mosquitto cannot do this itself (``listener 0`` does not mean an ephemeral port), so bind port 0,
    read the port the kernel chose and release it. Another process could take it before the broker
    binds; :meth:`Mosquitto.start` then fails loudly rather than talking to the wrong server.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _listens_on(pid: int, port: int) -> bool:
    try:
        process = psutil.Process(pid)
        # net_connections() is psutil >= 6; connections() is its older name.
        lister = getattr(process, "net_connections", None) or process.connections
        connections = lister(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup run at garbage collection or interpreter exit: never leave a broker behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-max_bytes:].decode(errors="replace")


class Mosquitto:
    """A mosquitto broker process with mutual-TLS authentication, the project ACL and persistence.

    Usage::

        with Mosquitto(tmp_path / "broker") as broker:
            cert = broker.client_cert("dev-1")
            client.tls_set(str(cert.ca_path), str(cert.cert_path), str(cert.key_path))
            client.connect(broker.host, broker.port)  # an operator: broker.operator_port

    Devices connect to :attr:`port`, operators (``client_cert("operator")``) to :attr:`operator_port`;
    see the module docstring for why they are two listeners. Without TLS there is one anonymous
    listener and :attr:`operator_port` is :attr:`port`.

    ``autosave_changes`` makes the broker write its persistence database after that many changes
    (retained messages, subscriptions, queued messages); the default of 1 means state survives
    :meth:`kill`, which simulates a crash. Set it to 0 to save only on a clean shutdown.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        operator_port: int | None = None,
        tls: bool = True,
        prefix: str = DEFAULT_PREFIX,
        operators: tuple[str, ...] = ("operator",),
        autosave_changes: int = 1,
    ) -> None:
        if autosave_changes < 0:
            raise ValueError("autosave_changes must be >= 0")
        self.workdir = Path(workdir).absolute()
        self._host = host
        self._port = port
        self._operator_port = operator_port
        self.tls = tls
        self.prefix = prefix
        self.operators = tuple(operators)
        self.autosave_changes = autosave_changes
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Mosquitto] | None = None

    # -- paths and addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listener's port; chosen by :meth:`start` when none was given."""
        if self._port is None:
            raise BrokerError("the broker has no port yet: call start() first")
        return self._port

    @property
    def operator_port(self) -> int:
        """The operator listener's port (chosen by :meth:`start` when none was given); without TLS, the
        one listener's."""
        if not self.tls:
            return self.port
        if self._operator_port is None:
            raise BrokerError("the broker has no operator port yet: call start() first")
        return self._operator_port

    def _url(self, port: int) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{port}"

    @property
    def url(self) -> str:
        """``mqtts://host:port`` (``mqtt://`` without TLS), the form the agent's configuration takes."""
        return self._url(self.port)

    @property
    def operator_url(self) -> str:
        """:attr:`url` for the operator listener."""
        return self._url(self.operator_port)

    @property
    def ca_path(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.workdir / "ca.key"

    @property
    def operator_ca_path(self) -> Path:
        """The CA of operator certificates: the only one the operator listener trusts."""
        return self.workdir / "operator-ca.crt"

    @property
    def operator_ca_key_path(self) -> Path:
        return self.workdir / "operator-ca.key"

    @property
    def server_cert_path(self) -> Path:
        return self.workdir / "server.crt"

    @property
    def server_key_path(self) -> Path:
        return self.workdir / "server.key"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        """The device listener's ACL."""
        return self.workdir / "acl"

    @property
    def operator_acl_path(self) -> Path:
        return self.workdir / "operator.acl"

    @property
    def log_path(self) -> Path:
        """The broker's own log (``log_dest file``)."""
        return self.workdir / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """The process's stdout/stderr: where configuration errors appear before logging starts."""
        return self.workdir / "mosquitto.out"

    @property
    def persistence_path(self) -> Path:
        return self.workdir / "mosquitto.db"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    # -- certificates ----------------------------------------------------------------------------

    def _server_sans(self) -> list[str]:
        sans = ["localhost", "127.0.0.1"]
        try:
            is_unspecified = ipaddress.ip_address(self._host).is_unspecified
        except ValueError:
            is_unspecified = False  # a host name: it goes into the certificate as a DNS name
        if is_unspecified:
            # Listening on every interface: clients will dial the machine by name.
            sans.append(socket.gethostname())
        elif self._host:
            sans.append(self._host)
        return list(dict.fromkeys(sans))

    def ensure_pki(self) -> None:
        """Create the CA and the server certificate, once; later calls reuse the files on disk.

        The server certificate is re-issued only when it is missing or about to expire, so the CA that
        clients trust never changes for a given work directory.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.ca_path.exists() and self.ca_key_path.exists()):
            ca_cert, ca_key = pki.create_ca(f"edge-ml test broker CA ({self.workdir.name})")
            pki.write_pem(self.ca_key_path, ca_key, private=True)
            pki.write_pem(self.ca_path, ca_cert, private=False)
            self.server_cert_path.unlink(missing_ok=True)
        if self.server_cert_path.exists() and self.server_key_path.exists():
            expiry = pki.cert_expiry(self.server_cert_path.read_bytes())
            if expiry > datetime.now(UTC) + timedelta(days=1):
                return
        cert, key = pki.issue_cert(
            self.ca_path.read_bytes(),
            self.ca_key_path.read_bytes(),
            "localhost",
            server=True,
            sans=self._server_sans(),
        )
        pki.write_pem(self.server_key_path, key, private=True)
        pki.write_pem(self.server_cert_path, cert, private=False)

    def ensure_operator_ca(self) -> None:
        """Create the operator CA, once. Apart from :meth:`ensure_pki` so that a subclass with no
        operator listener (simulators/iothub.py) makes none."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.operator_ca_path.exists() and self.operator_ca_key_path.exists()):
            cert, key = pki.create_ca(f"edge-ml test operator CA ({self.workdir.name})")
            pki.write_pem(self.operator_ca_key_path, key, private=True)
            pki.write_pem(self.operator_ca_path, cert, private=False)

    def client_cert(self, name: str) -> ClientCert:
        """A client certificate with CN ``name``, issued once and cached.

        Devices use their device id as ``name``; their certificates come from the broker's CA and
        work on :attr:`port` only. A name in ``operators`` (``"operator"`` by default) gets one from the
        operator CA, which works on :attr:`operator_port` only. The broker takes the CN as the MQTT
        username and applies that listener's ACL to it. ``ca_path`` is the broker's CA either way: it
        is what the client verifies the server with.
        """
        if not self.tls:
            raise BrokerError("this broker was started without TLS: client certificates are not used")
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"invalid client name {name!r}")
        self.ensure_pki()
        if name in self.operators:
            self.ensure_operator_ca()
            # Not clients/: a work directory from before the operator CA has a device-CA operator
            # certificate cached there, which the operator listener would refuse.
            directory = self.workdir / "operators"
            issuer, issuer_key = self.operator_ca_path, self.operator_ca_key_path
        else:
            directory = self.workdir / "clients"
            issuer, issuer_key = self.ca_path, self.ca_key_path
        cert_path = directory / f"{name}.crt"
        key_path = directory / f"{name}.key"
        if not (cert_path.exists() and key_path.exists()):
            cert, key = pki.issue_cert(issuer.read_bytes(), issuer_key.read_bytes(), name)
            pki.write_pem(key_path, key, private=True)
            pki.write_pem(cert_path, cert, private=False)
        return ClientCert(ca_path=self.ca_path, cert_path=cert_path, key_path=key_path)

    # -- configuration ---------------------------------------------------------------------------

    def config_text(self) -> str:
        """The mosquitto.conf for the current settings (the port must be known)."""
        if any(c in str(self.workdir) for c in "\r\n"):
            # Every path below is one line of the configuration file.
            raise BrokerError(f"work directory path contains a line break: {str(self.workdir)!r}")
        lines = ["# Generated by simulators/broker.py; rewritten on every start."]
        if self.tls:
            tls = [
                f"certfile {self.server_cert_path}",
                f"keyfile {self.server_key_path}",
                "tls_version tlsv1.2",
            ]
            lines += [
                # Each listener its own security settings: the two need different client-id rules,
                # ACLs and trusted CAs (module docstring).
                "per_listener_settings true",
                "",
                "# devices: the client id is forced to the certificate's CN",
                f"listener {self.port} {self._host}",
                *tls,
                f"cafile {self.ca_path}",
                "require_certificate true",
                # The client certificate's CN becomes the username the ACL's %u refers to ...
                "use_identity_as_username true",
                # ... and the client id, so that no certificate can claim another device's session.
                "use_username_as_clientid true",
                f"acl_file {self.acl_path}",
                "allow_anonymous false",
                "",
                "# operators: only the operator CA; several processes share one CN, so ids stay theirs",
                f"listener {self.operator_port} {self._host}",
                *tls,
                f"cafile {self.operator_ca_path}",
                "require_certificate true",
                "use_identity_as_username true",
                f"acl_file {self.operator_acl_path}",
                "allow_anonymous false",
                "",
            ]
        else:
            lines += [f"listener {self.port} {self._host}", "allow_anonymous true"]
        lines += [
            "persistence true",
            # mosquitto 1.x joins the location and file name by plain concatenation: keep the slash.
            f"persistence_location {self.workdir}/",
        ]
        if self.autosave_changes:
            lines += ["autosave_on_changes true", f"autosave_interval {self.autosave_changes}"]
        lines += [
            *self._process_lines(),
            "max_queued_messages 10000",
            "persistent_client_expiration 1d",
        ]
        return "\n".join(lines) + "\n"

    def _process_lines(self) -> list[str]:
        return [
            # Started as root, mosquitto otherwise drops to user "mosquitto", which cannot write the
            # persistence database in our work directory. Ignored when not started as root.
            "user root",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]

    def _write_config(self) -> None:
        if self.tls:
            self.ensure_pki()
            self.ensure_operator_ca()
            self.acl_path.write_text(mosquitto_device_acl(self.prefix))
            self.operator_acl_path.write_text(mosquitto_operator_acl(self.prefix, self.operators))
        self.conf_path.write_text(self.config_text())

    def _listen_ports(self) -> list[int]:
        """The ports :meth:`start` waits for: every listener the configuration opens."""
        return [self.port, self.operator_port] if self.tls else [self.port]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and wait until it accepts TCP connections (up to 10 s)."""
        if self.running:
            raise BrokerError(f"the broker is already running (pid {self.pid})")
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port(self._host)
        if self.tls and self._operator_port is None:
            # free_port releases the port at once: the kernel may hand the same one out again.
            while (candidate := free_port(self._host)) == self._port:
                pass
            self._operator_port = candidate
        self._write_config()
        output = self.output_path.open("ab")
        try:
            proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        except BaseException:
            output.close()
            raise
        self._proc, self._output = proc, output
        self._finalizer = weakref.finalize(self, _kill_process, proc)
        try:
            self._wait_ready(proc)
        except BaseException:
            self.kill()
            raise
        log.info("mosquitto pid %d listening on %s", proc.pid, " and ".join(map(str, self._listen_ports())))
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait until *this* process listens on every port of its configuration.

        Asking the kernel which process owns the listening socket, rather than dialling the port,
        cannot mistake another server that took the port for our broker, and leaves no failed-TLS
        noise in the broker log.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with status {proc.returncode} during startup on port {self.port}\n"
                    f"--- {self.output_path.name} ---\n{_tail(self.output_path)}"
                    f"--- {self.log_path.name} ---\n{_tail(self.log_path)}"
                )
            missing = [port for port in self._listen_ports() if not _listens_on(proc.pid, port)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not listen on {self._host}:{missing} within {START_TIMEOUT_S:.0f} s\n"
                    f"--- {self.log_path.name} ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.01)

    def _reap(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("mosquitto pid %d ignored %s; killing it", proc.pid, sig.name)
                    proc.kill()
            proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._output is not None:
            self._output.close()
            self._output = None
        self._proc = None

    def stop(self) -> None:
        """Stop cleanly (SIGTERM, which also saves the persistence database), or kill after 5 s."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the broker: simulates a crash. Only state already autosaved survives."""
        self._reap(signal.SIGKILL)

    def restart(self) -> Self:
        """Stop (if still running) and start again on the same ports with the same persistence."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        if self.tls:
            port = f"{port}, operators {self._operator_port if self._operator_port is not None else '?'}"
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"Mosquitto({self._host}:{port}, tls={self.tls}, {state}, workdir={str(self.workdir)!r})"
