"""Adaptive throttling of a dependency that fails: calls to it fail fast while it is down.

Google SRE's client-side throttling, as go-zero's breaker has it. One serves each HTTP
downstream host, each gRPC channel and the rate limiter's Redis: a dependency that
stopped answering costs its callers a timeout on a few calls, not on every call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from kiban._rolling import Rolling

__all__ = ["Breaker"]


class Breaker:
    """Google SRE's adaptive throttling for one downstream (go-zero's breaker).

    Over a rolling ``window``, with ``requests`` calls attempted and ``accepts`` of them
    answered without a server error, a new call is refused locally with probability
    ``max(0, (requests - protection - k * accepts) / (requests + 1))``: nothing is
    refused while the downstream is healthy (nor for a handful of failures), most calls
    fail fast while it is down, and calls get through again in proportion as it
    recovers, without a half-open state to tune.
    """

    def __init__(
        self,
        k: float = 1.5,
        protection: int = 5,
        window: float = 10.0,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self.k = k
        self.protection = protection
        self.chance = chance
        #: Each bucket: [requests, accepts].
        self.window = Rolling(window / buckets, buckets, lambda: [0, 0], clock)

    def drop_probability(self) -> float:
        buckets = list(self.window.buckets())
        requests = sum(counts[0] for counts in buckets)
        accepts = sum(counts[1] for counts in buckets)
        return max(0.0, (requests - self.protection - self.k * accepts) / (requests + 1))

    def allow(self) -> bool:
        if self.chance() < self.drop_probability():
            # Refused here: still a request the downstream did not serve.
            self.window.current()[0] += 1
            return False
        return True

    def record(self, accepted: bool) -> None:
        counts = self.window.current()
        counts[0] += 1
        counts[1] += accepted
