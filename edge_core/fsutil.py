"""Hashing and atomic writes, for the device and the control plane alike.

A file written with :func:`atomic_write` is seen by readers as the old content or the new, never
part of either: the bytes go to a temporary file in the same directory (created with the final
mode, so a private key never exists with looser permissions), are flushed, renamed over the target,
and with ``durable`` the directory is fsynced so that the rename survives a power cut.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

CHUNK = 4 << 20


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_chunks(path: Path, limit: int | None = None, size: int = CHUNK) -> Iterator[bytes]:
    """The file's bytes (or its first ``limit`` bytes) in large chunks."""
    remaining = limit
    with open(path, "rb", buffering=0) as f:
        while remaining is None or remaining > 0:
            chunk = f.read(size if remaining is None else min(size, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def hash_file(path: Path) -> str:
    """The sha256 of the file's bytes, in hex."""
    h = hashlib.sha256()
    for chunk in file_chunks(path):
        h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
