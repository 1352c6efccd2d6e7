"""The deployer: turns verified manifests into an active image, one explicit state machine.

Every (state, event) -> state transition the deployer can make is in :data:`TRANSITIONS`; nothing
else moves a deployment. Each transition is committed to SQLite (agent/update/state.py) and then published
as the retained status document, before the work of the new state starts. After a crash the
deployment is resumed from the state it was in; every state's work is idempotent:

    received     -> (image already installed)        activating
                 -> (disk space checked)             downloading
    downloading  -> (all bytes, resumable by Range)  verifying
    verifying    -> (sha256 matches the manifest)    installing
    installing   -> (safely unpacked, fsynced)       activating
    activating   -> (loaded beside the serving image,
                     smoke-tested, ``current`` and
                     traffic switched)               active
    any of the above -> (an error)                   failed       the previous image stays active
    activating   -> (load or smoke test failed, or
                     an error after the switch)      rolled_back  the previous image serves

Manifests are verified as they arrive (on the control channel's thread: verification is pure and
takes microseconds), so a refusal is reported at once, even while a deployment is in progress. A
newer verified manifest supersedes a download in progress; later states are short and run to the end.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import __version__
from agent.update.fetch import Fetcher
from agent.update.state import DeploymentRow, StateDB
from agent.update.store import BundleStore
from edge_core import faults
from edge_core import manifest as mf
from edge_core.clock import now_iso
from edge_core.errors import (
    DeploymentError,
    DownloadError,
    ErrorCode,
    InstallError,
    ManifestRefused,
    VerifyError,
)
from edge_core.fsutil import hash_file
from edge_core.log import get_logger

log = get_logger("deployer")


class State(StrEnum):
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    START = "start"
    ALREADY_INSTALLED = "already_installed"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    ACTIVATED = "activated"
    FAIL = "fail"


S, E = State, Event
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (S.RECEIVED, E.START): S.DOWNLOADING,
    (S.RECEIVED, E.ALREADY_INSTALLED): S.ACTIVATING,
    (S.RECEIVED, E.FAIL): S.FAILED,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, E.FAIL): S.FAILED,
    (S.VERIFYING, E.VERIFIED): S.INSTALLING,
    (S.VERIFYING, E.FAIL): S.FAILED,
    (S.INSTALLING, E.INSTALLED): S.ACTIVATING,
    (S.INSTALLING, E.FAIL): S.FAILED,
    (S.ACTIVATING, E.ACTIVATED): S.ACTIVE,
    (S.ACTIVATING, E.FAIL): S.ROLLED_BACK,
}
TERMINAL = frozenset({S.ACTIVE, S.FAILED, S.ROLLED_BACK})
#: A deployment that the agent crashed in this many times is failed instead of resumed again
#: (a bundle that kills the agent must not crash-loop the device).
MAX_RECOVERIES = 3

StatusSink = Callable[[dict[str, Any]], None]


class Activator(Protocol):
    """What makes an installed image serve (agent/serving/activation.py). The deployer calls
    ``prepare`` before switching ``current`` (load beside the serving image, smoke-test it; raise a
    DeploymentError to keep the old one) and ``commit`` after the switch (take traffic)."""

    def prepare(self, image_dir: Path, manifest: mf.Manifest) -> Any: ...

    def commit(self, prepared: Any) -> None: ...

    def discard(self, prepared: Any) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What serves now (API address, image, execution provider per model, threads): for the status."""
        ...


