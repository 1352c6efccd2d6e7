"""The telemetry buffer's budget arithmetic (agent/telemetry/buffer/budget.py), without SQLite: the
split of the budget, the eviction thresholds, which priority groups are evicted, the drop counters a
transaction writes, and how sealed batches merge into transactions. The expected numbers are worked
out by hand in the comments, not computed with the code under test. tests/test_buffer.py checks the
same rules on real files."""

from __future__ import annotations

import pytest

from agent.telemetry.buffer import DEFAULT_PRIORITIES, MIB
from agent.telemetry.buffer.budget import Group, Limits, Sizing, counters_to_write, groups, lowest, plan
from agent.telemetry.buffer.writer import merge
from edge_core.errors import ConfigError

CLASS_PRIO = {str(c): p for c, p in DEFAULT_PRIORITIES.items()}  # event 3, inference 2, system 1, capture 0

# 64 KiB records, batches of 100, 4 KiB pages. A transaction: txn_bytes = max(budget // 32, 64 KiB)
# = 65536 (every budget below 2 MiB), + one record = 131072 bytes of payload, counted twice = 64
# pages; 800 rows x 40 B = 32000 B = 8 pages (rounded up); + 8 = 80 pages = 327680 B of headroom.
# The WAL: 16 pages (the floor below 2 MiB) + 80 = 96 frames x (4096 + 24) + 32 = 395552 B; the shm
# one 32 KiB block. Records get budget - 32768 - 395552 - 327680 = budget - 756000, and need at least
# twice the headroom (655360): the smallest budget is 1411360.
SMALL = Limits(budget_bytes=1_411_360, max_record_bytes=64 << 10, batch_max=100)


def test_the_smallest_budget_is_split_into_wal_headroom_and_records() -> None:
    s = plan(SMALL, 4096)
    assert s == Sizing(
        page_size=4096,
        wal_pages=16,
        wal_max=395_552,
        file_cap_pages=240,  # (1411360 - 32768 - 395552) / 4096 = 983040 / 4096
        high_pages=160,  # (983040 - 327680) / 4096
        low_pages=144,  # 90% of 160
    )


def test_one_byte_less_is_refused_with_the_numbers() -> None:
    plan(SMALL, 4096)
    with pytest.raises(ConfigError, match="budget_bytes") as e:
        plan(Limits(1_411_359, 64 << 10, 100), 4096)
    assert "1411359 bytes leave 655359 for records" in e.value.message
    assert "WAL (395552)" in e.value.message and "headroom (327680)" in e.value.message
    # The refusal names the settings as agent.toml spells them: what the operator can change.
    with pytest.raises(ConfigError, match=r"lower telemetry.max_record_bytes \(65536\)") as e:
        plan(Limits(1 * MIB, 64 << 10, 100), 4096)
    assert e.value.field == "telemetry.buffer_budget_bytes"


def test_a_64_mib_budget_with_1_mib_records() -> None:
    # txn_bytes = 64 MiB / 32 = 2 MiB; + 1 MiB = 3 MiB x 2 = 1536 pages; 8000 rows x 40 B = 79
    # pages; + 8 = 1623 pages (6647808 B). WAL: 64 MiB / 32 / 4096 = 512 pages; 512 + 1623 = 2135
    # frames x 4120 + 32 = 8796232 B; shm 32768 (2135 < 4062 frames). File cap: 67108864 - 32768 -
    # 8796232 = 58279864 B = 14228 pages; high: 58279864 - 6647808 = 51632056 B = 12605 pages.
    s = plan(Limits(64 * MIB, MIB, 1000), 4096)
    assert (s.wal_pages, s.wal_max) == (512, 8_796_232)
    assert (s.file_cap_pages, s.high_pages, s.low_pages) == (14_228, 12_605, 11_344)


def test_the_wal_share_is_capped_at_1000_pages() -> None:
    # 1 GiB / 32 / 4096 = 8192 pages, over SQLite's default of 1000.
    assert plan(Limits(1 << 30, MIB, 1000), 4096).wal_pages == 1000


