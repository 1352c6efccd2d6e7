"""One exception tree for the whole project.

Every refusal that reaches an operator carries a stable ``code`` (an :class:`ErrorCode`), a message
that says what is wrong, and a hint that says what to do. Errors of dependencies (httpx, sqlite3,
paho, tarfile, cryptography) are translated into this tree at the boundary where they happen.

    EdgeError
    ├── ConfigError              bad or missing configuration (names the field)
    ├── ManifestRefused          a manifest failed parsing, schema, signature, expiry or replay checks
    ├── ControlPlaneError        edge-deploy refused an operator's request (deploy/)
    │   └── BuildError           ``image build`` refused its inputs (also a ValueError)
    ├── DeploymentError          a verified manifest could not be carried out
    │   ├── DownloadError        network, HTTP status, size cap, disk space
    │   ├── VerifyError          digest or bundle metadata mismatch
    │   └── InstallError         unsafe archive members, unpack or activation failures
    │       ├── ModelLoadError   a model would not load, or its smoke test failed
    │       ├── ImageEnvError    the image's Python environment could not be built
    │       └── ScoreInitFailed  score.py's import or init() failed in its workers
    ├── ScoringError             a score.py request could not be answered (``http_status``)
    │   ├── ScoreFailed          run() raised or returned what cannot be sent (500)
    │   │   └── ResultUnsendable what run() returned cannot be sent (500)
    │   ├── ScoreBadInput        the body cannot be run()'s input (400)
    │   │   └── ScoreRefused     nor its arguments (400, 405, 415; Azure ML's message)
    │   ├── ScoreTimeout         run() took too long (504)
    │   └── WorkerUnavailable    no worker could take it (503)
    ├── RequestRefused           a tensor request refused by the scoring API (``status``)
    ├── BlobError                a blob storage operation failed (``retryable``)
    ├── BufferUnavailable        the telemetry buffer's database failed
    └── StatusUnavailable        ``edge-agent status`` cannot read the state directory

Exceptions that only carry control flow inside one module (a retry, the next URL) are private to it
and never escape it.

The codes are part of the public contract (status documents, exit codes, docs/errors.md): never
rename one, only add.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # configuration
    CONFIG_INVALID = "config_invalid"
    # manifest refusals (verification is pure; see edge_core/manifest.py)
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
    # a bug or an unforeseen OS error below the deployer's entry points: reported, never fatal
    INTERNAL_ERROR = "internal_error"
    # score.py workers (agent/serving/worker.py) and per-image Python environments (agent/serving/pyenv.py)
    SCORE_INIT_FAILED = "score_init_failed"
    SCORE_FAILED = "score_failed"
    SCORE_BAD_INPUT = "score_bad_input"
    SCORE_TIMEOUT = "score_timeout"
    WORKER_UNAVAILABLE = "worker_unavailable"
    IMAGE_ENV_FAILED = "image_env_failed"
    # the local telemetry buffer (agent/telemetry/buffer/)
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
    BROKER_REFUSED = "broker_refused"
    PKI_MISSING = "pki_missing"
    ALREADY_EXISTS = "already_exists"
    CSR_INVALID = "csr_invalid"
    # fleet provisioning (deploy/provision.py answers them; agent/ops/provision.py logs them)
    PROVISIONING_REFUSED = "provisioning_refused"
    PROVISIONING_CONFLICT = "provisioning_conflict"
    PROVISIONING_REVOKED = "provisioning_revoked"
    PROVISIONING_TIMEOUT = "provisioning_timeout"
    HOME_MISSING = "home_missing"
    # the control plane's HTTP API (deploy/web/)
    UNAUTHORIZED = "unauthorized"
    NO_SUCH_ROUTE = "no_such_route"
    # requests to the local scoring API (agent/serving/scoring.py): answered 4xx/5xx, never reported
    BAD_REQUEST = "bad_request"
    MALFORMED_JSON = "malformed_json"
    BAD_TENSOR = "bad_tensor"
    WRONG_DATATYPE = "wrong_datatype"
    WRONG_SHAPE = "wrong_shape"
    MISSING_INPUT = "missing_input"
    UNKNOWN_INPUT = "unknown_input"
    AMBIGUOUS_MODEL = "ambiguous_model"
    INFERENCE_FAILED = "inference_failed"
    # the binary tensor data extension of /v2 (Triton's framing: docs/api.md)
    BAD_HEADER_LENGTH = "bad_header_length"
    BINARY_SIZE_MISMATCH = "binary_size_mismatch"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    # edge-agent status (agent/ops/status.py)
    STATE_UNREADABLE = "state_unreadable"


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


class BufferUnavailable(EdgeError):
    """The telemetry buffer cannot take or give records (its database failed); serving goes on."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(ErrorCode.BUFFER_UNAVAILABLE, message, hint or "see the agent's log (buffer.*)")


