"""Liveness and readiness.

Liveness answers whether the process can serve at all and never touches a dependency:
a database blink must not make Kubernetes restart every pod at once. Readiness pings
every dependency concurrently, each under its own timeout, caches the result briefly so
a burst of probes does not hammer the database, and turns 503 as soon as shutdown
starts so the load balancer drains the pod first. Bodies name each dependency and its
status, never a DSN or an error message that could leak hosts or passwords.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from kiban import _log as log

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "Checker",
    "HTTPPinger",
    "Pinger",
    "Redis",
    "RedisPinger",
    "Report",
    "SQLPinger",
    "liveness",
    "readiness_endpoint",
]


@runtime_checkable
class Pinger(Protocol):
    """A dependency readiness depends on. ``ping`` returns when it is usable, raises if not."""

    name: str

    async def ping(self) -> None: ...


class SQLPinger:
    """Pings a database with ``SELECT 1`` through a SQLAlchemy async engine."""

    def __init__(self, engine: AsyncEngine, name: str = "database") -> None:
        self.engine = engine
        self.name = name

    async def ping(self) -> None:
        from sqlalchemy import text

        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))


class Redis(Protocol):
    def ping(self) -> Awaitable[Any]: ...


class RedisPinger:
    """Pings Redis with PING through an async client (redis.asyncio)."""

    def __init__(self, client: Redis, name: str = "redis") -> None:
        self.client = client
        self.name = name

    async def ping(self) -> None:
        await self.client.ping()


class HTTPPinger:
    """Checks another service's readiness endpoint: ready means a 2xx answer."""

    def __init__(self, url: str, name: str, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.name = name
        self.client = client

    async def ping(self) -> None:
        import httpx

        if self.client is None:
            async with httpx.AsyncClient() as client:
                response = await client.get(self.url)
        else:
            response = await self.client.get(self.url)
        response.raise_for_status()


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    latency_ms: float
    error: str | None = None
    critical: bool = True


@dataclass(frozen=True, slots=True)
class Report:
    ok: bool
    checks: tuple[Check, ...]
    draining: bool = False

    @property
    def degraded(self) -> bool:
        """Ready, but a non-critical dependency is failing."""
        return self.ok and any(not check.ok for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        if self.draining:
            status = "draining"
        elif not self.ok:
            status = "fail"
        else:
            status = "degraded" if self.degraded else "ok"
        checks: dict[str, Any] = {}
        for check in self.checks:
            entry: dict[str, Any] = {
                "status": "ok" if check.ok else "fail",
                "latency_ms": round(check.latency_ms, 3),
            }
            if check.error:
                entry["error"] = check.error
            if not check.critical:
                entry["critical"] = False
            checks[check.name] = entry
        return {"status": status, "checks": checks}


class Checker:
    """Runs the pingers for readiness, and knows whether the process is draining."""

    def __init__(
        self, pingers: Sequence[Pinger] = (), timeout: float = 0.8, cache_seconds: float = 1.0
    ) -> None:
        self.pingers = list(pingers)
        self.optional: set[str] = set()
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.draining = False
        #: Why the service is saturated now (refusing requests), or None: reported as a
        #: failing non-critical check, ``load``, so readiness says degraded and stays 200.
        self.saturation: Callable[[], str | None] = lambda: None
        self._cached: tuple[float, Report] | None = None
        self._lock = asyncio.Lock()
        #: Pings that timed out and were cancelled but are still unwinding (a connection
        #: to a stalled server being closed): not awaited, and not started again.
        self._unwinding: dict[str, asyncio.Task[None]] = {}

    def add(self, pinger: Pinger, critical: bool = True) -> None:
        """Register ``pinger``; a failing non-critical one is reported without failing
        readiness, so one dependency's outage does not take every caller out of rotation."""
        if any(existing.name == pinger.name for existing in self.pingers):
            raise ValueError(f"a pinger named {pinger.name!r} is already registered")
        self.pingers.append(pinger)
        if not critical:
            self.optional.add(pinger.name)
        self._cached = None

    def start_draining(self) -> None:
        """Readiness answers 503 from now on: shutdown has begun."""
        self.draining = True

    async def check(self) -> Report:
        if self.draining:
            return Report(ok=False, checks=(), draining=True)
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            checks = await asyncio.gather(*(self._run(pinger) for pinger in self.pingers))
            saturated = self.saturation()
            if saturated is not None:
                checks.append(Check("load", False, 0.0, saturated, critical=False))
            report = Report(
                ok=all(check.ok or not check.critical for check in checks), checks=tuple(checks)
            )
            self._cached = (time.monotonic(), report)
            return report

    async def _run(self, pinger: Pinger) -> Check:
        """Ping, bounded by ``timeout`` whatever the ping's cleanup does.

        A ping past its time is cancelled and left to unwind on its own: the check does
        not wait for it (closing a connection to a server that stopped answering can
        take seconds), and while it unwinds the dependency is reported timed out
        without starting another.
        """
        start = time.perf_counter()
        error: str | None = None
        if pinger.name in self._unwinding:
            error = "timeout"
        else:
            task = asyncio.ensure_future(pinger.ping())
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
            if not done:
                error = "timeout"
                task.cancel()
                self._unwinding[pinger.name] = task
                task.add_done_callback(functools.partial(self._unwound, pinger.name))
            elif (exc := task.exception()) is not None:
                error = "unavailable"
                log.warning(
                    "dependency check failed",
                    dependency=pinger.name,
                    error_type=type(exc).__name__,
                )
        if error == "timeout":
            log.warning(
                "dependency check timed out", dependency=pinger.name, timeout_s=self.timeout
            )
        latency = (time.perf_counter() - start) * 1000
        return Check(pinger.name, error is None, latency, error, pinger.name not in self.optional)

    def _unwound(self, name: str, task: asyncio.Task[None]) -> None:
        self._unwinding.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failed cleanup is not an unhandled error


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(
        orjson.dumps(body),
        status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


async def liveness(_: Request) -> Response:
    """The process is up and its event loop answers. Touches no dependency."""
    return _json({"status": "ok"}, 200)


def readiness_endpoint(checker: Checker) -> Callable[[Request], Awaitable[Response]]:
    async def readiness(_: Request) -> Response:
        report = await checker.check()
        return _json(report.as_dict(), 200 if report.ok else 503)

    return readiness
