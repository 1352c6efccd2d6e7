"""A local directory as a blob store: removable media, a network mount, or tests.

A put writes a temporary file beside the target, fsyncs it, renames it over the name and fsyncs the
directory: after a crash or power loss the name holds the old bytes or the new ones, never a torn
file. Names map to paths below the root (``a/b/c`` -> ``<root>/a/b/c``); ``..`` and absolute names
are refused before a path is built, and symlinks are not followed when listing.

One difference from object stores: a name cannot also be a "directory" of other names (``a`` and
``a/b`` cannot coexist), because they are a file and a directory here.
"""

from __future__ import annotations

import errno
import os
import secrets
import urllib.parse
from pathlib import Path

from cloud_sync.base import check_name, check_prefix
from cloud_sync.pacing import TokenBucket, paced
from edge_core.errors import BlobError, ErrorCode
from edge_core.fsutil import fsync_dir

#: Temporary files of puts in progress start with this; listings skip them and names may not use it.
TMP_PREFIX = ".cloud-sync-tmp-"


class LocalBackend:
    def __init__(
        self,
        root: Path | str,
        *,
        throttle: TokenBucket | None = None,
        fsync: bool = True,
        create: bool = False,
        public_url: str | None = None,
    ) -> None:
        """``create``: make the root directory if it is missing. Off by default: a missing root is
        usually an unmounted disk, and writing into the empty mount point would fill the root fs.
        ``public_url``: the address this directory is served from (``edge-deploy serve``), for
        :meth:`download_url`."""
        self.root = Path(root).absolute()
        self.public_url = public_url.rstrip("/") + "/" if public_url else None
        self.throttle = throttle
        self.fsync = fsync
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._os_error(exc, "create", str(self.root)) from None

    # -- the interface -------------------------------------------------------------------------------

    def download_url(self, name: str, expires_s: int = 0) -> str:
        """``public_url`` + the quoted name. A directory's URL does not expire: whoever serves it
        decides who may read it."""
        check_name(name)
        if self.public_url is None:
            raise BlobError(
                ErrorCode.BLOB_CONFIG_INVALID,
                f"the local store {self.root} has no URL that devices can download from",
                "run `edge-deploy serve` and set artifacts.public_url to its address "
                "(for example http://203.0.113.5:8700/)",
            )
        return self.public_url + urllib.parse.quote(name, safe="/")

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(name)
        try:
            self._check_root()
            # A concurrent delete may remove an emptied parent directory between makedirs and the
            # temporary file's creation; one more try then finds it gone and makes it again.
            for attempt in range(2):
                self._makedirs(path.parent)
                try:
                    self._write(path, data)
                    return
                except FileNotFoundError:
                    if attempt:
                        raise
        except OSError as exc:
            raise self._os_error(exc, "put", name) from None

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._check_root()
            raise BlobError(
                ErrorCode.BLOB_NOT_FOUND,
                f"blob {name!r} does not exist in {self.root}",
                "list the directory to see what is there",
            ) from None
        except OSError as exc:
            raise self._os_error(exc, "get", name) from None

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        self._check_root()
        # Walk only the directory the prefix's complete segments name: "logs/2026-1" -> root/logs.
        start_rel = prefix.rpartition("/")[0]
        start = self.root / start_rel if start_rel else self.root
        names: list[str] = []

        def fail(exc: OSError) -> None:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # the prefix's directory is absent
                raise exc

        try:
            for dirpath, dirnames, filenames in os.walk(start, onerror=fail):
                rel = os.path.relpath(dirpath, self.root)
                base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
                for f in filenames:
                    full = base + f
                    if not f.startswith(TMP_PREFIX) and full.startswith(prefix):
                        names.append(full)
        except OSError as exc:
            raise self._os_error(exc, "list", prefix) from None
        return sorted(names)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            self._check_root()
            return
        except IsADirectoryError:
            return  # "a" when only "a/b" exists: there is no blob "a"
        except OSError as exc:
            raise self._os_error(exc, "delete", name) from None
        try:
            if self.fsync:
                fsync_dir(path.parent)
            # Remove parents left empty, so that deleting old batches does not leave a tree of empty
            # directories behind; rmdir refuses a directory that is not empty, which stops the climb.
            parent = path.parent
            while parent != self.root:
                parent.rmdir()
                parent = parent.parent
        except OSError:
            pass

    def close(self) -> None:
        pass

    # -- helpers -------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        check_name(name)
        if any(part.startswith(TMP_PREFIX) for part in name.split("/")):
            raise BlobError(
                ErrorCode.BLOB_INVALID_NAME,
                f"blob name {name!r} is not allowed: {TMP_PREFIX!r} marks temporary files",
                "choose another name",
            )
        return self.root.joinpath(*name.split("/"))

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise BlobError(
                ErrorCode.BLOB_CONTAINER_NOT_FOUND,
                f"storage directory {self.root} does not exist or is not a directory",
                "create it, or mount the disk it lives on",
            )

    def _makedirs(self, directory: Path) -> None:
        """mkdir -p, fsyncing the parent of every directory made, so the new path survives power loss."""
        missing: list[Path] = []
        d = directory
        while d != self.root and not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "a blob of this name exists", str(d)) from None
                continue
            if self.fsync:
                fsync_dir(d.parent)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                # Without a cap, write straight from the caller's buffer (no copy); with one, in paced
                # pieces, each paid for before it is written.
                for piece in [data] if self.throttle is None else paced(data, self.throttle):
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view[: 1 << 20]) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            fsync_dir(path.parent)

    def _os_error(self, exc: OSError, op: str, name: str) -> BlobError:
        where = f"local {op} {name!r} in {self.root}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return BlobError(
                ErrorCode.BLOB_UNAVAILABLE,
                f"{where}: no space left on the storage device",
                "free space on the device that holds the directory",
                retryable=True,
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return BlobError(
                ErrorCode.BLOB_ACCESS_DENIED,
                f"{where}: {exc.strerror}",
                "give the agent's user write access to the directory (or remount it read-write)",
            )
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
            return BlobError(
                ErrorCode.BLOB_REQUEST_FAILED,
                f"{where}: a blob and a directory of that name would collide ({exc.strerror})",
                "in a local directory, a name cannot also be the prefix of other names ('a' and 'a/b')",
            )
        if exc.errno == errno.ENOENT:
            return BlobError(
                ErrorCode.BLOB_CONTAINER_NOT_FOUND,
                f"{where}: {exc.strerror}",
                "create the storage directory, or mount the disk it lives on",
            )
        # EIO and the like: a removable disk pulled out, a network mount that went away. Maybe back.
        return BlobError(
            ErrorCode.BLOB_UNAVAILABLE, f"{where}: {exc.strerror}", "check the storage device", retryable=True
        )
