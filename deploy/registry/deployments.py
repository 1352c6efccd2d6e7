"""Deployments: their devices and waves, their history (events), commands and the driver's lease."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deploy.registry.catalog import Catalog, Image
from deploy.registry.store import LIVE_STATES, dump, load, now
from edge_core.errors import ControlPlaneError, ErrorCode


class LeaseLost(Exception):
    """Another driver holds the deployment's lease: this one must not act on it."""


def _deployment(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for k in ("target", "policy", "sections"):
        out[k] = load(row[k], {})
    return out


class Deployments(Catalog):
    """On top of the catalog: a deployment names an image, and is searched by its image or model."""

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
        t = now()
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
            row = {
                "id": dep_id,
                "image_id": image.id,
                "target": dump(target),
                "policy": dump(policy),
                "sections": dump(sections),
                "state": "running",
                "reason": None,
                "command": None,
                "wave": 0,
                "phase": "start",
                "phase_since": t,
                "lease_owner": None,
                "lease_until": 0.0,
                "created_at": t,
                "updated_at": t,
            }
            self._insert("deployments", [row])
            rows, i = [], 0
            for w, size in enumerate(waves, start=1):
                for device_id in device_ids[i : i + size]:
                    rows.append(
                        {"deployment_id": dep_id, "device_id": device_id, "wave": w, "state": "pending"}
                    )
                i += size
            self._insert("deployment_devices", rows)
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
        where: list[str] = ["1 = 1"]
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
            # the row locked (PostgreSQL) until the command is cleared: two replicas never both take it
            row = self.db.execute(
                f"SELECT command FROM deployments WHERE id = ?{self.db.for_update}", [dep_id]
            ).fetchone()
            if row and row[0]:
                self.db.execute("UPDATE deployments SET command = NULL WHERE id = ?", [dep_id])
                return str(row[0])
        return None

    def update_deployment(self, dep_id: str, **fields: Any) -> None:
        fields["updated_at"] = now()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx():
            self.db.execute(f"UPDATE deployments SET {cols} WHERE id = ?", [*fields.values(), dep_id])

    def members(self, dep_id: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT * FROM deployment_devices WHERE deployment_id = ? ORDER BY wave, device_id", [dep_id]
        )
        for r in rows:
            r["previous"] = load(r["previous"])
            r["error"] = load(r["error"])
        return rows

    def outbox(self, dep_id: str) -> list[tuple[str, bytes]]:
        """Manifests recorded for the deployment's devices and not yet acknowledged by the broker
        (migration 0002), as (device, the exact envelope)."""
        rows = self.db.execute(
            "SELECT device_id, outbox FROM deployment_devices WHERE deployment_id = ? "
            "AND outbox IS NOT NULL ORDER BY device_id",
            [dep_id],
        ).fetchall()
        return [(str(d), str(env).encode()) for d, env in rows]

    def clear_outbox(self, dep_id: str, items: Sequence[tuple[str, bytes]]) -> None:
        """The broker acknowledged these envelopes. Only the same bytes are cleared: a newer
        manifest recorded in the meantime (a rollback) stays to be published."""
        with self.tx():
            self.db.executemany(
                "UPDATE deployment_devices SET outbox = NULL WHERE deployment_id = ? AND device_id = ? "
                "AND outbox = ?",
                [(dep_id, d, env.decode()) for d, env in items],
            )

    def update_member(self, dep_id: str, device_id: str, **fields: Any) -> None:
        for k in ("previous", "error"):
            if k in fields and fields[k] is not None:
                fields[k] = dump(fields[k])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx():
            self.db.execute(
                f"UPDATE deployment_devices SET {cols} WHERE deployment_id = ? AND device_id = ?",
                [*fields.values(), dep_id, device_id],
            )

    # -- history -----------------------------------------------------------------------------------

    def event(self, dep_id: str, kind: str, detail: Mapping[str, Any] | None = None) -> None:
        with self.tx():
            row = {
                "id": self._next_id("events"),
                "deployment_id": dep_id,
                "ts": now(),
                "kind": kind,
                "detail": dump(dict(detail or {})),
            }
            self._insert("events", [row])

    def events(self, dep_id: str) -> list[dict[str, Any]]:
        rows = self._rows("SELECT ts, kind, detail FROM events WHERE deployment_id = ? ORDER BY id", [dep_id])
        for r in rows:
            r["detail"] = load(r["detail"], {})
        return rows

    # -- the driver's lease ------------------------------------------------------------------------

    def take_lease(self, dep_id: str, owner: str, ttl: float) -> bool:
        """Whether ``owner`` now drives the deployment (one driver at a time, across processes)."""
        t = now()
        with self.tx():
            cur = self.db.execute(
                "UPDATE deployments SET lease_owner = ?, lease_until = ? WHERE id = ? "
                "AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)",
                [owner, t + ttl, dep_id, owner, t],
            )
            return cur.rowcount == 1

    def hold_lease(self, dep_id: str, owner: str) -> None:
        """Inside a write transaction: refuse (LeaseLost) when another driver holds a lease on the
        deployment that has not run out, and keep it from being taken until the transaction ends.

        The fence in front of a publication. A driver that stalled past its lease (a long GC, a
        paused VM) must not publish for a step that another replica has taken over: it would issue
        a second generation for the same devices. The row is locked (PostgreSQL: FOR UPDATE; SQLite:
        the write lock of BEGIN IMMEDIATE), so take_lease() of another replica waits for this
        transaction, and sees what it recorded. No lease at all (a driver stepping a deployment
        directly, as tests do) is not refused: there is no one to be fenced off from."""
        row = self.db.execute(
            f"SELECT lease_owner, lease_until FROM deployments WHERE id = ?{self.db.for_update}", [dep_id]
        ).fetchone()
        if row is None:
            return
        holder, until = row[0], float(row[1] or 0)
        if holder is not None and holder != owner and until >= now():
            raise LeaseLost(f"deployment {dep_id} is driven by {holder} now, not {owner}")

    def release_lease(self, dep_id: str, owner: str) -> None:
        with self.tx():
            self.db.execute(
                "UPDATE deployments SET lease_owner = NULL, lease_until = 0 WHERE id = ? AND lease_owner = ?",
                [dep_id, owner],
            )