def test_a_transaction_is_bounded_by_1_32_of_the_budget_within_64_kib_and_8_mib() -> None:
    assert Limits(MIB, MIB, 1000).txn_bytes == 64 << 10  # 32 KiB, raised to the floor
    assert Limits(64 * MIB, MIB, 1000).txn_bytes == 2 * MIB
    assert Limits(1 << 30, MIB, 1000).txn_bytes == 8 * MIB  # 32 MiB, capped
    assert Limits(MIB, MIB, 250).txn_rows == 2000  # 8 batches


def test_the_estimate_adds_twice_the_payload_and_the_row_overhead() -> None:
    s = plan(SMALL, 4096)
    # (2 x 4096 + 10 x 40) / 4096 = 2.1, rounded up to 3, + 2
    assert s.estimate(100, 10, 4096) == 105
    assert s.estimate(100, 0, 0) == 102


def test_eviction_starts_above_the_high_mark_and_frees_down_to_the_low_mark() -> None:
    s = plan(SMALL, 4096)  # high 160, low 144
    assert not s.must_evict(160)
    assert s.must_evict(161)
    assert s.to_free(161) == 17 * 4096
    assert s.to_free(145) == 4096
    assert s.to_free(144) == 0
    assert s.to_free(10) == 0


def test_only_an_incremental_file_over_its_cap_is_shrunk() -> None:
    s = plan(SMALL, 4096)  # file cap 240 pages
    assert s.shrink_by(300, incremental=True) == 60
    assert s.shrink_by(300, incremental=False) == 0
    assert s.shrink_by(240, incremental=True) == 0


def test_rows_without_a_priority_follow_their_class() -> None:
    present = [("capture", None), ("capture", 5), ("system", None), ("event", 0)]
    assert groups(present, CLASS_PRIO) == [
        Group(0, "capture", None),
        Group(5, "capture", 5),
        Group(1, "system", None),
        Group(0, "event", 0),
    ]
    assert groups([("capture", None)], {**CLASS_PRIO, "capture": 7}) == [Group(7, "capture", None)]


def test_the_lowest_priority_is_evicted_first_across_classes() -> None:
    capture = Group(0, "capture", None)
    event_at_0 = Group(0, "event", 0)
    system = Group(1, "system", None)
    assert lowest([system, capture]) == [capture]
    # a record put with a priority as low as the captures' is evicted with them, by ts
    assert lowest([capture, system, event_at_0]) == [capture, event_at_0]
    # a per-record priority below every class goes first, alone
    assert lowest([capture, Group(-1, "inference", -1)]) == [Group(-1, "inference", -1)]
    assert lowest([]) == []


def test_a_transaction_writes_exactly_the_counters_that_changed() -> None:
    snapshot = {
        ("capture", "queue_full"): (2, 200),  # already in the file
        ("event", "invalid"): (1, 10),  # refused since the last transaction
        ("capture", "budget"): (4, 400),
    }
    persisted = {("capture", "queue_full"): (2, 200), ("capture", "budget"): (4, 400)}
    evicted = {("capture", "budget"): (3, 300), ("system", "budget"): (5, 50)}
    assert sorted(counters_to_write(snapshot, evicted, persisted)) == [
        ("capture", "budget", 7, 700),
        ("event", "invalid", 1, 10),
        ("system", "budget", 5, 50),
    ]
    assert counters_to_write(persisted, {}, persisted) == []


def test_sealed_batches_merge_within_the_transaction_bounds() -> None:
    def seg(
        n: int, size: int, hi: int
    ) -> tuple[dict[str, list[tuple[float, int | None, bytes]]], int, int, int]:
        return {"capture": [(0.0, None, b"x" * size)] * n, "event": []}, n, n * size, hi

    merged = merge([seg(3, 10, 3), seg(3, 10, 6), seg(3, 10, 9), seg(1, 100, 10)], txn_rows=7, txn_bytes=100)
    # 3 + 3 rows fit in 7; a third 3 would not; the third and the fourth exceed 100 bytes together.
    # A merged transaction covers the tickets of its last segment (they are sealed in ticket order).
    assert [(n, b, hi) for _, n, b, hi in merged] == [(6, 60, 6), (3, 30, 9), (1, 100, 10)]
    assert len(merged[0][0]["capture"]) == 6
