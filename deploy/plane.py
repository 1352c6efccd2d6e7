"""The control plane's operations, for the CLI and for programs: one object over the registry, the
artifact store, the broker connection and the signing key, each opened when first needed."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy import bundle, signer
from deploy.artifacts import ArtifactStore, Progress
from deploy.config import ControlPlaneConfig
from deploy.publisher import OperatorClient
from deploy.registry import Image, Model, Registry, check_name
from deploy.rollout import Driver, Policy, command, plan_waves, summary
from edge_core.errors import BuildError, ControlPlaneError, ErrorCode
from edge_core.fsutil import hash_file


def _readable(path: Path, what: str) -> Path:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except IsADirectoryError:
        raise ControlPlaneError(
            ErrorCode.FILE_UNREADABLE, f"{what} {path} is a directory", "name a file"
        ) from None
    except OSError as exc:
        raise ControlPlaneError(
            ErrorCode.FILE_UNREADABLE,
            f"cannot read {what} {path}: {exc.strerror or exc}",
            "check the path and its permissions",
        ) from None
    return path


class ControlPlane:
    def __init__(self, cfg: ControlPlaneConfig) -> None:
        self.cfg = cfg
        self._registry: Registry | None = None
        self._artifacts: ArtifactStore | None = None
        self._op: OperatorClient | None = None
        #: set by `edge-deploy serve`: its replicas share the heartbeats (publisher.py)
        self.heartbeat_group: str | None = None

    def close(self) -> None:
        if self._op is not None:
            self._op.close()
        if self._artifacts is not None:
            self._artifacts.close()
        if self._registry is not None:
            self._registry.close()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.cfg.registry_location)
        return self._registry

    @property
    def artifacts(self) -> ArtifactStore:
        if self._artifacts is None:
            self._artifacts = ArtifactStore(
                self.cfg.artifacts_url,
                public_url=self.cfg.public_url,
                url_expiry=self.cfg.artifacts.url_expiry,
            )
        return self._artifacts

    @property
    def fleet(self) -> OperatorClient:
        """The operator's broker connection, with the devices' retained reports in the registry."""
        if self._op is None:
            self.cfg.validate_broker()
            b = self.cfg.broker
            op = OperatorClient(
                b.host, b.port, ca=b.ca, cert=b.cert, key=b.key, prefix=b.prefix,
                heartbeat_group=self.heartbeat_group,
            )  # fmt: skip
            op.keep_log = True
            try:
                op.connect(b.connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise ControlPlaneError(
                    ErrorCode.BROKER_UNREACHABLE,
                    f"cannot reach the broker at {b.host}:{b.port}: {exc}",
                    "check [broker] in config.toml (host, port, ca, cert, key) and that the broker runs",
                ) from None
            op.settle()
            self._op = op
            self.ingest()
        return self._op

    def ingest(self) -> None:
        if self._op is not None:
            self.registry.ingest(self._op.drain())

    def driver(self) -> Driver:
        key = signer.load_private(_readable(self.cfg.signing_key, "signing key"))
        return Driver(self.registry, self.fleet, key, self.artifacts, ingest=self.ingest)

    # -- models ------------------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        path: Path,
        tags: Mapping[str, str],
        properties: Mapping[str, Any],
        progress: Progress | None = None,
    ) -> Model:
        check_name(name, "model name")
        _readable(path, "model file")
        try:
            inputs, outputs = bundle.read_signature(path)
        except BuildError as exc:
            raise ControlPlaneError(
                ErrorCode.MODEL_INVALID,
                f"{path} is not a usable ONNX model: {exc}",
                "export the model to ONNX (with its weights inside the file) and register that file",
            ) from None
        sha, size = hash_file(path), path.stat().st_size

        def store(version: int) -> str:
            artifact = f"models/{name}/{version}/{name}.onnx"
            self.artifacts.put_file(artifact, path, progress)
            return artifact

        return self.registry.add_model(
            name,
            sha256=sha,
            size=size,
            artifact_for=store,
            inputs=inputs,
            outputs=outputs,
            tags=tags,
            properties=properties,
        )

    # -- images ------------------------------------------------------------------------------------

    def build_image(
        self,
        name: str,
        model_refs: Sequence[tuple[str, str, int | None]],
        *,
        score: Path | None = None,
        include: Sequence[Path] = (),
        wheels: Sequence[Path] = (),
        tags: Mapping[str, str] | None = None,
        properties: Mapping[str, Any] | None = None,
        smoke_test: bundle.SmokeTest | None = None,
        progress: Progress | None = None,
    ) -> Image:
        """Build an image from registered models (alias, name, version or None for the latest)."""
        check_name(name, "image name")
        for p in (score, *include, *wheels):
            if p is not None:
                _readable(p, "file")
        models = {alias: self.registry.model(n, v) for alias, n, v in model_refs}
        if not models:
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT, "an image needs at least one model", "add --model"
            )
        with tempfile.TemporaryDirectory(prefix="edge-image-") as tmp:
            work = Path(tmp)
            files = []
            for alias, m in models.items():
                dest = work / f"{alias}.onnx"
                self.artifacts.get_file(m.artifact, dest)
                if hash_file(dest) != m.sha256:
                    raise ControlPlaneError(
                        ErrorCode.MODEL_INVALID,
                        f"the stored file of model {m.ref} does not match its registered sha256",
                        "the artifact store was changed behind the registry; register the model again",
                    )
                files.append((alias, dest))

            def build(version: int) -> tuple[str, int, str, dict[str, Any]]:
                out = work / f"{name}-{version}.tar"
                try:
                    built = bundle.build_image(
                        out,
                        name,
                        str(version),
                        files,
                        score=score,
                        include=include,
                        wheels=wheels,
                        tags=tags,
                        smoke_test=smoke_test,
                    )
                except BuildError as exc:
                    raise ControlPlaneError(
                        ErrorCode.INVALID_ARGUMENT, str(exc), "fix the input and build again"
                    ) from None
                artifact = f"images/{name}/{version}/{out.name}"
                self.artifacts.put_file(artifact, out, progress)
                return built.sha256, built.size, artifact, bundle.read_metadata(out)

            return self.registry.add_image(name, build=build, models=models, tags=tags, properties=properties)

    def export_image(self, image: Image, dest: Path) -> Path:
        self.artifacts.get_file(image.artifact, dest)
        return dest

    # -- devices -----------------------------------------------------------------------------------

    def devices(self, tags: Mapping[str, str] | None = None, refresh: bool = True) -> list[dict[str, Any]]:
        if refresh:
            _ = self.fleet
            self.ingest()  # reports that arrived since the connection was made
        return self.registry.devices(tags)

    # -- deployments -------------------------------------------------------------------------------

    def resolve_target(self, device_ids: Sequence[str], tags: Mapping[str, str]) -> list[str]:
        if bool(device_ids) == bool(tags):
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT,
                "name the target either by device ids or by a tag query, not both and not neither",
                "use --device ID (repeatable) or --tag-query key=value[,key=value]",
            )
        if device_ids:
            for d in device_ids:
                self.registry.device(d)  # refuses an unknown id
            return list(dict.fromkeys(device_ids))
        ids = [d["id"] for d in self.registry.devices(tags)]
        if not ids:
            query = ",".join(f"{k}={v}" for k, v in tags.items())
            raise ControlPlaneError(
                ErrorCode.NO_MATCHING_DEVICES,
                f"the tag query {query!r} matches no device",
                "see `edge-deploy device list` for the devices and their tags; "
                "tag them with `edge-deploy device tag`",
            )
        return ids

    def create_deployment(
        self,
        image: Image,
        device_ids: Sequence[str],
        tags: Mapping[str, str],
        policy: Policy,
        sections: Mapping[str, Any] | None = None,
        *,
        refresh: bool = True,
    ) -> str:
        """``refresh=False`` where the registry is kept current already (`serve`'s HTTP API)."""
        if refresh:
            self.devices()  # devices learned before the target is resolved
        ids = self.resolve_target(device_ids, tags)
        target: dict[str, Any] = {"devices": list(device_ids)} if device_ids else {"tags": dict(tags)}
        dep_id = f"dep-{uuid.uuid4().hex[:10]}"
        self.registry.create_deployment(
            dep_id,
            image,
            target,
            ids,
            policy.as_dict(),
            dict(sections or {}),
            plan_waves(len(ids), policy),
        )
        return dep_id

    def plan_deployment(
        self, image: Image, device_ids: Sequence[str], tags: Mapping[str, str], policy: Policy
    ) -> dict[str, Any]:
        """What create_deployment would do, writing and publishing nothing: the waves, and per device
        the manifest's image (each is signed and published only when its wave starts)."""
        self.devices()
        ids = self.resolve_target(device_ids, tags)
        waves, start = [], 0
        for i, n in enumerate(plan_waves(len(ids), policy), 1):
            waves.append({"wave": i, "devices": ids[start : start + n]})
            start += n
        manifests = [
            {
                "device": d,
                "image": image.ref,
                "sha256": image.sha256,
                "size": image.size,
                "artifact": image.artifact,
            }
            for d in ids
        ]
        return {
            "dry_run": True,
            "image": image.ref,
            "policy": policy.as_dict(),
            "waves": waves,
            "manifests": manifests,
        }

    def command(self, dep_id: str, cmd: str) -> dict[str, Any]:
        return command(self.registry, dep_id, cmd)

    def summary(self, dep_id: str) -> dict[str, Any]:
        out = summary(self.registry, dep_id)
        out["events"] = self.registry.events(dep_id)
        return out
