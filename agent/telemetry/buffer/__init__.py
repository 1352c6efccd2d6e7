"""The local telemetry buffer (docs/buffer.md). A package from here on: this commit only moves the
module, so that its history follows the writer, which keeps the largest part of it."""

from agent.telemetry.buffer.writer import (
    DEFAULT_PRIORITIES,
    MIB,
    MIGRATIONS,
    SCHEMA_VERSION,
    Buffer,
    DropReason,
    Record,
    RecordClass,
    class_counts,
)

__all__ = [
    "DEFAULT_PRIORITIES",
    "MIB",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Buffer",
    "DropReason",
    "Record",
    "RecordClass",
    "class_counts",
]
