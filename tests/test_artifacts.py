"""The artifact store on every backend: what the control plane stores, a device downloads with the
URL the manifest carries, by the agent's own fetcher (resuming with Range), without credentials of
its own: the control plane's HTTP endpoint for a local store, the blob URL with the container SAS on
Azure (Azurite), a presigned GET URL on S3 (moto; the presigned signatures themselves are checked
against botocore in test_cloud_sync.py, since moto cannot verify them)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest_blob import Azurite, MotoS3

from agent.config import DownloadConfig
from agent.update.fetch import Fetcher
from cloud_sync.s3 import S3Backend
from deploy.artifacts import ArtifactStore
from edge_core.errors import ConfigError
from simulators.bundle_server import BundleServer

DATA = os.urandom(3 * 1024 * 1024 + 17)
NAME = "images/iris/3/iris-3.tar"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto"), auth=False).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "azure", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    server = None
    if request.param == "local":
        root = tmp_path / "artifacts"
        server = BundleServer(root).start()  # what `edge-deploy serve` runs over the store
        s = ArtifactStore(str(root), public_url=server.url)
    elif request.param == "azure":
        azurite: Azurite = request.getfixturevalue("azurite")
        container = f"a-{uuid.uuid4().hex[:10]}"
        azurite.create_container(container)
        s = ArtifactStore(azurite.container_url(container), retries=0)
    else:
        moto: MotoS3 = request.getfixturevalue("moto")
        opts = {
            "endpoint_url": moto.endpoint,
            "access_key_id": moto.credentials.access_key_id,
            "secret_access_key": moto.credentials.secret_access_key,
        }
        bucket = f"b-{uuid.uuid4().hex[:10]}"
        setup = S3Backend.from_url(f"s3://{bucket}", **opts)
        setup.create_bucket()
        setup.close()
        s = ArtifactStore(f"s3://{bucket}/cp", url_expiry=600, retries=0, **opts)
    yield s
    s.close()
    if server is not None:
        server.stop()


def test_a_device_downloads_an_artifact_by_its_manifest_url(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "bundle.tar"
    src.write_bytes(DATA)
    seen: list[int] = []
    store.put_file(NAME, src, lambda name, sent, total: seen.append(sent) if total == len(DATA) else None)
    assert seen and seen[-1] == len(DATA) and seen == sorted(seen)  # what the CLI's progress bar shows
    assert store.exists(NAME) and not store.exists(NAME + ".other")
    url = store.download_url(NAME)

    # the agent's fetcher, resuming from a partial file as after a cut transfer
    partial = tmp_path / "dl.partial"
    partial.write_bytes(DATA[:1_000_000])
    fetcher = Fetcher(DownloadConfig(timeout=10, retries=2, backoff_min=0.05, backoff_max=0.1))
    try:
        digest = fetcher.fetch([url], partial, len(DATA))
    finally:
        fetcher.close()
    assert digest == hashlib.sha256(DATA).hexdigest()
    assert partial.read_bytes() == DATA

    r = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == DATA[10:20]
    assert store.get(NAME) == DATA


def test_a_local_store_needs_the_url_devices_reach_it_at(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        ArtifactStore(str(tmp_path / "a"))  # local, and no URL devices could reach it at
    assert exc.value.field == "artifacts.public_url"


def test_uploads_show_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    from simulators import models

    model = models.mlp(tmp_path / "m.onnx", sizes=(64, 1024, 10))
    server = BundleServer(tmp_path / "home" / "artifacts").start()
    try:
        (tmp_path / "home").mkdir(exist_ok=True)
        (tmp_path / "home" / "config.toml").write_text(f'[artifacts]\npublic_url = "{server.url}/"\n')
        for tty in (True, False):
            master, slave = os.openpty()
            r = subprocess.run(
                [sys.executable, "-m", "deploy.cli", "--home", str(tmp_path / "home"), "model", "register",
                 "m", str(model), "--json"],
                stdout=subprocess.PIPE, stderr=slave if tty else subprocess.PIPE, timeout=60,
            )  # fmt: skip
            os.close(slave)
            err = os.read(master, 65536).decode() if tty else r.stderr.decode()
            os.close(master)
            assert r.returncode == 0, err
            assert ("uploading models/m/" in err) == tty, err
            assert "MiB" in err if tty else err == ""
    finally:
        server.stop()
