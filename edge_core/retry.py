"""One backoff helper for every retry loop: downloads, reconnects, uploads, the operator's client."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delays(lo: float, hi: float) -> Callable[[int], float]:
    """Exponential backoff with full jitter (AWS architecture blog): spreads a fleet's retries.

    ``delay(attempt)`` is uniform in ``[lo, min(hi, lo * 2**attempt)]``, so a thousand devices that
    lost the broker at the same moment do not come back at the same moment.
    """

    def delay(attempt: int) -> float:
        return random.uniform(lo, min(hi, lo * (2**attempt)))

    return delay