class StatusUnavailable(EdgeError):
    """``edge-agent status`` cannot read the state directory; the message says which path, the hint as
    whom to try again."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(ErrorCode.STATE_UNREADABLE, message, hint)


class BuildError(ControlPlaneError, ValueError):
    """``edge-deploy image build`` refused its inputs; nothing was written."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(ErrorCode.INVALID_ARGUMENT, message, hint)


class VerifyError(DeploymentError):
    pass


class InstallError(DeploymentError):
    pass


class ModelLoadError(InstallError):
    """A model could not be loaded or failed its smoke test; the serving image is untouched."""


class ImageEnvError(InstallError):
    """The image's environment could not be built; the serving image is untouched."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(
            ErrorCode.IMAGE_ENV_FAILED,
            message,
            hint or "ship wheels built for the device's Python and platform; they are installed offline",
        )


#: How much of score.py's traceback an init failure's message carries (the log has all of it).
TRACEBACK_LINES_IN_MESSAGE = 15


class ScoreInitFailed(InstallError):
    """The entry script's import or init() failed, crashed or timed out when its workers started.

    An InstallError, so the deployer rolls back to the image that is serving."""

    def __init__(self, message: str, traceback: str | None = None) -> None:
        tail = "\n".join((traceback or "").rstrip().splitlines()[-TRACEBACK_LINES_IN_MESSAGE:])
        super().__init__(
            ErrorCode.SCORE_INIT_FAILED,
            message + (f"\n{tail}" if tail else ""),
            "fix the scoring script's import or init(); the full traceback is in the agent's log",
        )
        self.traceback = traceback


class ScoringError(EdgeError):
    """A request the score.py workers could not answer with run()'s result. ``http_status`` is what
    the scoring API answers; ``traceback`` is the user's traceback where there is one."""

    http_status: int = 500
    error_code: ErrorCode = ErrorCode.SCORE_FAILED
    #: data-collection records the request made before it failed (agent/serving/worker.py)
    collected: tuple[Any, ...] = ()

    def __init__(self, message: str, hint: str = "", *, traceback: str | None = None) -> None:
        super().__init__(self.error_code, message, hint)
        self.traceback = traceback


class ScoreFailed(ScoringError):
    """run() raised, or returned something that cannot be sent back."""

    http_status = 500
    error_code = ErrorCode.SCORE_FAILED


class ScoreBadInput(ScoringError):
    """The request body is not UTF-8, so it cannot be run()'s ``raw_data`` string."""

    http_status = 400
    error_code = ErrorCode.SCORE_BAD_INPUT


class ScoreTimeout(ScoringError):
    http_status = 504
    error_code = ErrorCode.SCORE_TIMEOUT


class ScoreRefused(ScoreBadInput):
    """The request cannot be run()'s arguments, so run() was not called: a body that is not UTF-8,
    not JSON or not an object for a decorated run(), a missing parameter (400), a content type that
    is not JSON (415), a method run() does not take (405). The message is Azure ML's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, "send the request as the scoring script expects it (see /swagger.json)")
        self.http_status = status


class ResultUnsendable(ScoreFailed):
    """run() returned, but what it returned cannot be sent (e.g. ``bytes`` outside an AMLResponse)."""


class WorkerUnavailable(ScoringError):
    """No worker could take the request: crashed, restarting, all busy, or the pool is stopped."""

    http_status = 503
    error_code = ErrorCode.WORKER_UNAVAILABLE


class RequestRefused(EdgeError):
    """The scoring API refused a request to the tensor path (/v2, /score on an image without score.py):
    answered with ``status``, nothing recorded as a failure of the model."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.status = status


class BlobError(EdgeError):
    """A blob operation failed. ``retryable`` says whether the same call later can succeed.

    Retryable: timeouts, refused or reset connections, HTTP 5xx, 408 and 429, a full local disk.
    Not retryable: expired or insufficient credentials (403), a missing container or bucket (404), a
    missing blob (``get``), an invalid name or URL. The message never contains a SAS token or a
    signature: URLs in it are stripped of their query.
    """

    def __init__(self, code: ErrorCode, message: str, hint: str = "", *, retryable: bool = False) -> None:
        super().__init__(code, message, hint)
        self.retryable = retryable
