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
does), counting every such failure and logging them at most once a second. A Redis
that keeps failing is throttled (``Breaker``): most checks then skip it and follow the
policy at once, so a Redis that stopped answering costs a few requests its timeout,
not every request.

In memory, the same sliding window counter is computed in place by ``LocalCounter``
(no await, no key strings, no expiry timer on the request path); a property test holds
it to ``limits``' own memory storage, decision for decision.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from kiban import _extras
from kiban._breaker import Breaker
from kiban._config import parse_rate
from kiban._errors import Problem
from kiban._occasional import Occasional
from kiban._telemetry import Telemetry

if TYPE_CHECKING:
    from collections.abc import Callable

    # with REDIS_URL only (kiban[redis])
    import limits
    from limits.aio.strategies import SlidingWindowCounterRateLimiter

__all__ = ["Decision", "Limiter", "LocalCounter", "RateLimit"]

KeyKind = Literal["subject", "api_client", "ip"]
#: The headers every admitted request's answer carries: limit, remaining, reset.
_NAMES = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
_ENCODED_NAMES = tuple(name.encode() for name in _NAMES)


@dataclass(frozen=True, eq=False)
class RateLimit:
    """``RateLimit("100/minute", key="subject")``: at most that many requests per key."""

    limit: str
    key: KeyKind = "subject"
    name: str = "default"
    # Parsed from ``limit`` once, in __post_init__.
    amount: int = field(init=False, repr=False, default=0)
    expiry: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        amount, expiry = parse_rate(self.limit)
        object.__setattr__(self, "amount", amount)
        object.__setattr__(self, "expiry", expiry)

    @property
    def item(self) -> limits.RateLimitItem:
        """The ``limits`` library's item, for its Redis storage (kiban[redis])."""
        import limits

        return limits.RateLimitItemPerSecond(self.amount, self.expiry)


