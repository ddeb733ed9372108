"""Counters in buckets of time over a rolling window (the breaker's and the shedder's).

Each bucket is a small list of numbers its user defines; a bucket older than the window
is dropped when the current one is asked for. Time is read through a clock that tests
control.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["Rolling"]


class Rolling:
    def __init__(
        self,
        width: float,
        count: int,
        empty: Callable[[], list[float]],
        clock: Callable[[], float],
    ) -> None:
        """``count`` buckets of ``width`` seconds each."""
        self.width = width
        self.count = count
        self.empty = empty
        self.clock = clock
        self._buckets: dict[int, list[float]] = {}
        #: The number of the bucket of now, as last asked: stale buckets are looked for
        #: only when it moves on, not at every count (this is on the request path).
        self.index = -1

    def current(self) -> list[float]:
        """The bucket of now, the stale ones dropped."""
        now = int(self.clock() / self.width + 1e-9)  # 100.1 / 0.1 is 1000.999...
        buckets = self._buckets
        if now != self.index:
            self.index = now
            for stale in [key for key in buckets if key <= now - self.count]:
                del buckets[stale]
        bucket = buckets.get(now)
        if bucket is None:
            bucket = buckets[now] = self.empty()
        return bucket

    def buckets(self) -> Iterable[list[float]]:
        """Every bucket within the window, now included."""
        self.current()
        return self._buckets.values()

    def past(self) -> Iterable[list[float]]:
        """Every bucket within the window but the bucket of now (call ``current`` first)."""
        index = self.index
        return (bucket for key, bucket in self._buckets.items() if key != index)
