"""The disk budget inside the writer's transaction: budget.py decides when and how many bytes, this
deletes the victims in SQLite and shrinks a file left over its cap (docs/buffer.md, "Eviction").

Eviction is a handful of statements whatever it deletes: the victims are found by window functions
inside SQLite, never stepped through row by row in Python, because every step would release the GIL,
and under a busy hot path each release costs the writer up to 5 ms.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from agent.telemetry.buffer import budget
from agent.telemetry.buffer.budget import ROW_OVERHEAD, Group, Sizing
from agent.telemetry.buffer.records import DropReason, RecordClass
from agent.telemetry.buffer.schema import table, used_pages
from edge_core.log import get_logger

log = get_logger("buffer")

#: Evictions of one transaction by (class, "budget"): [records, payload bytes].
Evicted = dict[tuple[str, str], list[int]]

# One statement for every class's (class, stored priority) pairs: the input of budget.groups().
_GROUPS_SQL: Final = " UNION ALL ".join(
    f"SELECT '{cls}', NULL FROM (SELECT 1 FROM {table(cls)} WHERE priority IS NULL LIMIT 1) "
    f"UNION ALL SELECT DISTINCT '{cls}', priority FROM {table(cls)} WHERE priority IS NOT NULL"
    for cls in RecordClass
)


def enforce(
    w: sqlite3.Connection,
    sizing: Sizing,
    class_priority: Mapping[str, int],
    est: int | None,
    rows: int,
    nbytes: int,
    incremental: bool,
) -> tuple[int | None, dict[tuple[str, str], tuple[int, int]], int]:
    """After a transaction's inserts of ``rows`` records and ``nbytes``: when the used pages pass the
    high-water mark, delete lowest-priority oldest records until they are under the low-water mark.
    ``est`` is an upper bound of the used pages before the inserts (None: unknown). Returns the new
    bound, the evictions per (class, "budget"), and the pages to shrink the file by after the
    commit."""
    evicted: Evicted = {}
    if est is not None:
        est = sizing.estimate(est, rows, nbytes)
        if not sizing.must_evict(est):
            return est, {}, 0
    used, total = used_pages(w)
    if sizing.must_evict(used):
        while need := sizing.to_free(used):
            if not evict(w, need, class_priority, evicted):
                break  # nothing left to evict: the schema alone is over budget (it never is)
            used, total = used_pages(w)
    return used, {k: (r, b) for k, (r, b) in evicted.items()}, sizing.shrink_by(total, incremental)


def _where(g: Group) -> tuple[str, tuple[int, ...]]:
    return ("priority IS NULL", ()) if g.stored is None else ("priority = ?", (g.stored,))


def evict(w: sqlite3.Connection, need: int, class_priority: Mapping[str, int], evicted: Evicted) -> bool:
    """Delete at least ``need`` bytes (payload + ROW_OVERHEAD per row) of the lowest-priority
    records, oldest first: in seq order within one group; by ts across the groups of that
    priority when there are several. False when there is nothing left to delete."""
    level = budget.lowest(budget.groups(w.execute(_GROUPS_SQL), class_priority))
    if not level:
        return False
    if len(level) == 1:
        cls = level[0].cls
        cond, args = _where(level[0])
        t = table(cls)
        # The window streams along the primary key and stops at the first row that reaches
        # ``need``: the cost is the prefix deleted, not the table.
        row = w.execute(
            "SELECT seq, n, bytes FROM (SELECT seq, row_number() OVER win AS n, "
            "sum(length(payload)) OVER win AS bytes, "
            f"sum(length(payload) + {ROW_OVERHEAD}) OVER win AS run "
            f"FROM {t} WHERE {cond} WINDOW win AS (ORDER BY seq ROWS UNBOUNDED PRECEDING)) "
            "WHERE run >= ? LIMIT 1",
            (*args, need),
        ).fetchone()
        if row is None:  # the whole group is less than needed: all of it goes
            row = w.execute(
                f"SELECT max(seq), count(*), coalesce(sum(length(payload)), 0) FROM {t} WHERE {cond}",
                args,
            ).fetchone()
        last, count, nbytes = row
        deleted = w.execute(f"DELETE FROM {t} WHERE {cond} AND seq <= ?", (*args, last)).rowcount
        _count(evicted, cls, deleted, count, nbytes)
        return True
    # Several groups share the lowest priority: find the ts up to which they hold ``need``
    # bytes, then delete every row of theirs up to it (this sorts them: a rare configuration).
    wheres = [(g.cls, *_where(g)) for g in level]
    union = " UNION ALL ".join(
        f"SELECT ts, length(payload) + {ROW_OVERHEAD} AS size FROM {table(cls)} WHERE {cond}"
        for cls, cond, _ in wheres
    )
    params = [a for _, _, args in wheres for a in args]
    row = w.execute(
        f"SELECT ts FROM (SELECT ts, sum(size) OVER (ORDER BY ts ROWS UNBOUNDED PRECEDING) AS run "
        f"FROM ({union})) WHERE run >= ? LIMIT 1",
        (*params, need),
    ).fetchone()
    cutoff = math.inf if row is None else row[0]
    for cls, cond, args in wheres:
        t = table(cls)
        count, nbytes = w.execute(
            f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM {t} WHERE {cond} AND ts <= ?",
            (*args, cutoff),
        ).fetchone()
        if count:
            deleted = w.execute(f"DELETE FROM {t} WHERE {cond} AND ts <= ?", (*args, cutoff)).rowcount
            _count(evicted, cls, deleted, count, nbytes)
    return True


def _count(evicted: Evicted, cls: str, deleted: int, expected: int, nbytes: int) -> None:
    if deleted != expected:  # impossible inside our own write transaction: say so if it happens
        log.error("buffer.evict_mismatch", cls=cls, expected=expected, deleted=deleted)
    c = evicted.setdefault((cls, DropReason.BUDGET), [0, 0])
    c[0] += deleted
    c[1] += nbytes


def shrink(w: sqlite3.Connection, pages: int, path: Path, page_size: int) -> None:
    """Move pages from the end of the file into free ones and truncate it (a transaction of its
    own), then checkpoint so that the file on disk shrinks now rather than at some later
    checkpoint. executescript, because incremental_vacuum frees one page per sqlite3_step and
    execute() steps statements without result columns only once."""
    w.executescript(f"PRAGMA incremental_vacuum({pages})")
    w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    log.info("buffer.shrunk", path=str(path), pages=pages, size_bytes=used_pages(w)[1] * page_size)