class Deployer:
    def __init__(
        self,
        device_id: str,
        db: StateDB,
        store: BundleStore,
        fetcher: Fetcher,
        trusted_keys: Mapping[str, Ed25519PublicKey],
        publish_status: StatusSink,
        disk_margin: int,
        activator: Activator | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.device_id = device_id
        self.db = db
        self.store = store
        self.fetcher = fetcher
        self.trusted_keys = trusted_keys
        self.publish_status = publish_status
        self.disk_margin = disk_margin
        self.activator = activator
        self.clock = clock
        self._lock = threading.Lock()
        self._publish_lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: tuple[mf.Manifest, str] | None = None
        self._progress: tuple[int, int] | None = None
        self._digests: dict[int, str] = {}
        self._stopping = False

    # --- intake (control channel thread) ---------------------------------------------------

    def submit(self, raw: bytes) -> None:
        """Called with every message on the desired-state topic. Never raises, never blocks long."""
        sha = hashlib.sha256(raw).hexdigest()
        with self._lock:
            latest = self.db.latest()
            if (latest and latest.message_sha256 == sha) or (self._pending and self._pending[1] == sha):
                return  # the retained manifest delivered again (reconnect, resubscribe): already taken
            rejected = self.db.get_meta("rejected")
            if rejected and rejected.get("message_sha256") == sha:
                return
            high = max(self.db.last_generation(), self._pending[0].generation if self._pending else 0)
            try:
                m = mf.verify(
                    raw, self.trusted_keys, device_id=self.device_id, now=self.clock(), last_generation=high
                )
            except ManifestRefused as exc:
                doc = {**exc.as_dict(), "at": now_iso(), "message_sha256": sha}
                self.db.set_meta("rejected", doc)
                log.warning("manifest.refused", code=str(exc.code), reason=exc.message)
                refused = True
            else:
                if self._pending:
                    log.info("manifest.superseded_before_start", generation=self._pending[0].generation)
                self._pending = (m, sha)
                self.db.set_meta("rejected", None)
                self._wake.notify_all()
                log.info(
                    "manifest.accepted",
                    generation=m.generation,
                    deployment_id=m.deployment_id,
                    image=f"{m.image.name}:{m.image.version}",
                    keyid=m.keyid[:16],
                )
                refused = False
        if refused:
            self.publish()

    def intake_free(self) -> bool:
        """The intake lock is free now. It is held for the microseconds a verification takes, so a
        lock that stays taken means the intake is wedged (and the control channel, waiting on it)."""
        if not self._lock.acquire(timeout=0):
            return False
        self._lock.release()
        return True

    # --- the worker thread -----------------------------------------------------------------

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()

    def run(self) -> None:
        """Resume an interrupted deployment, then carry out manifests as they arrive."""
        self.recover()
        while True:
            with self._lock:
                while self._pending is None and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    self.db.set_meta("clean_stop", True)
                    return
                assert self._pending is not None
                m, sha = self._pending
                self._pending = None
                self.db.insert(m.generation, m.deployment_id, sha, m.payload, m.keyid, S.RECEIVED)
            self.publish()
            faults.point(f"state:{S.RECEIVED}")
            self._drive(m, S.RECEIVED)

    def recover(self) -> None:
        """Resume the latest deployment if the agent stopped in the middle of it. Only stops that were
        not clean (a crash, SIGKILL, power loss) count towards MAX_RECOVERIES."""
        clean = bool(self.db.get_meta("clean_stop"))
        self.db.set_meta("clean_stop", False)
        row = self.db.latest()
        if row is None or State(row.state) in TERMINAL:
            self.publish()
            return
        m = mf.Manifest.from_payload(row.payload, row.keyid)
        n = row.recoveries if clean else self.db.count_recovery(row.generation)
        log.warning(
            "deployment.recovering", generation=row.generation, state=row.state, recoveries=n, clean=clean
        )
        state = State(row.state)
        if n > MAX_RECOVERIES and state != S.ACTIVATING:
            err = DeploymentError(
                ErrorCode.INTERRUPTED,
                f"the agent stopped {n} times during this deployment (last in state {state})",
                "check the agent's logs and the bundle; publish a new generation to try again",
            )
            self._transition(m, state, E.FAIL, err)
            return
        self._drive(m, state)

    def _drive(self, m: mf.Manifest, state: State) -> None:
        while state not in TERMINAL:
            err: DeploymentError | None = None
            try:
                event = self._work(m, state)
            except DeploymentError as exc:
                if exc.code == ErrorCode.SUPERSEDED and self._stopping:
                    # shutting down mid-download: stay in this state, resume at the next start
                    self.db.set_meta("clean_stop", True)
                    return
                event, err = E.FAIL, exc
            # A bug or an OS error we did not foresee fails this deployment, not the agent.
            except Exception as exc:
                log.error("deployment.unexpected_error", exc_info=True, state=str(state))
                event, err = (
                    E.FAIL,
                    InstallError(ErrorCode.INSTALL_FAILED, f"{type(exc).__name__}: {exc}", "see logs"),
                )
            if event == E.FAIL and state == S.ACTIVATING and (problem := self._restore_previous(m)):
                assert err is not None
                err = InstallError(
                    err.code,
                    f"{err.message}; restoring the previous image also failed: {problem}",
                    "check the device's disk; the status's 'active' says what runs",
                )
            state = self._transition(m, state, event, err)
        if state == S.ACTIVE:
            self.store.gc()

    def _transition(self, m: mf.Manifest, state: State, event: Event, err: DeploymentError | None) -> State:
        new = TRANSITIONS[(state, event)]
        self.db.transition(m.generation, state, event, new, err.as_dict() if err else None)
        self._progress = None
        log.info(
            "deployment.state",
            generation=m.generation,
            deployment_id=m.deployment_id,
            state=str(new),
            trigger=str(event),
            **({"code": str(err.code), "reason": err.message} if err else {}),
        )
        self.publish()
        faults.point(f"state:{new}")
        return new

    # --- the work of each state ------------------------------------------------------------

    def _work(self, m: mf.Manifest, state: State) -> Event:
        img = m.image
        if state == S.RECEIVED:
            if self.store.has_image(img.sha256):
                return E.ALREADY_INSTALLED
            partial = self.store.partial_path(img.sha256)
            have = partial.stat().st_size if partial.exists() else 0
            need = (img.size - have) + img.size + self.disk_margin  # bundle + its unpacked copy + margin
            free = self.store.free_bytes()
            if free < need:
                raise DownloadError(
                    ErrorCode.INSUFFICIENT_DISK,
                    f"{free} bytes free, the image needs {need} (bundle {img.size}, unpacked about as much, "
                    f"margin {self.disk_margin})",
                    "free disk space on the device or lower download.disk_margin",
                )
            return E.START
        if state == S.DOWNLOADING:
            self.store.gc(keep={img.sha256})
            self._digests[m.generation] = self.fetcher.fetch(
                img.urls, self.store.partial_path(img.sha256), img.size, self._on_progress, self._superseded
            )
            return E.DOWNLOADED
        if state == S.VERIFYING:
            partial = self.store.partial_path(img.sha256)
            if not partial.exists():
                raise VerifyError(ErrorCode.DIGEST_MISMATCH, "downloaded bundle is missing", "publish again")
            digest = self._digests.pop(m.generation, None) or hash_file(partial)
            if digest != img.sha256:
                partial.unlink(missing_ok=True)
                raise VerifyError(
                    ErrorCode.DIGEST_MISMATCH,
                    f"bundle sha256 is {digest}, the manifest declares {img.sha256}",
                    "the bundle on the server is corrupt or was replaced; rebuild or re-upload it",
                )
            return E.VERIFIED
        if state == S.INSTALLING:
            if not self.store.has_image(img.sha256) and not self.store.partial_path(img.sha256).exists():
                raise InstallError(
                    ErrorCode.INSTALL_FAILED, "verified bundle vanished before unpacking", "retry"
                )
            try:
                self.store.install(img.sha256, self.store.partial_path(img.sha256), img.name, img.version)
            except DeploymentError:
                self.store.partial_path(img.sha256).unlink(missing_ok=True)
                raise
            return E.INSTALLED
        if state == S.ACTIVATING:
            prepared = self.activator.prepare(self.store.image_dir(img.sha256), m) if self.activator else None
            try:
                self.store.activate(img.sha256)
            except BaseException:
                if self.activator is not None:
                    self.activator.discard(prepared)
                raise
            if self.activator is not None:
                self.activator.commit(prepared)
            return E.ACTIVATED
        raise AssertionError(f"no work for state {state}")  # pragma: no cover

    def _restore_previous(self, m: mf.Manifest) -> str | None:
        """Activation failed: point ``current`` back at the image that was active before.
        Returns what went wrong if even that failed (the status's ``active`` still tells the truth)."""
        try:
            if self.store.active() == m.image.sha256 and (prev := self.store.previous()):
                self.store.activate(prev)
        except OSError as exc:
            log.error("deployment.restore_failed", error=str(exc))
            return str(exc)
        return None

    def _superseded(self) -> bool:
        return self._pending is not None or self._stopping

    def _on_progress(self, done: int, total: int) -> None:
        self._progress = (done, total)
        self.publish()

    # --- status ----------------------------------------------------------------------------

    def status_document(self) -> dict[str, Any]:
        row = self.db.latest()
        active = self.store.active()
        doc: dict[str, Any] = {
            "schema_version": 1,
            "device_id": self.device_id,
            "agent_version": __version__,
            "state": row.state if row else "idle",
            "deployment_id": row.deployment_id if row else None,
            "generation": row.generation if row else 0,
            "image": _image_of(row) if row else None,
            "progress": None,
            "error": _error_of(row),
            "active": None,
            "rejected": None,
            "runtime": self.activator.describe() if self.activator else None,
            "updated_at": row.updated_at if row else now_iso(),
            "published_at": now_iso(),
        }
        if self._progress and row and row.state == S.DOWNLOADING:
            doc["progress"] = {"bytes": self._progress[0], "total": self._progress[1]}
        if active:
            src = self.db.last_active_with_digest(active)
            doc["active"] = {
                "sha256": active,
                **(
                    {
                        "name": _image_of(src)["name"],
                        "version": _image_of(src)["version"],
                        "deployment_id": src.deployment_id,
                        "generation": src.generation,
                    }
                    if src
                    else {}
                ),
            }
        rejected = self.db.get_meta("rejected")
        if rejected:
            # message_sha256 names the refused message, so whoever sent it can tell it was theirs
            doc["rejected"] = {k: rejected[k] for k in ("code", "message", "hint", "at", "message_sha256")}
        return doc

    def publish(self) -> None:
        """Publish the current status document. Serialised: documents are published in the order they
        were computed, so a document computed on one thread can never overtake a newer one."""
        with self._publish_lock:
            self._publish()

    def _publish(self) -> None:
        try:
            self.publish_status(self.status_document())
        except Exception:  # reporting must never break a deployment; the next transition reports again
            log.error("status.publish_failed", exc_info=True)


def _image_of(row: DeploymentRow) -> dict[str, Any]:
    img = mf.Manifest.from_payload(row.payload).image
    return {"name": img.name, "version": img.version, "sha256": img.sha256, "size": img.size}


def _error_of(row: DeploymentRow | None) -> dict[str, str] | None:
    if row is None or row.error_code is None:
        return None
    return {"code": row.error_code, "message": row.error_message or "", "hint": row.error_hint or ""}
