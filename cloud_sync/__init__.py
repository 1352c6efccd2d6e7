"""cloud_sync: a blob storage library (a local directory, Azure Blob Storage, S3), no agent logic.

:mod:`cloud_sync.base` is the interface, :mod:`cloud_sync.factory` picks a backend by URL scheme,
:mod:`cloud_sync.retry` and :mod:`cloud_sync.pacing` wrap any of them. See docs/cloud_sync.md.
"""
