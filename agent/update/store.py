"""The bundle store: content-addressed images on disk and the atomic switch between them.

Layout under ``root``::

    downloads/<sha256>.partial   bytes being downloaded (kept across restarts, to resume)
    staging/<sha256>.<random>/   an unpack in progress (removed at start-up if left by a crash)
    images/<sha256>/             unpacked, fsynced images; a directory appears here only complete
    envs/<sha256>/               the Python environment of an image that ships wheels (agent/serving/pyenv.py)
    current -> images/<sha256>   the active image (a symlink, replaced by rename: atomic)
    previous -> images/<sha256>  the image to roll back to

An image directory is created by renaming a fully written and fsynced staging directory, and
``current`` is switched by renaming a new symlink over it and fsyncing ``root``; so after a crash at
any instant ``current`` names either the old or the new image, complete, never something between.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from edge_core import faults
from edge_core.bundle import BUNDLE_METADATA, MAX_MEMBERS, MAX_METADATA_BYTES, parse_metadata
from edge_core.errors import ErrorCode, InstallError, VerifyError
from edge_core.fsutil import fsync_dir
from edge_core.log import get_logger

log = get_logger("store")


class BundleStore:
    def __init__(self, root: Path, keep_images: int = 2, fsync: bool = True) -> None:
        self.root = root
        self.keep_images = keep_images
        self.fsync = fsync
        self.downloads = root / "downloads"
        self.staging = root / "staging"
        self.images = root / "images"
        for d in (self.downloads, self.staging, self.images):
            d.mkdir(parents=True, exist_ok=True)
        # Anything in staging was left by a crash mid-unpack: it was never an image.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    # --- queries ---------------------------------------------------------------------------

    def partial_path(self, digest: str) -> Path:
        return self.downloads / f"{digest}.partial"

    def image_dir(self, digest: str) -> Path:
        return self.images / digest

    def has_image(self, digest: str) -> bool:
        return self.image_dir(digest).is_dir()

    def _pointer(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except FileNotFoundError:
            return None
        digest = PurePosixPath(target).name
        return digest if self.has_image(digest) else None

    def active(self) -> str | None:
        """Digest of the active image, read from the ``current`` symlink itself: the truth."""
        return self._pointer("current")

    def previous(self) -> str | None:
        return self._pointer("previous")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # --- install ---------------------------------------------------------------------------

    def install(self, digest: str, bundle: Path, name: str, version: str) -> Path:
        """Unpack a verified bundle into ``images/<digest>``; idempotent; refuses unsafe members."""
        final = self.image_dir(digest)
        if final.is_dir():
            return final
        stage = self.staging / f"{digest}.{secrets.token_hex(4)}"
        stage.mkdir()
        try:
            _safe_unpack(bundle, stage, name, version, self.fsync)
            faults.point("installing.before_rename")
            os.rename(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if self.fsync:
            fsync_dir(self.images)
        faults.point("installing.after_rename")
        bundle.unlink(missing_ok=True)
        return final

    def activate(self, digest: str) -> None:
        """Point ``current`` at an installed image; the old one becomes ``previous``."""
        if not self.has_image(digest):
            raise InstallError(
                ErrorCode.ACTIVATION_FAILED, f"image {digest[:12]} is not installed", "reinstall"
            )
        old = self.active()
        if old == digest:
            return
        if old is not None:
            self._set_pointer("previous", old)
        faults.point("activating.before_switch")
        self._set_pointer("current", digest)
        faults.point("activating.after_switch")

    def _set_pointer(self, name: str, digest: str) -> None:
        tmp = self.root / f".{name}.{secrets.token_hex(4)}"
        os.symlink(f"images/{digest}", tmp)
        os.replace(tmp, self.root / name)
        if self.fsync:
            fsync_dir(self.root)

    def gc(self, keep: set[str] | None = None) -> list[str]:
        """Delete images beyond ``keep_images`` (never current, previous or ``keep``), oldest first,
        and partial downloads not in ``keep`` or already installed. Returns the deleted digests."""
        pinned = {d for d in (self.active(), self.previous()) if d} | (keep or set())
        for tmp in self.root.glob(".current.*"):
            tmp.unlink(missing_ok=True)
        for tmp in self.root.glob(".previous.*"):
            tmp.unlink(missing_ok=True)
        # A partial download is worth keeping only for a deployment that will resume it (``keep``);
        # one whose image is installed is garbage whoever pins the image (a kill after the install's
        # rename and before the download's deletion leaves exactly that).
        for part in self.downloads.glob("*.partial"):
            digest = part.name.removesuffix(".partial")
            if digest not in (keep or set()) or self.has_image(digest):
                part.unlink(missing_ok=True)
        images = sorted(
            (p for p in self.images.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
        )
        room = max(self.keep_images - len(pinned & {p.name for p in images}), 0)
        deleted = []
        for p in images:
            if p.name in pinned:
                continue
            if room > 0:
                room -= 1
                continue
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p.name)
        # an image's Python environment (agent/serving/pyenv.py) goes with the image
        envs = self.root / "envs"
        if envs.is_dir():
            for env in envs.iterdir():
                if len(env.name) == 64 and env.is_dir() and not self.has_image(env.name):  # not temp dirs
                    shutil.rmtree(env, ignore_errors=True)
        if deleted:
            log.info("store.gc", deleted=[d[:12] for d in deleted])
        return deleted


def _unsafe(member: str, why: str) -> InstallError:
    return InstallError(
        ErrorCode.UNSAFE_ARCHIVE,
        f"bundle member {member!r} refused: {why}",
        "rebuild the bundle with `edge-deploy image build`; only regular files and directories are allowed",
    )


def _check_member(m: tarfile.TarInfo) -> PurePosixPath:
    name = m.name
    path = PurePosixPath(name)
    if not name or name.startswith("/") or path.is_absolute():
        raise _unsafe(name, "absolute path")
    if ".." in path.parts:
        raise _unsafe(name, "path escapes the bundle ('..')")
    if "\\" in name or "\x00" in name:
        raise _unsafe(name, "backslash or NUL in the name")
    if m.issym() or m.islnk():
        raise _unsafe(name, "links are not allowed")
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        raise _unsafe(name, "device files and FIFOs are not allowed")
    if m.issparse():
        raise _unsafe(name, "sparse files are not allowed")
    if not (m.isreg() or m.isdir()):
        raise _unsafe(name, f"unsupported member type {m.type!r}")
    return path


def _safe_unpack(bundle: Path, dest: Path, name: str, version: str, do_fsync: bool) -> None:
    """Unpack an uncompressed tar, checking every member before anything is written and every file's
    bytes against bundle.json's ``files`` as they are written.

    Refused: an unsafe member (``unsafe_archive``); a bundle.json that :func:`parse_metadata` refuses;
    a file present but not listed, listed but missing, of another size or another sha256
    (``bundle_invalid``). The digest of the whole archive was checked before this runs, so a mismatch
    here means the image was built wrong or tampered with before it was signed for.
    """
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            members = []
            for m in tar:
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    raise _unsafe(m.name, f"more than {MAX_MEMBERS} members")
    except tarfile.TarError as exc:
        raise VerifyError(
            ErrorCode.BUNDLE_INVALID, f"bundle is not a valid tar archive: {exc}", "rebuild"
        ) from None
    seen: dict[str, tarfile.TarInfo] = {}
    for m in members:
        path = _check_member(m)
        norm = "/".join(p for p in path.parts if p not in ("", "."))
        if norm in seen:
            raise _unsafe(m.name, "appears twice")
        seen[norm] = m
    meta_member = seen.get(BUNDLE_METADATA)
    if meta_member is None or not meta_member.isreg():
        raise VerifyError(ErrorCode.BUNDLE_INVALID, f"bundle has no {BUNDLE_METADATA}", "rebuild it")
    if meta_member.size > MAX_METADATA_BYTES:
        raise VerifyError(
            ErrorCode.BUNDLE_INVALID, f"{BUNDLE_METADATA} is {meta_member.size} bytes", "rebuild"
        )
    with open(bundle, "rb", buffering=0) as src:
        meta_bytes = os.pread(src.fileno(), meta_member.size, meta_member.offset_data)
        _, files = parse_metadata(meta_bytes, name, version)
        regular = {n for n, m in seen.items() if m.isreg() and n != BUNDLE_METADATA}
        if unlisted := sorted(regular - files.keys()):
            raise VerifyError(
                ErrorCode.BUNDLE_INVALID,
                f"bundle holds {unlisted[:5]} which {BUNDLE_METADATA} does not list",
                "rebuild the image with `edge-deploy image build`",
            )
        if missing := sorted(files.keys() - regular):
            raise VerifyError(
                ErrorCode.BUNDLE_INVALID,
                f"{BUNDLE_METADATA} lists {missing[:5]} which the bundle does not hold",
                "rebuild the image with `edge-deploy image build`",
            )
        for n in sorted(regular):
            if seen[n].size != files[n].size:
                raise VerifyError(
                    ErrorCode.BUNDLE_INVALID,
                    f"{n} is {seen[n].size} bytes, {BUNDLE_METADATA} says {files[n].size}",
                    "rebuild the image with `edge-deploy image build`",
                )

        dirs: set[Path] = {dest}
        for n, m in seen.items():
            target = dest.joinpath(*n.split("/")) if n else dest
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                dirs.add(target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(target.parent)
            mode = 0o755 if m.mode & stat.S_IXUSR else 0o644  # never setuid/setgid/sticky from an archive
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                digest = _copy_hashing(src.fileno(), fd, m.offset_data, m.size)
                if do_fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if n != BUNDLE_METADATA and digest != files[n].sha256:
                raise VerifyError(
                    ErrorCode.BUNDLE_INVALID,
                    f"{n} does not match its sha256 in {BUNDLE_METADATA}",
                    "the image's files were changed after it was built: rebuild it",
                )
    if do_fsync:
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)


#: Pieces of a member hashed and written at a time: large enough that hashlib releases the GIL and
#: the per-call cost vanishes, small enough to stay in the CPU's cache on the way to the disk.
_COPY_CHUNK = 1 << 20


def _copy_hashing(src: int, dst: int, offset: int, count: int) -> str:
    """Copy ``count`` bytes at ``offset`` of ``src`` to ``dst``; the sha256 of what was copied."""
    h = hashlib.sha256()
    done = 0
    while done < count:
        chunk = os.pread(src, min(_COPY_CHUNK, count - done), offset + done)
        if not chunk:
            raise VerifyError(ErrorCode.BUNDLE_INVALID, "bundle is truncated inside a member", "rebuild")
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        done += len(chunk)
    return h.hexdigest()
