"""Control channel over Azure IoT Hub's device twin, through the official azure-iot-device SDK.

The contract is the plain MQTT channel's, mapped onto the twin (docs/iothub.md):

    desired  edge.manifest    the signed manifest, as a string: its exact bytes, so the deployer's
                              duplicate check (sha256 of the message) and the signature see what
                              the operator signed
    reported edge.status      the status document
    reported edge.inventory   the device's capabilities
    reported edge.online      {"online": true|false, "reason", "at"}
    device-to-cloud messages  heartbeats (``type=heartbeat``), never queued while offline

Twin patches are JSON merge patches (RFC 7386): a key left out is kept, ``null`` deletes it. So a
reported document is sent as the difference from what the hub holds, with ``null`` for every key
the new document no longer has; sending it whole would leave an old ``error`` in place forever.

Reconnection is ours, not the SDK's (``connection_retry=False``): the SDK retries at a fixed
interval, which makes a fleet that lost its hub reconnect in lockstep. Ours backs off with full
jitter, like the MQTT channel. After every connection the whole twin is read, because the hub does
not queue desired-property patches for a device that is offline, and a patch whose ``$version`` is
not the next one means one was missed: the twin is read again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

from azure.iot.device import X509, IoTHubDeviceClient, Message
from azure.iot.device import exceptions as hub_errors

from agent.channel.base import ConnectHandler, DesiredHandler
from agent.config import IotHubConfig
from edge_core import manifest as mf
from edge_core.clock import now_iso
from edge_core.log import get_logger
from edge_core.retry import backoff_delays

log = get_logger("iothub")
_T = TypeVar("_T")

#: The twin property (desired and reported) under which everything of ours lives, so the twin can
#: also carry other software's properties.
TWIN_KEY = "edge"
#: The SDK has no port option: IoT Hub and IoT Edge gateways listen on 8883.
PORT = 8883
_HEARTBEAT_QUEUE = 4
_OFFLINE_ERRORS = (
    hub_errors.ClientError,
    hub_errors.OperationTimeout,
    hub_errors.OperationCancelled,
    hub_errors.ServiceError,
    OSError,
    ValueError,
)


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``, or ``None`` when they are equal.

    A ``None`` inside ``new`` means "absent" (a merge patch cannot store a null).
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else _strip_nulls(new)
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if value is None:
            continue
        if key not in old:
            patch[key] = _strip_nulls(value)
            continue
        sub = merge_patch(old[key], value)
        if sub is not None:
            patch[key] = sub
    for key in old:
        if new.get(key) is None:
            patch[key] = None
    return patch or None


def apply_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386: what the hub does with a twin patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_patch(out.get(key), value)
    return out


def status_from_twin(doc: dict[str, Any]) -> dict[str, Any]:
    """The status document as the MQTT transport carries it: a twin cannot hold ``null``, so put back
    the nulls that the status schema requires (``error``, ``rejected``, ``progress``...)."""
    return {**dict.fromkeys(mf.schema("status")["required"]), **doc}


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    return value


def _plain(props: dict[str, Any]) -> dict[str, Any]:
    """A twin section without the hub's own ``$version`` and ``$metadata``."""
    return {k: v for k, v in props.items() if not k.startswith("$")}


def _describe_error(exc: BaseException) -> str:
    """The SDK wraps the socket or TLS error that says what really happened: show the chain."""
    parts = [f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__]
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        parts.append(f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts)


