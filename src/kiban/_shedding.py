"""Adaptive load shedding: refuse new requests when the service is past its capacity.

go-zero's model, with two overload signals, each on when its threshold is set: the
event loop's lag (an asyncio service is overloaded when its loop runs late, whatever
the machine's CPU says) and the process's CPU usage of what it can use (go-zero's own,
cgroup-aware: ``kiban._cpu``). While either is past its threshold (the loop late by
more than ``lag_threshold``, or CPU above ``cpu_threshold``), a request is refused if
the requests in flight exceed what the service has shown it can carry, the most it
completed in a bucket of time times the least time a request took (Little's law:
throughput x latency). Once something was shed, shedding goes on being considered for
``cool_off`` seconds, so a loop that catches up for an instant does not let the whole
backlog back in.

Counting is in buckets of ``bucket`` seconds over ``window`` seconds, read through a
clock that tests control. The buckets before the current one are summed up once per
bucket, not at every request: an overloaded service asks for its capacity at every
request it refuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kiban._rolling import Rolling

__all__ = ["Shedder"]


class Shedder:
    def __init__(
        self,
        lag_threshold: float = 0.1,
        window: float = 5.0,
        bucket: float = 0.1,
        cool_off: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        lag: Callable[[], float] = lambda: 0.0,
        cpu_threshold: float = 0.0,
        cpu: Callable[[], float] = lambda: 0.0,
    ) -> None:
        #: 0 turns a signal off.
        self.lag_threshold = lag_threshold or float("inf")
        self.cpu_threshold = cpu_threshold or float("inf")
        #: The event loop's lag now (the telemetry's last measurement), in seconds.
        self.lag = lag
        #: The process's CPU usage now, 0 to 1 (the telemetry's last sample).
        self.cpu = cpu
        self.bucket = bucket
        self.cool_off = cool_off
        self.clock = clock
        #: Each bucket: [requests completed, sum of their seconds].
        self.window = Rolling(bucket, int(window / bucket), lambda: [0, 0.0], clock)
        self._dropped_at = -1e18
        #: The past buckets' most requests completed and least mean seconds, and the
        #: bucket of now they were summed up at.
        self._past: tuple[float, float] = (0, float("inf"))
        self._past_at = -1

    def done(self, seconds: float) -> None:
        """A request completed in ``seconds`` (admitted and answered)."""
        stats = self.window.current()
        stats[0] += 1
        stats[1] += seconds

    def capacity(self) -> float:
        """Requests in flight the service has shown it can carry (max pass x min latency)."""
        window = self.window
        now = window.current()
        if window.index != self._past_at:
            past = list(window.past())
            self._past = (
                max((stats[0] for stats in past), default=0),
                min((stats[1] / stats[0] for stats in past if stats[0]), default=float("inf")),
            )
            self._past_at = window.index
        passed, least = self._past
        if now[0]:
            passed = max(passed, now[0])
            least = min(least, now[1] / now[0])
        if least == float("inf"):
            return 1.0
        return max(1.0, passed * least / self.bucket)

    def overloaded(self) -> bool:
        return (
            self.lag() > self.lag_threshold
            or self.cpu() > self.cpu_threshold
            or self.clock() - self._dropped_at < self.cool_off
        )

    def should_shed(self, inflight: int) -> bool:
        """Whether a new request, with ``inflight`` already being served, is refused."""
        if not self.overloaded() or inflight <= self.capacity():
            return False
        self._dropped_at = self.clock()
        return True
