"""cloud_sync: blob storage for the agent's telemetry and captured model inputs/outputs.

One small interface (:class:`BlobBackend`) with one backend per module, chosen by URL scheme by
:func:`open_backend`: a local directory (``local.py``), Azure Blob Storage through a SAS URL
(``azure.py``) and S3 with Signature Version 4 (``s3.py``). See docs/cloud_sync.md.
"""

from cloud_sync.backend import (
    BlobBackend,
    BlobError,
    RetryingBackend,
    TokenBucket,
    check_name,
    open_backend,
)

__all__ = ["BlobBackend", "BlobError", "RetryingBackend", "TokenBucket", "check_name", "open_backend"]
