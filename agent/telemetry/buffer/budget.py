"""The disk budget's arithmetic (docs/buffer.md, "Disk budget"), pure: how the budget splits into WAL,
headroom and record space, when the writer must evict and how many bytes, which priority groups lose
their records first, and which drop counters a transaction must write.

No SQLite here, so that every rule can be tested with plain numbers (tests/test_buffer_budget.py).
The victims themselves are picked inside SQLite (evict.py): stepping through rows in Python would
cost the writer a GIL release per row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from agent.telemetry.buffer.records import MIB
from edge_core.errors import ConfigError

#: A writer that fell behind commits up to this many sealed batches in one transaction.
MERGE_BATCHES: Final = 8
#: The -shm file (the WAL index) grows by 32 KiB per 4096 WAL frames (the first block holds 4062).
SHM_BLOCK: Final = 32 << 10
#: Upper bound of SQLite's per-row cost beyond the payload (cell header, rowid, ts, priority).
ROW_OVERHEAD: Final = 40

#: Drop counters by (class, reason): (records, bytes).
Counts = Mapping[tuple[str, str], tuple[int, int]]


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings the budget depends on, before the file's page size is known."""

    budget_bytes: int
    max_record_bytes: int
    batch_max: int

    @property
    def txn_bytes(self) -> int:
        """A batch is sealed at this many payload bytes, and merged batches stay within it. Under a
        hot path that keeps the GIL busy, each transaction costs the writer a few GIL waits of up to
        5 ms, so bigger transactions are how it catches up; the bound caps the WAL and how far one
        commit can take the file past the high-water mark."""
        return clamp(self.budget_bytes // 32, 64 << 10, 8 * MIB)

    @property
    def txn_rows(self) -> int:
        return self.batch_max * MERGE_BATCHES


@dataclass(frozen=True, slots=True)
class Sizing:
    """The budget split for one page size, in pages unless named otherwise."""

    page_size: int
    wal_pages: int  # wal_autocheckpoint
    wal_max: int  # bytes: journal_size_limit
    file_cap_pages: int  # the main file's share; past it (a lowered budget) the file is shrunk
    high_pages: int  # used pages past this start an eviction...
    low_pages: int  # ...that goes down to this

    def estimate(self, used: int, rows: int, nbytes: int) -> int:
        """An upper bound of the used pages after a transaction of ``rows`` records and ``nbytes``
        of payload, from an upper bound before it: while it stays under the high-water mark the
        writer need not ask SQLite (one GIL release saved per commit); see plan() for the
        allowance."""
        return used + math.ceil((2 * nbytes + ROW_OVERHEAD * rows) / self.page_size) + 2

    def must_evict(self, used: int) -> bool:
        return used > self.high_pages

    def to_free(self, used: int) -> int:
        """Bytes (payload + ROW_OVERHEAD per row) an eviction must delete to get ``used`` pages down
        to the low-water mark; 0 once there. Evicting to 90% of the mark rather than to the mark
        means one eviction per 10% of the budget instead of one per commit."""
        return max(0, used - self.low_pages) * self.page_size

    def shrink_by(self, total: int, incremental: bool) -> int:
        """Pages to vacuum off the end of a file of ``total`` pages. Free pages are otherwise kept
        for reuse (cheaper than shrinking the file and growing it again), so this is only ever
        more than 0 when budget_bytes was lowered between runs, and only possible with
        auto_vacuum=INCREMENTAL (a file created before it was set has no pointer map)."""
        return total - self.file_cap_pages if incremental and total > self.file_cap_pages else 0


def plan(limits: Limits, page_size: int) -> Sizing:
    """Split the budget into WAL, one transaction's headroom and record space; ConfigError when the
    records would get less than a quarter of it."""
    ps = page_size
    budget = limits.budget_bytes
    txn_payload = limits.txn_bytes + limits.max_record_bytes  # the last record may overshoot txn_bytes
    # Pages one transaction can add: twice its payload covers b-tree fill and the half-empty last
    # overflow page of records just over a page; plus per-row overhead and interior pages.
    txn_pages = math.ceil(2 * txn_payload / ps) + math.ceil(limits.txn_rows * ROW_OVERHEAD / ps) + 8
    # Checkpoint when the WAL reaches 1/32 of the budget (SQLite's default, 1000 pages, at most).
    wal_pages = clamp(budget // 32 // ps, 16, 1000)
    # The WAL reaches the checkpoint threshold plus one transaction, each frame a page + 24 bytes.
    wal_frames = wal_pages + txn_pages
    wal_max = wal_frames * (ps + 24) + 32
    shm = SHM_BLOCK * (1 + wal_frames // 4062)
    file_cap = budget - shm - wal_max
    high = file_cap - txn_pages * ps
    if high < max(budget // 4, 2 * txn_pages * ps):
        # Named as the agent's config names them: the operator fixes agent.toml, not this module.
        raise ConfigError(
            "telemetry.buffer_budget_bytes",
            f"{budget} bytes leave {max(high, 0)} for records after the WAL "
            f"({wal_max}) and one transaction's headroom ({txn_pages * ps}), less than a quarter; "
            f"raise it, or lower telemetry.max_record_bytes ({limits.max_record_bytes})",
        )
    high_pages = high // ps
    return Sizing(
        page_size=ps,
        wal_pages=wal_pages,
        wal_max=wal_max,
        file_cap_pages=file_cap // ps,
        high_pages=high_pages,
        low_pages=high_pages * 9 // 10,
    )


@dataclass(frozen=True, slots=True)
class Group:
    """Rows of one class that share an effective priority: evicted together, oldest first."""

    priority: int  # the effective priority
    cls: str
    stored: int | None  # their priority column: None for the rows that follow the class's priority


def groups(present: Iterable[tuple[str, int | None]], class_priority: Mapping[str, int]) -> list[Group]:
    """The groups of the (class, stored priority) pairs found in the file, each with its effective
    priority: the stored one, or the class's where none was stored (put() without priority=)."""
    return [Group(class_priority[cls] if stored is None else stored, cls, stored) for cls, stored in present]


def lowest(present: Sequence[Group]) -> list[Group]:
    """The groups an eviction takes from: every group at the lowest priority, in the given order.
    Several at once (two classes configured alike, or put(priority=) matching another class) are
    evicted by ts across them."""
    if not present:
        return []
    floor = min(g.priority for g in present)
    return [g for g in present if g.priority == floor]


def counters_to_write(
    snapshot: Counts, evicted: Counts, persisted: Counts
) -> list[tuple[str, str, int, int]]:
    """(class, reason, records, bytes) of every drop counter whose total, the writer's snapshot plus
    this transaction's evictions, differs from the row already in the file: written in the same
    transaction as the deletions, so the counters and the records can never disagree."""
    counters = dict(snapshot)
    for k, (r, b) in evicted.items():
        r0, b0 = counters.get(k, (0, 0))
        counters[k] = (r0 + r, b0 + b)
    return [(str(k[0]), str(k[1]), r, b) for k, (r, b) in counters.items() if persisted.get(k) != (r, b)]
