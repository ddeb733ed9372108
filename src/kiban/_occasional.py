"""A warning for something that can happen on every request, written occasionally.

A dependency that is down, or a client that goes on misbehaving, would otherwise write
a line per request: a flood exactly when the logs are read, and one a client can cause
at will. ``Occasional`` writes the first line at once and then at most one per
``interval``, each saying how many times it happened since the last (``occurrences``);
the metric that goes with it counts every one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from kiban import _log as log

__all__ = ["Occasional"]


class Occasional:
    def __init__(
        self, event: str, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.event = event
        self.interval = interval
        self.clock = clock
        self._count = 0
        self._logged_at = -math.inf

    def warning(self, **fields: Any) -> None:
        """It happened once more: write the line if ``interval`` has passed since the last."""
        self._count += 1
        now = self.clock()
        if now - self._logged_at >= self.interval:
            log.warning(self.event, occurrences=self._count, **fields)
            self._count = 0
            self._logged_at = now
