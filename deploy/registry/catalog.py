"""Models and images: auto-incremented versions, tags and properties, and which models an image holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy.registry.backend import Db
from deploy.registry.names import check_name
from deploy.registry.store import LIVE_STATES, Store, dump, load, now, tag_filter
from edge_core.errors import ControlPlaneError, ErrorCode


@dataclass(frozen=True)
class Model:
    id: int
    name: str
    version: int
    sha256: str
    size: int
    artifact: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    tags: dict[str, str]
    properties: dict[str, Any]
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "sha256": self.sha256,
            "size": self.size,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "tags": self.tags,
            "properties": self.properties,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Image:
    id: int
    name: str
    version: int
    sha256: str
    size: int
    artifact: str
    has_score: bool
    tags: dict[str, str]
    properties: dict[str, Any]
    meta: dict[str, Any]
    created_at: float
    models: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "sha256": self.sha256,
            "size": self.size,
            "score_py": self.has_score,
            "models": list(self.models),
            "tags": self.tags,
            "properties": self.properties,
            "created_at": self.created_at,
        }


def _model(row: Mapping[str, Any]) -> Model:
    return Model(
        row["id"],
        row["name"],
        row["version"],
        row["sha256"],
        row["size"],
        row["artifact"],
        load(row["inputs"], []),
        load(row["outputs"], []),
        load(row["tags"], {}),
        load(row["properties"], {}),
        row["created_at"],
    )


def _filters(
    self_db: Db, alias: str, name: str | None, version: int | None, tags: Mapping[str, str] | None
) -> tuple[str, list[Any]]:
    """The WHERE clause of a search of models or images (``alias`` is the table's, with its dot)."""
    where, params = ["1 = 1"], list[Any]()
    if name:
        where.append(f"{alias}name = ?")
        params.append(name)
    if version is not None:
        where.append(f"{alias}version = ?")
        params.append(version)
    if tags:
        clause, p = tag_filter(self_db, f"{alias}tags", tags)
        where.append(clause)
        params += p
    return " AND ".join(where), params


class Catalog(Store):
    # -- models ------------------------------------------------------------------------------------

    def add_model(
        self,
        name: str,
        *,
        sha256: str,
        size: int,
        artifact_for: Any,
        inputs: list[dict[str, Any]],
        outputs: list[dict[str, Any]],
        tags: Mapping[str, str] | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> Model:
        """Register the next version of ``name``. ``artifact_for(version)`` stores the file and returns
        its artifact name; it runs inside the transaction, so a failed upload registers nothing."""
        check_name(name, "model name")
        with self.tx():
            version = self._next_version("models", name)
            artifact = artifact_for(version)
            row = {
                "id": self._next_id("models"),
                "name": name,
                "version": version,
                "sha256": sha256,
                "size": size,
                "artifact": artifact,
                "inputs": dump(inputs),
                "outputs": dump(outputs),
                "tags": dump(dict(tags or {})),
                "properties": dump(dict(properties or {})),
                "created_at": now(),
            }
            self._insert("models", [row])
        return self.model(name, version)

    def _next_version(self, table: str, name: str) -> int:
        # PostgreSQL: two replicas registering the same name would both read the same MAX
        self.db.lock(f"next_version:{table}")
        row = self.db.execute(f"SELECT MAX(version) FROM {table} WHERE name = ?", [name]).fetchone()
        return int(row[0] or 0) + 1

    def _versioned(self, table: str, name: str, version: int | None) -> dict[str, Any]:
        """The row of ``name:version`` (the latest version when None) of models or images."""
        what = table[:-1]
        check_name(name, f"{what} name")
        where, params = ("name = ? AND version = ?", [name, version]) if version else ("name = ?", [name])
        rows = self._rows(f"SELECT * FROM {table} WHERE {where} ORDER BY version DESC LIMIT 1", params)
        if rows:
            return rows[0]
        known = self._rows(f"SELECT version FROM {table} WHERE name = ? ORDER BY version", [name])
        have = ", ".join(str(r["version"]) for r in known)
        raise ControlPlaneError(
            ErrorCode.MODEL_NOT_FOUND if table == "models" else ErrorCode.IMAGE_NOT_FOUND,
            f"no {what} {name}" + (f":{version}" if version else "") + " is registered"
            + (f" (versions: {have})" if have else ""),
            f"see `edge-deploy {what} list`",
        )  # fmt: skip

    def model(self, name: str, version: int | None = None) -> Model:
        return _model(self._versioned("models", name, version))

    def models(
        self, name: str | None = None, version: int | None = None, tags: Mapping[str, str] | None = None
    ) -> list[Model]:
        where, params = _filters(self.db, "", name, version, tags)
        sql = f"SELECT * FROM models WHERE {where} ORDER BY name, version"
        return [_model(r) for r in self._rows(sql, params)]

    def delete_model(self, name: str, version: int) -> Model:
        m = self.model(name, version)
        with self.tx():
            users = self._rows(
                "SELECT i.name, i.version FROM images i JOIN image_models im ON im.image_id = i.id "
                "WHERE im.model_id = ? ORDER BY i.name, i.version",
                [m.id],
            )
            if users:
                names = ", ".join(f"{u['name']}:{u['version']}" for u in users)
                raise ControlPlaneError(
                    ErrorCode.IN_USE,
                    f"model {m.ref} is used by image(s) {names}",
                    "delete those images first (`edge-deploy image delete`), then the model",
                )
            self.db.execute("DELETE FROM models WHERE id = ?", [m.id])
        return m

    # -- images ------------------------------------------------------------------------------------

    def add_image(
        self,
        name: str,
        *,
        build: Any,
        models: Mapping[str, Model],
        tags: Mapping[str, str] | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> Image:
        """Register the next version of image ``name``. ``build(version)`` builds and stores the bundle
        and returns ``(sha256, size, artifact, bundle_meta)``; it runs inside the transaction."""
        check_name(name, "image name")
        with self.tx():
            version = self._next_version("images", name)
            sha256, size, artifact, meta = build(version)
            image_id = self._next_id("images")
            row = {
                "id": image_id,
                "name": name,
                "version": version,
                "sha256": sha256,
                "size": size,
                "artifact": artifact,
                "has_score": int(bool(meta.get("entry_script"))),
                "tags": dump(dict(tags or {})),
                "properties": dump(dict(properties or {})),
                "meta": dump(meta),
                "created_at": now(),
            }
            self._insert("images", [row])
            self._insert(
                "image_models",
                [{"image_id": image_id, "model_id": m.id, "alias": alias} for alias, m in models.items()],
            )
        return self.image(name, version)

    def _image(self, row: Mapping[str, Any]) -> Image:
        refs = self._rows(
            "SELECT m.name, m.version FROM image_models im JOIN models m ON m.id = im.model_id "
            "WHERE im.image_id = ? ORDER BY m.name, m.version",
            [row["id"]],
        )
        return Image(
            row["id"],
            row["name"],
            row["version"],
            row["sha256"],
            row["size"],
            row["artifact"],
            bool(row["has_score"]),
            load(row["tags"], {}),
            load(row["properties"], {}),
            load(row["meta"], {}),
            row["created_at"],
            tuple(f"{r['name']}:{r['version']}" for r in refs),
        )

    def image(self, name: str, version: int | None = None) -> Image:
        return self._image(self._versioned("images", name, version))

    def image_by_id(self, image_id: int) -> Image:
        return self._image(self._rows("SELECT * FROM images WHERE id = ?", [image_id])[0])

    def image_by_sha(self, sha256: str) -> Image | None:
        rows = self._rows("SELECT * FROM images WHERE sha256 = ? ORDER BY id DESC LIMIT 1", [sha256])
        return self._image(rows[0]) if rows else None

    def images(
        self,
        name: str | None = None,
        version: int | None = None,
        tags: Mapping[str, str] | None = None,
        model: tuple[str, int | None] | None = None,
    ) -> list[Image]:
        clause, params = _filters(self.db, "i.", name, version, tags)
        where = [clause]
        if model is not None:
            sub = (
                "SELECT im.image_id FROM image_models im JOIN models m ON m.id = im.model_id WHERE m.name = ?"
            )
            params.append(model[0])
            if model[1] is not None:
                sub += " AND m.version = ?"
                params.append(model[1])
            where.append(f"i.id IN ({sub})")
        sql = f"SELECT i.* FROM images i WHERE {' AND '.join(where)} ORDER BY i.name, i.version"
        return [self._image(r) for r in self._rows(sql, params)]

    def delete_image(self, name: str, version: int) -> Image:
        img = self.image(name, version)
        with self.tx():
            users = self._rows(
                "SELECT id, state FROM deployments WHERE image_id = ? ORDER BY created_at", [img.id]
            )
            users += self._rows(
                "SELECT DISTINCT d.id, d.state FROM deployment_devices dd JOIN deployments d "
                f"ON d.id = dd.deployment_id WHERE {self.db.json_field('dd.previous')} = ? "
                "AND d.state IN (?, ?, ?)",
                [self.db.json_key("sha256"), img.sha256, *LIVE_STATES],
            )
            if users:
                names = ", ".join(sorted({f"{u['id']} ({u['state']})" for u in users}))
                raise ControlPlaneError(
                    ErrorCode.IN_USE,
                    f"image {img.ref} is used by deployment(s) {names}",
                    "deployments keep their history; deploy another image, then delete this one only "
                    "if no deployment names it",
                )
            self.db.execute("DELETE FROM image_models WHERE image_id = ?", [img.id])
            self.db.execute("DELETE FROM images WHERE id = ?", [img.id])
        return img
