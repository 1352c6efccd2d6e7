"""Devices, as their retained reports describe them, and the inference windows of their heartbeats."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deploy.registry.store import Store, dump, load, now, tag_filter
from edge_core.errors import ControlPlaneError, ErrorCode

#: Heartbeat windows older than this are deleted: gates look at minutes, not days.
HEARTBEAT_RETENTION_S = 24 * 3600


def _device(row: Mapping[str, Any]) -> dict[str, Any]:
    status = load(row["status"])
    return {
        "id": row["id"],
        "tags": load(row["tags"], {}),
        "online": bool(row["online"]),
        "last_seen": row["last_seen"],
        "inventory": load(row["inventory"]),
        "status": status,
        "active": (status or {}).get("active"),
    }


def _number(value: Any) -> float | None:
    """A device's p99 as a float, or None when it sent none or something else: a bad value must
    neither fail the whole batch nor reach the gates."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Devices(Store):
    def observe_device(self, device_id: str, kind: str, doc: Mapping[str, Any]) -> None:
        """Learn a device from one of its retained reports (inventory, online, status)."""
        t = now()
        with self.tx():
            # Every replica ingests every retained report: the row is created at most once (ON
            # CONFLICT: both databases), then read locked, so two replicas' updates do not mix.
            self.db.execute(
                "INSERT INTO devices (id, tags, online, last_seen, inventory, status, last_generation, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [device_id, "{}", 0, None, None, None, 0, t],
            )
            rec = self._rows(f"SELECT * FROM devices WHERE id = ?{self.db.for_update}", [device_id])[0]
            if kind == "inventory":
                rec["inventory"] = dump(doc)
                rec["last_seen"] = t
            elif kind == "online":
                rec["online"] = int(bool(doc.get("online")))
                rec["last_seen"] = t
            elif kind == "status":
                rec["status"] = dump(doc)
                gen = doc.get("generation")
                if isinstance(gen, int) and gen > (rec["last_generation"] or 0):
                    rec["last_generation"] = gen
            self.db.execute(
                "UPDATE devices SET online = ?, last_seen = ?, inventory = ?, status = ?, "
                "last_generation = ? WHERE id = ?",
                [
                    rec["online"],
                    rec["last_seen"],
                    rec["inventory"],
                    rec["status"],
                    rec["last_generation"],
                    device_id,
                ],
            )

    def ingest(self, reports: Sequence[tuple[str, str, float, Mapping[str, Any]]]) -> None:
        """Reports as the operator's connection received them: devices learned, heartbeats kept."""
        beats = [(d, ts, doc) for d, kind, ts, doc in reports if kind == "heartbeat"]
        latest: dict[tuple[str, str], Mapping[str, Any]] = {}
        for d, kind, _ts, doc in reports:
            if kind in ("inventory", "online", "status"):
                latest[(d, kind)] = doc
        with self.tx():
            # in one order (device, kind) in every replica: row locks taken in different orders by
            # two transactions would deadlock on PostgreSQL
            for (d, kind), doc in sorted(latest.items(), key=lambda item: item[0]):
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
        where, params = "1 = 1", list[Any]()
        if tags:
            where, params = tag_filter(self.db, "tags", tags)
        return [_device(r) for r in self._rows(f"SELECT * FROM devices WHERE {where} ORDER BY id", params)]

    def provision_device(self, device_id: str, tags: Mapping[str, str]) -> dict[str, Any]:
        """Record a device the provisioning handler issued a certificate to, with its policy's tags
        (merged over any it has: a re-asked answer must not undo an operator's ``device tag``)."""
        with self.tx():
            self.db.execute(
                "INSERT INTO devices (id, tags, online, last_seen, inventory, status, last_generation, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [device_id, "{}", 0, None, None, None, 0, now()],
            )
        return self.tag_device(device_id, tags)

    def tag_device(
        self, device_id: str, set_tags: Mapping[str, str], remove: Sequence[str] = ()
    ) -> dict[str, Any]:
        dev = self.device(device_id)
        tags = {k: v for k, v in {**dev["tags"], **set_tags}.items() if k not in remove}
        with self.tx():
            self.db.execute("UPDATE devices SET tags = ? WHERE id = ?", [dump(tags), device_id])
        return self.device(device_id)

    def next_generations(self, device_ids: Sequence[str]) -> dict[str, int]:
        """For each device, a generation above every one it has seen: the registry's count, its
        reported status and the clock (milliseconds), so a lost or restored registry still issues
        growing generations. One transaction for a whole wave."""
        floor = int(now() * 1000)
        out = {}
        with self.tx():
            # sorted, as in ingest(): one lock order everywhere; the rows locked, so a generation is
            # issued once even when two replicas ask for the same device at once
            for device_id in sorted(device_ids):
                row = self.db.execute(
                    f"SELECT last_generation FROM devices WHERE id = ?{self.db.for_update}", [device_id]
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
                        "p99_ms": _number(w.get("p99_ms")),
                    }
                )
        with self.tx():
            self._insert("heartbeats", rows)
            self.db.execute("DELETE FROM heartbeats WHERE ts < ?", [now() - HEARTBEAT_RETENTION_S])

    def heartbeats(self, device_ids: Sequence[str], since: float, until: float) -> list[dict[str, Any]]:
        if not device_ids:
            return []
        marks = ",".join("?" * len(device_ids))
        return self._rows(
            f"SELECT * FROM heartbeats WHERE device_id IN ({marks}) AND ts >= ? AND ts <= ? ORDER BY ts",
            [*device_ids, since, until],
        )
