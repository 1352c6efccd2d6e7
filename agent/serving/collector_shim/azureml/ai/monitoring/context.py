"""``azureml.ai.monitoring.context`` on the edge: the correlation contexts that tie a request's
collected inputs to its outputs (the API of Microsoft's azureml-ai-monitoring package)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ... import _edge_collect as _bridge


class CorrelationContext:
    """What ``Collector.collect()`` returns and accepts: something with an id."""

    def get_id(self) -> str:
        return ""

    def __str__(self) -> str:
        return self.get_id()

    def __repr__(self) -> str:
        return self.__str__()


class BasicCorrelationContext(CorrelationContext):
    """An id (a new UUID unless given), a timestamp (seconds) and the request's headers."""

    # `id` shadows the builtin to keep Azure ML's keyword: scripts call BasicCorrelationContext(id=...).
    def __init__(
        self, id: str | None = None, timestamp: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.id = str(id) if id else str(uuid.uuid4())
        self.timestamp = timestamp if timestamp is not None else int(time.time())
        self.headers = dict(headers or {})

    def get_id(self) -> str:
        return self.id

    def get_timestamp(self) -> int:
        return self.timestamp

    def get_headers(self) -> dict[str, str]:
        return self.headers


def get_context() -> Any:
    """The context of the request being served: every ``collect()`` without one in a request gets
    this same one, so its inputs and outputs correlate even when the script does not pass it on."""
    return _bridge.request_context(BasicCorrelationContext)
