"""One exception tree for the whole project.

Every refusal that reaches an operator carries a stable ``code`` (an :class:`ErrorCode`), a message
that says what is wrong, and a hint that says what to do. Errors of dependencies (httpx, sqlite3,
paho, tarfile, cryptography) are translated into this tree at the boundary where they happen.

    EdgeError
    ├── ConfigError            bad or missing configuration (names the field)
    ├── ManifestRefused        a manifest failed parsing, schema, signature, expiry or replay checks
    ├── ControlPlaneError      edge-deploy refused an operator's request (deploy/)
    └── DeploymentError        a verified manifest could not be carried out
        ├── DownloadError      network, HTTP status, size cap, disk space
        ├── VerifyError        digest or bundle metadata mismatch
        └── InstallError       unsafe archive members, unpack or activation failures

The codes are part of the public contract (status documents, exit codes, docs/errors.md): never
rename one, only add.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # configuration
    CONFIG_INVALID = "config_invalid"
    # manifest refusals (verification is pure; see agent/manifest.py)
    MANIFEST_MALFORMED = "manifest_malformed"
    MANIFEST_SCHEMA = "manifest_schema"
    MANIFEST_UNSIGNED = "manifest_unsigned"
    MANIFEST_UNKNOWN_KEY = "manifest_unknown_key"
    MANIFEST_BAD_SIGNATURE = "manifest_bad_signature"
    MANIFEST_EXPIRED = "manifest_expired"
    MANIFEST_WRONG_DEVICE = "manifest_wrong_device"
    MANIFEST_REPLAY = "manifest_replay"
    # download
    INSUFFICIENT_DISK = "insufficient_disk"
    DOWNLOAD_FAILED = "download_failed"
    SIZE_EXCEEDED = "size_exceeded"
    # verification of the downloaded bytes
    DIGEST_MISMATCH = "digest_mismatch"
    BUNDLE_INVALID = "bundle_invalid"
    # install / activate
    UNSAFE_ARCHIVE = "unsafe_archive"
    INSTALL_FAILED = "install_failed"
    ACTIVATION_FAILED = "activation_failed"
    # runtime (loading the new image beside the serving one)
    MODEL_LOAD_FAILED = "model_load_failed"
    SMOKE_TEST_FAILED = "smoke_test_failed"
    # lifecycle
    SUPERSEDED = "superseded"
    INTERRUPTED = "interrupted"
    # score.py workers (agent/worker.py) and per-image Python environments (agent/pyenv.py)
    SCORE_INIT_FAILED = "score_init_failed"
    SCORE_FAILED = "score_failed"
    SCORE_BAD_INPUT = "score_bad_input"
    SCORE_TIMEOUT = "score_timeout"
    WORKER_UNAVAILABLE = "worker_unavailable"
    IMAGE_ENV_FAILED = "image_env_failed"
    # the local telemetry buffer (agent/buffer.py)
    BUFFER_UNAVAILABLE = "buffer_unavailable"
    # blob storage backends (cloud_sync/): BlobError carries these, with ``retryable``
    BLOB_CONFIG_INVALID = "blob_config_invalid"
    BLOB_INVALID_NAME = "blob_invalid_name"
    BLOB_ACCESS_DENIED = "blob_access_denied"
    BLOB_CONTAINER_NOT_FOUND = "blob_container_not_found"
    BLOB_NOT_FOUND = "blob_not_found"
    BLOB_UNAVAILABLE = "blob_unavailable"
    BLOB_REQUEST_FAILED = "blob_request_failed"
    # the control plane (deploy/): registry, artifacts, rollouts
    INVALID_ARGUMENT = "invalid_argument"
    FILE_UNREADABLE = "file_unreadable"
    MODEL_INVALID = "model_invalid"
    MODEL_NOT_FOUND = "model_not_found"
    IMAGE_NOT_FOUND = "image_not_found"
    DEVICE_NOT_FOUND = "device_not_found"
    DEPLOYMENT_NOT_FOUND = "deployment_not_found"
    IN_USE = "in_use"
    NO_MATCHING_DEVICES = "no_matching_devices"
    DEVICE_BUSY = "device_busy"
    DEPLOYMENT_STATE_CONFLICT = "deployment_state_conflict"
    BROKER_UNREACHABLE = "broker_unreachable"
    REGISTRY_TOO_NEW = "registry_too_new"


class EdgeError(Exception):
    """Base of every error this project raises on purpose."""

    code: ErrorCode = ErrorCode.INSTALL_FAILED
    hint: str = ""

    def __init__(self, code: ErrorCode, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (f" ({self.hint})" if self.hint else "")

    def as_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message, "hint": self.hint}


class ConfigError(EdgeError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(ErrorCode.CONFIG_INVALID, f"{field}: {message}", "fix the field and restart")
        self.field = field


class ManifestRefused(EdgeError):
    """A manifest was not accepted; nothing on the device changed."""


class ControlPlaneError(EdgeError):
    """The control plane refused a request; nothing in the registry or on the broker changed."""


class DeploymentError(EdgeError):
    """A verified manifest could not be carried out; the previous image stays active."""

    #: Whether trying again later (same manifest) can succeed.
    retryable: bool = False


class DownloadError(DeploymentError):
    def __init__(self, code: ErrorCode, message: str, hint: str = "", retryable: bool = False) -> None:
        super().__init__(code, message, hint)
        self.retryable = retryable


class VerifyError(DeploymentError):
    pass


class InstallError(DeploymentError):
    pass
