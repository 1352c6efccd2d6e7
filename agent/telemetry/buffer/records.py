"""What the buffer holds: the record classes, their default priorities, the drop reasons and the record
the uploader reads. No SQLite here: every other module of the buffer, the pure budget included,
shares these names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class RecordClass(StrEnum):
    CAPTURE = "capture"  # captured model inputs/outputs
    INFERENCE = "inference"  # inference metrics
    SYSTEM = "system"  # system metrics
    EVENT = "event"  # events and logs
    COLLECTION = "collection"  # Azure ML data-collector records (agent/telemetry/collections.py)


class DropReason(StrEnum):
    BUDGET = "budget"  # evicted to keep the buffer within its disk budget
    TOO_LARGE = "too_large"  # refused by put(): larger than max_record_bytes
    QUEUE_FULL = "queue_full"  # refused by put(): the writer is behind by queue_max records or bytes
    INVALID = "invalid"  # refused by put(): unknown class, payload not encodable, bad priority or ts
    WRITE_ERROR = "write_error"  # its transaction failed WRITE_ATTEMPTS times (disk full, I/O error)


#: Higher is kept longer when the budget is reached.
DEFAULT_PRIORITIES: Final[Mapping[RecordClass, int]] = {
    RecordClass.EVENT: 3,
    RecordClass.INFERENCE: 2,
    RecordClass.SYSTEM: 1,
    RecordClass.CAPTURE: 0,
    RecordClass.COLLECTION: 0,  # model data, as the captures: the first to go when the disk is full
}

MIB: Final = 1 << 20
#: The priorities put() and Buffer(priorities=...) accept: 32-bit integers (docs/buffer.md, "Counters").
PRIO_MIN: Final = -(2**31)
PRIO_MAX: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Record:
    seq: int  # per class, increasing, never reused
    cls: RecordClass
    ts: float  # seconds since the epoch: put(ts=...) or the time of put()
    priority: int  # the effective priority: put(priority=...) or the class's
    payload: bytes