@dataclass(slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def _values(self) -> tuple[int, int, int]:
        return self.limit, self.remaining, self.reset_seconds

    def headers(self) -> dict[str, str]:
        headers = {name: str(value) for name, value in zip(_NAMES, self._values(), strict=True)}
        if not self.allowed:
            headers["retry-after"] = str(self.reset_seconds)
        return headers

    def encoded(self) -> list[tuple[bytes, bytes]]:
        """The headers of an allowed request, as ASGI wants them."""
        return [
            (name, b"%d" % value)
            for name, value in zip(_ENCODED_NAMES, self._values(), strict=True)
        ]


class _Window:
    __slots__ = ("current", "index", "previous")

    def __init__(self, index: int) -> None:
        self.index = index
        self.current = 0
        self.previous = 0


def _weigh(previous: int, current: int, now: float, expiry: int) -> tuple[float, float]:
    """The sliding window's count, and the time the previous window still overlaps it.

    The same float operations as ``limits``, in its order; int() is floor for w >= 0.
    """
    if previous:
        previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
        return previous * previous_ttl / expiry + current, previous_ttl
    return float(current), 0.0


class LocalCounter:
    """``limits``' sliding window counter, for one process, computed in place.

    Windows are numbered ``int(now / expiry)`` as ``limits`` numbers its keys; the
    previous window's count is weighted by how much of it still overlaps the sliding
    window. Windows two or more behind are dropped every ``sweep_every`` hits.
    """

    sweep_every = 4096

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        #: Wall-clock seconds, as ``limits`` counts; a test holds it still so that
        #: no burst it asserts straddles a window's end.
        self.clock = clock
        self.windows: dict[tuple[RateLimit, str], _Window] = {}
        self._hits = 0

    def hit(self, rate: RateLimit, key: str, now: float) -> Decision:
        expiry, amount = rate.expiry, rate.amount
        index = int(now / expiry)
        found = (rate, key)
        window = self.windows.get(found)
        if window is None:
            window = self.windows[found] = _Window(index)
        elif window.index != index:
            window.previous = window.current if window.index == index - 1 else 0
            window.current = 0
            window.index = index
        previous, current = window.previous, window.current
        weighted, previous_ttl = _weigh(previous, current, now, expiry)
        allowed = int(weighted) < amount
        if allowed:
            current += 1
            window.current = current
            weighted += 1
        remaining = amount - int(weighted)
        if current:
            reset_in = ((1 - ((now / expiry) % 1)) * expiry + expiry) % expiry
            if previous:
                reset_in = min(previous_ttl % (expiry / previous), reset_in)
        elif previous:
            reset_in = previous_ttl % (expiry / previous)
        else:
            reset_in = 0.0
        self._hits += 1
        if self._hits % self.sweep_every == 0:
            self._sweep(now)
        return Decision(
            allowed, amount, remaining if remaining > 0 else 0, max(1, math.ceil(reset_in))
        )

    def allows(self, rate: RateLimit, key: str, now: float) -> bool:
        """Whether a hit now would be allowed, without counting one."""
        window = self.windows.get((rate, key))
        if window is None:
            return True
        index = int(now / rate.expiry)
        if window.index == index:
            previous, current = window.previous, window.current
        elif window.index == index - 1:
            previous, current = window.current, 0
        else:
            return True
        return int(_weigh(previous, current, now, rate.expiry)[0]) < rate.amount

    def _sweep(self, now: float) -> None:
        stale = [
            found
            for found, window in self.windows.items()
            if int(now / found[0].expiry) - window.index > 1
        ]
        for found in stale:
            del self.windows[found]


class Limiter:
    """Counts hits in memory or Redis and decides; the fail policy covers storage errors."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        fail_open: bool = True,
        timeout: float = 0.25,
        telemetry: Telemetry | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.local: LocalCounter | None = None
        #: Throttles the calls to Redis while it fails.
        self.breaker = breaker or Breaker()
        self.unavailable = Occasional("rate limit storage unavailable")
        self.pool: Any = None
        self.strategy: SlidingWindowCounterRateLimiter | None = None
        if redis_url:
            _extras.require("limits", "redis", "REDIS_URL")
            from limits.aio.strategies import SlidingWindowCounterRateLimiter
            from limits.storage import storage_from_string
            from redis.asyncio import ConnectionPool

            plain = redis_url.removeprefix("async+")
            # kiban's own pool (limits' documented ``connection_pool`` option): the
            # shutdown closes it, instead of leaving sockets to the garbage collector.
            self.pool = ConnectionPool.from_url(
                plain, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            storage: Any = storage_from_string(
                "async+" + plain, implementation="redispy", connection_pool=self.pool
            )
            self.strategy = SlidingWindowCounterRateLimiter(storage)
        else:
            self.local = LocalCounter()
        self.fail_open = fail_open
        self.telemetry = telemetry

    def _span(self, operation: str) -> trace.Span | None:
        """A client span for a call to Redis, inside the request's (its waiting shows)."""
        if self.telemetry is None:
            return None
        return self.telemetry.tracer.start_span(
            f"ratelimit {operation}",
            kind=SpanKind.CLIENT,
            attributes={"db.system.name": "redis", "db.operation.name": operation},
        )

    async def aclose(self) -> None:
        """Close the Redis connections (a shutdown cleanup); nothing to do in memory."""
        if self.pool is not None:
            await self.pool.disconnect()

    async def allows(self, rate: RateLimit, key: str) -> bool:
        """Whether ``key`` is under ``rate`` now, without counting a hit.

        A storage failure allows: this guards against abuse, it is not a quota.
        """
        if self.local is not None:
            return self.local.allows(rate, key, self.local.clock())
        assert self.strategy is not None
        if not self.breaker.allow():
            self._storage_failed(rate, "BreakerOpen", fail_open=True)
            return True
        span = self._span("test")
        try:
            allowed = await self.strategy.test(rate.item, rate.name, key)
        except Exception as exc:
            self.breaker.record(False)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            self._storage_failed(rate, type(exc).__name__, fail_open=True)
            return True
        finally:
            if span is not None:
                span.end()
        self.breaker.record(True)
        return allowed

    def _storage_failed(self, rate: RateLimit, error: str, fail_open: bool) -> None:
        """Count a check the storage did not answer (``BreakerOpen``: not even tried);
        log at most one line a second, with how many failed since the last one."""
        self.unavailable.warning(limit=rate.limit, fail_open=fail_open, error_type=error)
        if self.telemetry is not None:
            self.telemetry.ratelimit_errors.add(1, {"fail_open": fail_open})

    async def hit(self, rate: RateLimit, key: str) -> Decision | None:
        """Count one request for ``key``.

        None when the storage failed and the policy is to fail open; a 503 problem when
        it is to fail closed.
        """
        if self.local is not None:
            return self.local.hit(rate, key, self.local.clock())
        assert self.strategy is not None
        item = rate.item
        if not self.breaker.allow():
            self._unavailable(rate, "BreakerOpen")
            return None
        span = self._span("hit")
        try:
            allowed = await self.strategy.hit(item, rate.name, key)
            reset_at, remaining = await self.strategy.get_window_stats(item, rate.name, key)
        except Exception as exc:
            self.breaker.record(False)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.end()
            self._unavailable(rate, type(exc).__name__)
            return None
        self.breaker.record(True)
        if span is not None:
            span.end()
        reset = max(1, math.ceil(reset_at - time.time()))
        return Decision(allowed, item.amount, max(0, remaining), reset)

    def _unavailable(self, rate: RateLimit, error: str) -> None:
        """The storage did not count a hit: let it through (return), or refuse it (503)."""
        self._storage_failed(rate, error, self.fail_open)
        if not self.fail_open:
            raise Problem(
                503, "Rate limiting is unavailable; try again later.", headers={"retry-after": "1"}
            )
