"""The bundle store on real files: safe unpack, content addressing, atomic switch, garbage collection."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from agent.update.store import BundleStore
from deploy import bundle
from edge_core.errors import ErrorCode, InstallError, VerifyError
from edge_core.fsutil import hash_file


def make_bundle(
    tmp: Path, name: str = "img", version: str = "1", payload: bytes = b"model"
) -> tuple[Path, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / f"model-{version}.onnx"
    src.write_bytes(payload)
    out = tmp / f"{name}-{version}.tar"
    return out, bundle.build(out, name, version, {"model.onnx": src})


def evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    files = (
        {member.name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
        if member.isreg()
        else {}
    )
    meta = json.dumps({"format": 1, "name": "img", "version": "1", "files": files}).encode()
    with tarfile.open(path, "w") as tar:
        ti = tarfile.TarInfo("bundle.json")
        ti.size = len(meta)
        tar.addfile(ti, io.BytesIO(meta))
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def test_build_is_reproducible(tmp_path: Path) -> None:
    a, da = make_bundle(tmp_path / "a")
    b, db = make_bundle(tmp_path / "b")
    assert da == db == hash_file(a) == hash_file(b)
    assert a.read_bytes() == b.read_bytes()


def test_install_activate_and_rollback_pointer(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    b1, d1 = make_bundle(tmp_path, version="1", payload=b"one")
    b2, d2 = make_bundle(tmp_path, version="2", payload=b"two")
    assert store.active() is None
    store.install(d1, b1, "img", "1")
    store.activate(d1)
    assert store.active() == d1 and store.previous() is None
    assert (tmp_path / "store/current/model.onnx").read_bytes() == b"one"
    assert not b1.exists()  # the verified bundle is consumed by the install
    store.install(d2, b2, "img", "2")
    store.activate(d2)
    assert (store.active(), store.previous()) == (d2, d1)
    assert os.readlink(tmp_path / "store/current") == f"images/{d2}"
    assert (tmp_path / "store/current/model.onnx").read_bytes() == b"two"


def test_metadata_must_match_the_manifest(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    b, d = make_bundle(tmp_path)
    with pytest.raises(VerifyError) as ei:
        store.install(d, b, "img", "2")
    assert ei.value.code == ErrorCode.BUNDLE_INVALID
    assert not store.has_image(d) and not list(store.staging.iterdir())


def _member(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("/etc/passwd", size=1), "absolute"),
        (_member("../../escape", size=1), ".."),
        (_member("a/../../escape", size=1), ".."),
        (_member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "links"),
        (_member("hard", tarfile.LNKTYPE, linkname="bundle.json"), "links"),
        (_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
        (_member("blk", tarfile.BLKTYPE, devmajor=8, devminor=0), "device"),
        (_member("fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, why: str) -> None:
    store = BundleStore(tmp_path / "store")
    path = evil_tar(tmp_path / "evil.tar", member, b"x" * member.size)
    digest = hash_file(path)
    with pytest.raises(InstallError) as ei:
        store.install(digest, path, "img", "1")
    assert ei.value.code == ErrorCode.UNSAFE_ARCHIVE
    assert why in ei.value.message
    assert not store.has_image(digest)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "store/escape").exists()


def test_setuid_bits_are_dropped(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    path = evil_tar(tmp_path / "b.tar", _member("run.sh", size=2, mode=0o6755), b"hi")
    d = hash_file(path)
    store.install(d, path, "img", "1")
    assert (store.image_dir(d) / "run.sh").stat().st_mode & 0o7777 == 0o755


def test_not_a_tar(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(VerifyError) as ei:
        store.install(hash_file(junk), junk, "img", "1")
    assert ei.value.code == ErrorCode.BUNDLE_INVALID


def test_gc_keeps_current_previous_and_budget(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store", keep_images=2)
    digests = []
    for v in range(1, 5):
        b, d = make_bundle(tmp_path, version=str(v), payload=str(v).encode())
        store.install(d, b, "img", str(v))
        store.activate(d)
        digests.append(d)
    store.partial_path("f" * 64).write_bytes(b"stale")
    deleted = store.gc()
    assert set(deleted) == set(digests[:2])
    assert {p.name for p in store.images.iterdir()} == set(digests[2:])
    assert (store.active(), store.previous()) == (digests[3], digests[2])
    assert not store.partial_path("f" * 64).exists()


def test_leftover_staging_is_cleared_at_start(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    (store.staging / "abc.123").mkdir()
    (store.staging / "abc.123" / "half").write_bytes(b"x")
    BundleStore(tmp_path / "store")
    assert not list(store.staging.iterdir())


def test_gc_removes_the_environments_of_deleted_images(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store", keep_images=2)
    digests = []
    for v in range(1, 4):
        b, d = make_bundle(tmp_path, version=str(v), payload=str(v).encode())
        store.install(d, b, "img", str(v))
        store.activate(d)
        (store.root / "envs" / d).mkdir(parents=True)
        digests.append(d)
    (store.root / "envs" / ".build-tmp").mkdir()
    store.gc()
    assert not (store.root / "envs" / digests[0]).exists()
    assert (store.root / "envs" / digests[2]).exists() and (store.root / "envs" / ".build-tmp").exists()
