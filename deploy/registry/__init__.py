"""The control plane's registry: models, images, devices and deployments, in one SQLite file.

sqlite-utils on WAL, with numbered migrations recorded in ``PRAGMA user_version``: opening an older
registry upgrades it in one transaction, and a registry written by a newer edge-deploy is refused
(``registry_too_new``) instead of being misread.

    models              name + auto-incremented version, sha256, the ONNX signature, tags, properties
    images              name + auto-incremented version, the bundle's sha256/size, tags, properties
    image_models        which model versions an image was built from (delete refused while used)
    devices             learned from the devices' retained reports; tags set by the operator
    deployments         image -> target (device ids or a tag query), rollout policy, state, lease
    deployment_devices  each device's wave, generation, outcome and the image it had before
    events              every deployment's history
    heartbeats          per-device inference windows (the health gates' evidence), kept for a while

Every refusal is a ControlPlaneError with a stable code; nothing is written when one is raised.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_core.errors import ControlPlaneError, ErrorCode

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
#: Heartbeat windows older than this are deleted: gates look at minutes, not days.
HEARTBEAT_RETENTION_S = 24 * 3600

#: Deployment states in which a deployment still owns its devices (docs/control-plane.md).
LIVE_STATES = ("running", "paused", "rolling_back")


def _now() -> float:
    return time.time()


def _j(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _unj(text: str | None, default: Any = None) -> Any:
    return json.loads(text) if text else default


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} {name!r} is not a valid name",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def parse_tags(items: Iterable[str], what: str = "tag") -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a key given twice or without ``=`` is refused."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not TAG_KEY_RE.fullmatch(key):
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what} {item!r} is not KEY=VALUE",
                f"write it as key=value; keys match {TAG_KEY_RE.pattern}",
            )
        if key in out:
            raise ControlPlaneError(
                ErrorCode.INVALID_ARGUMENT, f"{what} {key!r} is given twice", "give it once"
            )
        out[key] = value.strip()
    return out


def parse_ref(ref: str, what: str) -> tuple[str, int | None]:
    """``name`` (the latest version) or ``name:version``."""
    name, sep, version = ref.partition(":")
    check_name(name, what)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ControlPlaneError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} {ref!r}: the version must be a positive integer",
            f"write {name}:<version>, or {name} for the latest version",
        )
    return name, int(version)


def _tag_filter(column: str, tags: Mapping[str, str]) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for k, v in tags.items():
        clauses.append(f"json_extract({column}, ?) = ?")
        params += ["$." + json.dumps(k), v]
    return " AND ".join(clauses), params


def _filters(
    alias: str, name: str | None, version: int | None, tags: Mapping[str, str] | None
) -> tuple[str, list[Any]]:
    """The WHERE clause of a search of models or images (``alias`` is the table's, with its dot)."""
    where, params = ["1"], list[Any]()
    if name:
        where.append(f"{alias}name = ?")
        params.append(name)
    if version is not None:
        where.append(f"{alias}version = ?")
        params.append(version)
    if tags:
        clause, p = _tag_filter(f"{alias}tags", tags)
        where.append(clause)
        params += p
    return " AND ".join(where), params


# -- migrations ----------------------------------------------------------------------------------------


def _m1(db: sqlite_utils.Database) -> None:
    db["models"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "name": str,
            "version": int,
            "sha256": str,
            "size": int,
            "artifact": str,
            "inputs": str,
            "outputs": str,
            "tags": str,
            "properties": str,
            "created_at": float,
        },
        pk="id",
        not_null={"name", "version", "sha256", "artifact"},
    )
    db["models"].create_index(["name", "version"], unique=True)  # type: ignore[union-attr]
    db["images"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "name": str,
            "version": int,
            "sha256": str,
            "size": int,
            "artifact": str,
            "has_score": int,
            "tags": str,
            "properties": str,
            "meta": str,
            "created_at": float,
        },
        pk="id",
        not_null={"name", "version", "sha256", "artifact"},
    )
    db["images"].create_index(["name", "version"], unique=True)  # type: ignore[union-attr]
    db["images"].create_index(["sha256"])  # type: ignore[union-attr]
    db["image_models"].create(  # type: ignore[union-attr]
        {"image_id": int, "model_id": int, "alias": str},
        pk=("image_id", "model_id"),
        foreign_keys=[("image_id", "images", "id"), ("model_id", "models", "id")],
    )
    db["devices"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "tags": str,
            "online": int,
            "last_seen": float,
            "inventory": str,
            "status": str,
            "last_generation": int,
            "created_at": float,
        },
        pk="id",
    )
    db["deployments"].create(  # type: ignore[union-attr]
        {
            "id": str,
            "image_id": int,
            "target": str,
            "policy": str,
            "sections": str,
            "state": str,
            "reason": str,
            "command": str,
            "wave": int,
            "phase": str,
            "phase_since": float,
            "lease_owner": str,
            "lease_until": float,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        foreign_keys=[("image_id", "images", "id")],
    )
    db["deployments"].create_index(["image_id"])  # type: ignore[union-attr]
    db["deployment_devices"].create(  # type: ignore[union-attr]
        {
            "deployment_id": str,
            "device_id": str,
            "wave": int,
            "state": str,
            "generation": int,
            "manifest_sha256": str,
            "previous": str,
            "revert_generation": int,
            "published_at": float,
            "finished_at": float,
            "error": str,
        },
        pk=("deployment_id", "device_id"),
        foreign_keys=[("deployment_id", "deployments", "id")],
    )
    db["deployment_devices"].create_index(["device_id"])  # type: ignore[union-attr]
    db["events"].create(  # type: ignore[union-attr]
        {"id": int, "deployment_id": str, "ts": float, "kind": str, "detail": str}, pk="id"
    )
    db["events"].create_index(["deployment_id", "id"])  # type: ignore[union-attr]
    db["heartbeats"].create(  # type: ignore[union-attr]
        {
            "device_id": str,
            "ts": float,
            "model": str,
            "version": str,
            "requests": int,
            "errors": int,
            "p99_ms": float,
        },
    )
    db["heartbeats"].create_index(["device_id", "ts"])  # type: ignore[union-attr]


MIGRATIONS = [_m1]


# -- records -------------------------------------------------------------------------------------------


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
        _unj(row["inputs"], []),
        _unj(row["outputs"], []),
        _unj(row["tags"], {}),
        _unj(row["properties"], {}),
        row["created_at"],
    )


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        try:
            self._migrate()
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction (BEGIN IMMEDIATE: two edge-deploy processes never interleave)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield self.db
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.tx():
            have = self.db.execute("PRAGMA user_version").fetchone()[0]
            if have > len(MIGRATIONS):
                raise ControlPlaneError(
                    ErrorCode.REGISTRY_TOO_NEW,
                    f"the registry {self.path} has schema version {have}; this edge-deploy knows "
                    f"up to {len(MIGRATIONS)}",
                    "upgrade edge-deploy; the registry was written by a newer one",
                )
            for n in range(have, len(MIGRATIONS)):
                MIGRATIONS[n](self.db)
            if have != len(MIGRATIONS):
                self.db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, list(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

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
            self.db["models"].insert(  # type: ignore[union-attr]
                {
                    "name": name,
                    "version": version,
                    "sha256": sha256,
                    "size": size,
                    "artifact": artifact,
                    "inputs": _j(inputs),
                    "outputs": _j(outputs),
                    "tags": _j(dict(tags or {})),
                    "properties": _j(dict(properties or {})),
                    "created_at": _now(),
                }
            )
        return self.model(name, version)

    def _next_version(self, table: str, name: str) -> int:
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
        where, params = _filters("", name, version, tags)
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
            image_id = (
                self.db["images"]
                .insert(  # type: ignore[union-attr]
                    {
                        "name": name,
                        "version": version,
                        "sha256": sha256,
                        "size": size,
                        "artifact": artifact,
                        "has_score": int(bool(meta.get("entry_script"))),
                        "tags": _j(dict(tags or {})),
                        "properties": _j(dict(properties or {})),
                        "meta": _j(meta),
                        "created_at": _now(),
                    }
                )
                .last_pk
            )
            for alias, m in models.items():
                self.db["image_models"].insert(  # type: ignore[union-attr]
                    {"image_id": image_id, "model_id": m.id, "alias": alias}
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
            _unj(row["tags"], {}),
            _unj(row["properties"], {}),
            _unj(row["meta"], {}),
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
        clause, params = _filters("i.", name, version, tags)
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
                "ON d.id = dd.deployment_id WHERE json_extract(dd.previous, '$.sha256') = ? "
                "AND d.state IN (?, ?, ?)",
                [img.sha256, *LIVE_STATES],
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

    # -- devices -----------------------------------------------------------------------------------

    def observe_device(self, device_id: str, kind: str, doc: Mapping[str, Any]) -> None:
        """Learn a device from one of its retained reports (inventory, online, status)."""
        now = _now()
        with self.tx():
            row = self._rows("SELECT * FROM devices WHERE id = ?", [device_id])
            rec: dict[str, Any] = (
                row[0]
                if row
                else {
                    "id": device_id,
                    "tags": "{}",
                    "online": 0,
                    "last_seen": None,
                    "inventory": None,
                    "status": None,
                    "last_generation": 0,
                    "created_at": now,
                }
            )
            if kind == "inventory":
                rec["inventory"] = _j(doc)
                rec["last_seen"] = now
            elif kind == "online":
                rec["online"] = int(bool(doc.get("online")))
                rec["last_seen"] = now
            elif kind == "status":
                rec["status"] = _j(doc)
                gen = doc.get("generation")
                if isinstance(gen, int) and gen > (rec["last_generation"] or 0):
                    rec["last_generation"] = gen
            self.db["devices"].upsert(rec, pk="id")  # type: ignore[union-attr]

    def ingest(self, reports: Sequence[tuple[str, str, float, Mapping[str, Any]]]) -> None:
        """Reports as the operator's connection received them: devices learned, heartbeats kept."""
        beats = [(d, ts, doc) for d, kind, ts, doc in reports if kind == "heartbeat"]
        latest: dict[tuple[str, str], Mapping[str, Any]] = {}
        for d, kind, _ts, doc in reports:
            if kind in ("inventory", "online", "status"):
                latest[(d, kind)] = doc
        with self.tx():
            for (d, kind), doc in latest.items():
                self.observe_device(d, kind, doc)
            if beats:
                self.add_heartbeats(beats)

    def device(self, device_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM devices WHERE id = ?", [device_id])
        if not rows:
            raise ControlPlaneError(
                ErrorCode.DEVICE_NOT_FOUND,
                f"no device {device_id!r} has reported to this control plane",
                "a device is learned when its agent connects to the broker; see `edge-deploy device list`",
            )
        return _device(rows[0])

    def devices(self, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        where, params = "1", list[Any]()
        if tags:
            where, params = _tag_filter("tags", tags)
        return [_device(r) for r in self._rows(f"SELECT * FROM devices WHERE {where} ORDER BY id", params)]

    def tag_device(
        self, device_id: str, set_tags: Mapping[str, str], remove: Sequence[str] = ()
    ) -> dict[str, Any]:
        dev = self.device(device_id)
        tags = {k: v for k, v in {**dev["tags"], **set_tags}.items() if k not in remove}
        with self.tx():
            self.db.execute("UPDATE devices SET tags = ? WHERE id = ?", [_j(tags), device_id])
        return self.device(device_id)

    def next_generations(self, device_ids: Sequence[str]) -> dict[str, int]:
        """For each device, a generation above every one it has seen: the registry's count, its
        reported status and the clock (milliseconds), so a lost or restored registry still issues
        growing generations. One transaction for a whole wave."""
        floor = int(_now() * 1000)
        out = {}
        with self.tx():
            for device_id in device_ids:
                row = self.db.execute(
                    "SELECT last_generation FROM devices WHERE id = ?", [device_id]
                ).fetchone()
                gen = max((int(row[0] or 0) if row else 0) + 1, floor)
                self.db.execute("UPDATE devices SET last_generation = ? WHERE id = ?", [gen, device_id])
                out[device_id] = gen
        return out

    def next_generation(self, device_id: str) -> int:
        return self.next_generations([device_id])[device_id]

    # -- heartbeats --------------------------------------------------------------------------------

    def add_heartbeats(self, beats: Sequence[tuple[str, float, Mapping[str, Any]]]) -> None:
        """Heartbeats as (device, time received, document). The control plane's receive time is kept,
        not the device's clock: windows of several devices line up even when their clocks are skewed."""
        rows = []
        for device_id, ts, beat in beats:
            for w in (beat.get("models") or {}).values():
                if not isinstance(w, Mapping):
                    continue
                rows.append(
                    {
                        "device_id": device_id,
                        "ts": float(ts),
                        "model": str(w.get("model")),
                        "version": str(w.get("version")),
                        "requests": int(w.get("requests") or 0),
                        "errors": int(w.get("errors") or 0),
                        "p99_ms": w.get("p99_ms"),
                    }
                )
        with self.tx():
            if rows:
                self.db["heartbeats"].insert_all(rows)  # type: ignore[union-attr]
            self.db.execute("DELETE FROM heartbeats WHERE ts < ?", [_now() - HEARTBEAT_RETENTION_S])

    def heartbeats(self, device_ids: Sequence[str], since: float, until: float) -> list[dict[str, Any]]:
        if not device_ids:
            return []
        marks = ",".join("?" * len(device_ids))
        return self._rows(
            f"SELECT * FROM heartbeats WHERE device_id IN ({marks}) AND ts >= ? AND ts <= ? ORDER BY ts",
            [*device_ids, since, until],
        )

    # -- deployments -------------------------------------------------------------------------------

    def busy_devices(self, device_ids: Sequence[str]) -> dict[str, str]:
        """Devices of ``device_ids`` that a live deployment owns -> that deployment's id."""
        if not device_ids:
            return {}
        marks = ",".join("?" * len(device_ids))
        rows = self._rows(
            f"SELECT dd.device_id, d.id FROM deployment_devices dd JOIN deployments d "
            f"ON d.id = dd.deployment_id WHERE d.state IN (?, ?, ?) AND dd.device_id IN ({marks})",
            [*LIVE_STATES, *device_ids],
        )
        return {r["device_id"]: r["id"] for r in rows}

    def create_deployment(
        self,
        dep_id: str,
        image: Image,
        target: Mapping[str, Any],
        device_ids: Sequence[str],
        policy: Mapping[str, Any],
        sections: Mapping[str, Any],
        waves: Sequence[int],
    ) -> None:
        now = _now()
        with self.tx():
            busy = self.busy_devices(device_ids)
            if busy:
                owners = sorted(set(busy.values()))
                raise ControlPlaneError(
                    ErrorCode.DEVICE_BUSY,
                    f"{len(busy)} device(s) ({', '.join(sorted(busy)[:5])}"
                    f"{', ...' if len(busy) > 5 else ''}) belong to the live deployment(s) "
                    f"{', '.join(owners)}",
                    "one rollout per device at a time: wait for it, or `edge-deploy deploy abort` it first",
                )
            self.db["deployments"].insert(  # type: ignore[union-attr]
                {
                    "id": dep_id,
                    "image_id": image.id,
                    "target": _j(target),
                    "policy": _j(policy),
                    "sections": _j(sections),
                    "state": "running",
                    "reason": None,
                    "command": None,
                    "wave": 0,
                    "phase": "start",
                    "phase_since": now,
                    "lease_owner": None,
                    "lease_until": 0.0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            rows, i = [], 0
            for w, size in enumerate(waves, start=1):
                for device_id in device_ids[i : i + size]:
                    rows.append(
                        {"deployment_id": dep_id, "device_id": device_id, "wave": w, "state": "pending"}
                    )
                i += size
            self.db["deployment_devices"].insert_all(rows)  # type: ignore[union-attr]
            self.event(dep_id, "created", {"image": image.ref, "target": dict(target), "waves": list(waves)})

    def deployment(self, dep_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM deployments WHERE id = ?", [dep_id])
        if not rows:
            raise ControlPlaneError(
                ErrorCode.DEPLOYMENT_NOT_FOUND,
                f"no deployment {dep_id!r}",
                "see `edge-deploy deploy list`",
            )
        return _deployment(rows[0])

    def deployments(
        self,
        image: tuple[str, int | None] | None = None,
        model: tuple[str, int | None] | None = None,
        device: str | None = None,
        state: str | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = ["1"]
        params: list[Any] = []
        if image is not None:
            ids = [i.id for i in self.images(name=image[0], version=image[1])]
            where.append(f"image_id IN ({','.join('?' * len(ids)) or 'NULL'})")
            params += ids
        if model is not None:
            ids = [i.id for i in self.images(model=model)]
            where.append(f"image_id IN ({','.join('?' * len(ids)) or 'NULL'})")
            params += ids
        if device is not None:
            where.append("id IN (SELECT deployment_id FROM deployment_devices WHERE device_id = ?)")
            params.append(device)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        sql = f"SELECT * FROM deployments WHERE {' AND '.join(where)} ORDER BY created_at, id"
        return [_deployment(r) for r in self._rows(sql, params)]

    def newer_deployments(self, dep_id: str) -> set[str]:
        """Deployments created after ``dep_id`` that published to one of its devices."""
        rows = self._rows(
            "SELECT DISTINCT later.deployment_id AS id FROM deployment_devices mine "
            "JOIN deployment_devices later ON later.device_id = mine.device_id "
            "JOIN deployments d ON d.id = later.deployment_id "
            "WHERE mine.deployment_id = ? AND mine.state != 'pending' AND later.state != 'pending' "
            "AND d.created_at > (SELECT created_at FROM deployments WHERE id = ?)",
            [dep_id, dep_id],
        )
        return {r["id"] for r in rows}

    def take_command(self, dep_id: str) -> str | None:
        """The operator's pending command, cleared in the same transaction (none is lost to a race)."""
        with self.tx():
            row = self.db.execute("SELECT command FROM deployments WHERE id = ?", [dep_id]).fetchone()
            if row and row[0]:
                self.db.execute("UPDATE deployments SET command = NULL WHERE id = ?", [dep_id])
                return str(row[0])
        return None

    def update_deployment(self, dep_id: str, **fields: Any) -> None:
        fields["updated_at"] = _now()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx():
            self.db.execute(f"UPDATE deployments SET {cols} WHERE id = ?", [*fields.values(), dep_id])

    def members(self, dep_id: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT * FROM deployment_devices WHERE deployment_id = ? ORDER BY wave, device_id", [dep_id]
        )
        for r in rows:
            r["previous"] = _unj(r["previous"])
            r["error"] = _unj(r["error"])
        return rows

    def update_member(self, dep_id: str, device_id: str, **fields: Any) -> None:
        for k in ("previous", "error"):
            if k in fields and fields[k] is not None:
                fields[k] = _j(fields[k])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx():
            self.db.execute(
                f"UPDATE deployment_devices SET {cols} WHERE deployment_id = ? AND device_id = ?",
                [*fields.values(), dep_id, device_id],
            )

    def event(self, dep_id: str, kind: str, detail: Mapping[str, Any] | None = None) -> None:
        with self.tx():
            self.db["events"].insert(  # type: ignore[union-attr]
                {"deployment_id": dep_id, "ts": _now(), "kind": kind, "detail": _j(dict(detail or {}))}
            )

    def events(self, dep_id: str) -> list[dict[str, Any]]:
        rows = self._rows("SELECT ts, kind, detail FROM events WHERE deployment_id = ? ORDER BY id", [dep_id])
        for r in rows:
            r["detail"] = _unj(r["detail"], {})
        return rows

    def take_lease(self, dep_id: str, owner: str, ttl: float) -> bool:
        """Whether ``owner`` now drives the deployment (one driver at a time, across processes)."""
        now = _now()
        with self.tx():
            cur = self.db.execute(
                "UPDATE deployments SET lease_owner = ?, lease_until = ? WHERE id = ? "
                "AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
                [owner, now + ttl, dep_id, owner, now],
            )
            return cur.rowcount == 1

    def release_lease(self, dep_id: str, owner: str) -> None:
        with self.tx():
            self.db.execute(
                "UPDATE deployments SET lease_owner = NULL, lease_until = 0 WHERE id = ? AND lease_owner = ?",
                [dep_id, owner],
            )


def _device(row: Mapping[str, Any]) -> dict[str, Any]:
    status = _unj(row["status"])
    return {
        "id": row["id"],
        "tags": _unj(row["tags"], {}),
        "online": bool(row["online"]),
        "last_seen": row["last_seen"],
        "inventory": _unj(row["inventory"]),
        "status": status,
        "active": (status or {}).get("active"),
    }


def _deployment(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for k in ("target", "policy", "sections"):
        out[k] = _unj(row[k], {})
    return out