class HubChannel:
    def __init__(self, device_id: str, cfg: IotHubConfig) -> None:
        self.device_id = device_id
        self.cfg = cfg
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="iothub", daemon=True)
        self._delay = backoff_delays(cfg.reconnect_min, cfg.reconnect_max)
        # What we want the hub to hold (reported.edge), and what it acknowledged holding.
        self._want: dict[str, Any] = {}
        self._held: dict[str, Any] | None = None
        self._heartbeats: deque[dict[str, Any]] = deque(maxlen=_HEARTBEAT_QUEUE)
        self._desired_version: int | None = None
        self._refetch = False
        self._last_error: str | None = None
        self._on_desired: DesiredHandler = lambda _raw: None
        self._on_connected: ConnectHandler = lambda: None
        # Built here so that a bad certificate or connection string fails at start, not later.
        self._client = self._make_client()

    @property
    def endpoint(self) -> str:
        return f"{self.cfg.endpoint_host()}:{PORT}"

    def _make_client(self) -> IoTHubDeviceClient:
        """A new SDK client. One per connection: a fresh client subscribes to twin responses again
        (the SDK subscribes once per client, and hangs forever on a GET after a hub that lost the
        session), and nothing wedged in an old one carries over."""
        cfg = self.cfg
        opts: dict[str, Any] = {
            "keep_alive": cfg.keepalive,
            "connection_retry": False,
            "auto_connect": False,
            # The SDK's own "freshness" GET after a reconnect would duplicate ours (_sync_twin).
            "ensure_desired_properties": False,
        }
        if cfg.ca is not None:
            opts["server_verification_cert"] = cfg.ca.read_text()
        if cfg.cert is not None and cfg.key is not None:
            if cfg.gateway_hostname:
                opts["gateway_hostname"] = cfg.gateway_hostname
            x509 = X509(cert_file=str(cfg.cert), key_file=str(cfg.key))  # type: ignore[no-untyped-call]
            client = IoTHubDeviceClient.create_from_x509_certificate(
                x509, hostname=cfg.hostname, device_id=self.device_id, **opts
            )
        else:
            text = cfg.read_connection_string()
            client = IoTHubDeviceClient.create_from_connection_string(
                text, sastoken_ttl=cfg.sastoken_ttl, **opts
            )
        # The SDK's hint says the handler takes an argument; it is called with none.
        client.on_connection_state_change = self._on_state_change  # type: ignore[assignment]
        return client

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """An SDK call, bounded: the SDK's blocking calls have no timeout of their own."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="iothub-call", daemon=True).start()
        if not done.wait(self.cfg.request_timeout):
            raise hub_errors.OperationTimeout(
                f"{getattr(fn, '__name__', 'call')} got no answer within {self.cfg.request_timeout:g} s"
            )
        if "error" in box:
            raise box["error"]
        return cast(_T, box["value"])

    # --- ControlChannel ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "iothub",
            "endpoint": self.endpoint,
            "connected": self.connected,
            "last_error": self._last_error,
        }

    def start(self, on_desired: DesiredHandler, on_connect: ConnectHandler) -> None:
        self._on_desired = on_desired
        self._on_connected = on_connect
        self.thread.start()

    def report_status(self, doc: dict[str, Any]) -> None:
        self._report("status", doc)

    def report_inventory(self, doc: dict[str, Any]) -> None:
        self._report("inventory", doc)

    def report_heartbeat(self, doc: dict[str, Any]) -> None:
        if not self._connected.is_set():
            return  # a stale heartbeat is worth nothing: never queue one while offline
        with self._lock:
            self._heartbeats.append(doc)
            self._wake.notify_all()

    def stop(self) -> None:
        """Report online=false (and the last status) if the hub is reachable, then disconnect."""
        self._report("online", self._online_doc(False, "shutdown"))
        with self._lock:
            self._stop.set()
            self._wake.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=self.cfg.request_timeout + 5.0)
        else:
            self._shutdown(self._client)

    # --- the worker thread -------------------------------------------------------------------

    def _report(self, key: str, doc: dict[str, Any]) -> None:
        with self._lock:
            self._want[key] = copy.deepcopy(doc)
            self._wake.notify_all()

    def _online_doc(self, online: bool, reason: str) -> dict[str, Any]:
        return {"online": online, "reason": reason, "at": now_iso()}

    def _shutdown(self, client: IoTHubDeviceClient) -> None:
        with contextlib.suppress(*_OFFLINE_ERRORS):
            self._call(client.shutdown)

    def _loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._call(self._client.connect)
            except _OFFLINE_ERRORS as exc:
                self._last_error = _describe_error(exc)
                log.warning("iothub.connect_failed", endpoint=self.endpoint, error=self._last_error)
                self._shutdown(self._client)
                self._client = self._make_client()
                delay = self._delay(attempt)
                attempt += 1
                log.info("iothub.reconnect_wait", delay_s=round(delay, 2), attempt=attempt)
                self._stop.wait(delay)
                continue
            attempt = 0
            self._last_error = None
            self._connected.set()
            log.info("iothub.connected", endpoint=self.endpoint)
            try:
                self._session()
            except _OFFLINE_ERRORS as exc:
                self._last_error = _describe_error(exc)
                log.warning("iothub.session_lost", endpoint=self.endpoint, error=self._last_error)
            self._connected.clear()
            self._held = None  # re-read from the twin after the next connection
            if self._stop.is_set():
                self._flush_goodbye()
            self._shutdown(self._client)
            if not self._stop.is_set():
                self._client = self._make_client()
                self._stop.wait(self._delay(0))

    def _session(self) -> None:
        """One connection: read the twin, announce, then send reports until it drops or we stop."""
        client = self._client
        # Setting the handler subscribes at once, so it can only be set while connected.
        self._call(setattr, client, "on_twin_desired_properties_patch_received", self._on_patch)
        self._sync_twin()
        self._report("online", self._online_doc(True, "connected"))
        try:
            self._on_connected()
        except Exception:
            log.error("iothub.on_connect_handler_failed", exc_info=True)
        while not self._stop.is_set():
            with self._lock:
                while not (self._stop.is_set() or self._refetch or self._heartbeats or self._dirty()):
                    if not client.connected:
                        break
                    self._wake.wait(1.0)
                if not client.connected and not self._stop.is_set():
                    raise hub_errors.ConnectionDroppedError("the connection to the hub was lost")
                refetch, self._refetch = self._refetch, False
                beats = list(self._heartbeats)
                self._heartbeats.clear()
            if self._stop.is_set():
                return
            if refetch:
                self._sync_twin()
            self._flush_reported()
            for doc in beats:
                body = json.dumps(doc, separators=(",", ":"))
                msg = Message(body, content_encoding="utf-8")  # type: ignore[no-untyped-call]
                msg.content_type = "application/json"
                msg.custom_properties["type"] = "heartbeat"
                self._call(client.send_message, msg)

    def _dirty(self) -> bool:
        return self._held is None or merge_patch(self._held, self._want) is not None

    def _flush_reported(self) -> None:
        with self._lock:
            want = copy.deepcopy(self._want)
        held = self._held or {}
        patch = merge_patch(held, want)
        if patch is None:
            return
        try:
            self._call(self._client.patch_twin_reported_properties, {TWIN_KEY: patch})
        except hub_errors.ServiceError as exc:
            # The hub refused the document itself: sending it again would be refused again.
            log.error("iothub.report_refused", error=_describe_error(exc), keys=sorted(patch))
        self._held = want

    def _flush_goodbye(self) -> None:
        """On shutdown: the last status and online=false, if the hub is still there."""
        if self._client.connected:
            with contextlib.suppress(*_OFFLINE_ERRORS):
                self._flush_reported()

    def _sync_twin(self) -> None:
        twin = self._call(self._client.get_twin)
        reported = twin.get("reported") or {}
        held = reported.get(TWIN_KEY)
        self._held = _plain(held) if isinstance(held, dict) else {}
        desired = twin.get("desired") or {}
        log.info(
            "iothub.twin", desired_version=desired.get("$version"), reported_version=reported.get("$version")
        )
        self._take_desired(desired, full=True)

    # --- SDK callbacks (the SDK's handler thread) ----------------------------------------------

    def _on_state_change(self) -> None:
        # Both ways: the SDK reconnects by itself to renew a SAS token, between two of our checks.
        if self._client.connected:
            self._connected.set()
        elif self._connected.is_set():  # once per loss: an old client's shutdown calls this too
            self._connected.clear()
            log.warning("iothub.disconnected", endpoint=self.endpoint)
        with self._lock:
            self._wake.notify_all()

    def _on_patch(self, patch: dict[str, Any]) -> None:
        try:
            self._take_desired(patch, full=False)
        except Exception:  # an exception here would be lost in the SDK's handler thread
            log.error("iothub.desired_handler_failed", exc_info=True)

    def _take_desired(self, props: dict[str, Any], *, full: bool) -> None:
        version = props.get("$version")
        with self._lock:
            last = self._desired_version
            if isinstance(version, int) and last is not None:
                # A whole twin as new as the last patch is read again on purpose (reconnect); a
                # twin read that a newer patch overtook, or a patch seen before, is stale.
                if version < last or (version == last and not full):
                    log.info("iothub.desired_stale", version=version, last_version=last, full=full)
                    return
                if version > last + 1 and not full:
                    # A patch in between never reached us: read the whole twin to see what it said.
                    log.warning("iothub.patch_gap", version=version, last_version=last)
                    self._refetch = True
                    self._wake.notify_all()
            if isinstance(version, int):
                self._desired_version = version
        ours = props.get(TWIN_KEY)
        if ours is None:
            return
        if not isinstance(ours, dict) or "manifest" not in ours:
            log.warning("iothub.desired_ignored", reason=f"desired.{TWIN_KEY} has no manifest")
            return
        manifest = ours["manifest"]
        if manifest is None:
            log.info("iothub.desired_cleared")
            return
        # A manifest that is not a string is still handed on, as JSON, so that the deployer refuses
        # it with its usual code and the refusal reaches the reported status.
        raw = manifest.encode() if isinstance(manifest, str) else json.dumps(manifest).encode()
        self._on_desired(raw)
