"""Rate limiting per key (API client, token subject or user IP), shared across replicas.

Limits are counted with the ``limits`` library's sliding window counter: it weighs the
previous window's count by how much of it still overlaps, so there is no burst of twice
the limit around a window boundary (as with a fixed window), and each check costs two
counters instead of the moving window's list of every hit (which grows with the limit
and is scanned on each request). Storage is in
memory by default, which is per process (say so when running several workers), or
Redis when ``REDIS_URL`` is set, which makes a limit global across replicas: Redis
applies each hit atomically. When Redis cannot be reached within its short timeout the
limiter follows ``RATELIMIT_FAIL_OPEN`` (default: let the request through, as Envoy
does), logging and counting every such failure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import limits
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from kiban import log
from kiban.errors import Problem
from kiban.telemetry import Telemetry

__all__ = ["Decision", "Limiter", "RateLimit"]

KeyKind = Literal["subject", "api_client", "ip"]


@dataclass(frozen=True, eq=False)
class RateLimit:
    """``RateLimit("100/minute", key="subject")``: at most that many requests per key."""

    limit: str
    key: KeyKind = "subject"
    name: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_item", limits.parse(self.limit))

    @property
    def item(self) -> limits.RateLimitItem:
        return self._item  # type: ignore[attr-defined,no-any-return]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        headers = {
            "ratelimit-limit": str(self.limit),
            "ratelimit-remaining": str(self.remaining),
            "ratelimit-reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["retry-after"] = str(self.reset_seconds)
        return headers


class Limiter:
    """Counts hits in memory or Redis and decides; the fail policy covers storage errors."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        fail_open: bool = True,
        timeout: float = 0.25,
        telemetry: Telemetry | None = None,
    ) -> None:
        if redis_url:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            self.storage: Storage = storage_from_string(  # type: ignore[assignment]
                uri,
                implementation="redispy",
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
            self.shared = True
        else:
            self.storage = MemoryStorage()
            self.shared = False
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.fail_open = fail_open
        self.telemetry = telemetry

    async def hit(self, rate: RateLimit, key: str) -> Decision | None:
        """Count one request for ``key``.

        None when the storage failed and the policy is to fail open; a 503 problem when
        it is to fail closed.
        """
        item = rate.item
        try:
            allowed = await self.strategy.hit(item, rate.name, key)
            reset_at, remaining = await self.strategy.get_window_stats(item, rate.name, key)
        except Exception as exc:
            log.warning(
                "rate limit storage unavailable",
                limit=rate.limit,
                fail_open=self.fail_open,
                error_type=type(exc).__name__,
            )
            if self.telemetry is not None:
                self.telemetry.ratelimit_errors.add(1, {"fail_open": self.fail_open})
            if self.fail_open:
                return None
            raise Problem(
                503, "Rate limiting is unavailable; try again later.", headers={"retry-after": "1"}
            ) from None
        reset = max(1, math.ceil(reset_at - time.time()))
        return Decision(allowed, item.amount, max(0, remaining), reset)
