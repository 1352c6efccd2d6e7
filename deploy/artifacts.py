"""The artifact store: model files and image bundles, and the URLs devices download them from.

Behind it is a cloud_sync blob backend chosen by URL scheme, so the control plane stores artifacts
where the fleet's data already goes:

    file:///srv/edge/artifacts (or a path)   served by ``edge-deploy serve`` (or any static HTTP
                                             server with Range support) at ``public_url``
    https://<account>.blob.core.windows.net/<container>?<SAS>
                                             devices get the blob URL with the container's SAS
                                             (it must grant read; it expires with the SAS)
    s3://<bucket>/<prefix>                   devices get a presigned GET URL that expires after
                                             ``url_expiry`` seconds

Names are the registry's: ``models/<name>/<version>/<name>.onnx`` and
``images/<name>/<version>/<name>-<version>.tar``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.base import BlobBackend, check_name
from cloud_sync.factory import local_path, open_backend
from cloud_sync.pacing import PACE_CHUNK, TokenBucket
from edge_core.errors import BlobError, ConfigError

DEFAULT_URL_EXPIRY_S = 7 * 24 * 3600

#: progress(name, bytes sent, total bytes) while a put goes out
Progress = Callable[[str, int, int], None]


class _Meter(TokenBucket):
    """Counts the bytes of a put as the backend hands them to the wire or the disk; caps nothing.

    Every backend pays for what it writes in its bucket, piece by piece, so the bucket sees the
    upload's real progress (a retried put starts again from 0)."""

    def __init__(self) -> None:
        super().__init__(1e18, burst=PACE_CHUNK)
        self.on_bytes: Callable[[int], None] | None = None

    def take(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)


class ArtifactStore:
    def __init__(
        self,
        url: str,
        *,
        public_url: str | None = None,
        url_expiry: int = DEFAULT_URL_EXPIRY_S,
        **backend_opts: Any,
    ) -> None:
        #: The directory of a local store (what ``edge-deploy serve`` serves), else None.
        self.root = local_path(url)
        if self.root is not None:
            backend_opts.setdefault("create", True)
            if not public_url:
                raise ConfigError(
                    "artifacts.public_url",
                    "a local artifact store needs the URL devices download it from: run `edge-deploy serve` "
                    "and set this to its address (for example http://203.0.113.5:8700/)",
                )
            backend_opts["public_url"] = public_url
        self._meter = _Meter()
        self.backend: BlobBackend = open_backend(url, bandwidth=self._meter, **backend_opts)
        self.url_expiry = url_expiry

    def put_file(self, name: str, path: Path, progress: Progress | None = None) -> None:
        # Artifacts are written once under a name that includes their version; a retried put
        # replaces the same bytes.
        data = path.read_bytes()
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(name, sent, len(data))

        self._meter.on_bytes = count
        try:
            self.backend.put(check_name(name, "artifact name"), data)
        finally:
            self._meter.on_bytes = None

    def get(self, name: str) -> bytes:
        return self.backend.get(name)

    def get_file(self, name: str, dest: Path) -> Path:
        dest.write_bytes(self.backend.get(name))
        return dest

    def exists(self, name: str) -> bool:
        try:
            return name in self.backend.list(name)
        except BlobError:
            return False

    def delete(self, name: str) -> None:
        self.backend.delete(name)

    def download_url(self, name: str) -> str:
        """The URL a device downloads ``name`` from (no credentials needed beyond what it carries)."""
        return self.backend.download_url(check_name(name, "artifact name"), self.url_expiry)

    def close(self) -> None:
        self.backend.close()
