"""The app's Redis: a ``redis.asyncio.Redis`` whose commands are traced and measured.

``service.redis()`` gives a client of redis-py's public class, subclassed where redis-py
sends a command (``execute_command``) and a pipeline (``Pipeline.execute``): each is a
client span named by its command (``GET``, ``PIPELINE``) with ``db.system.name=redis``,
``db.operation.name`` and the server's address, and a point in
``db.client.operation.duration``, as SQL statements are. Keys and values are never
recorded: they are the app's data. Readiness pings the client; shutdown closes it.

A Redis that stops answering costs a few commands their timeout; then the breaker
(``kiban._breaker``, as for the rate limiter's Redis) fails most at once with redis-py's
own ``ConnectionError`` (a 503) until commands succeed again. Readiness's ``PING`` is
never refused by it: it asks Redis itself.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from redis import exceptions
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from kiban._breaker import Breaker
from kiban._telemetry import Telemetry, in_trace

__all__ = ["client"]

#: What redis-py raises when Redis did not answer (down, stalled, out of time).
_UNANSWERED = (exceptions.ConnectionError, exceptions.TimeoutError)


class _Observed:
    """The span and duration of one Redis round trip, for the client and its pipelines."""

    def __init__(
        self,
        telemetry: Telemetry,
        name: str,
        address: str,
        port: int,
        breaker: Breaker | None = None,
    ) -> None:
        self.breaker = breaker or Breaker()
        self.tracer = telemetry.tracer
        self.durations = telemetry.db_durations
        self.name = name
        self.address = address
        self.port = port
        self._attributes: dict[str, dict[str, str | int]] = {}

    def attributes(self, operation: str) -> dict[str, str | int]:
        found = self._attributes.get(operation)
        if found is None:
            found = self._attributes[operation] = {
                "db.system.name": "redis",
                "db.operation.name": operation,
                "db.namespace": self.name,
                "server.address": self.address,
                "server.port": self.port,
            }
        return found

    async def run(self, operation: str, call: Any) -> Any:
        attributes = self.attributes(operation)
        breaker = None if operation == "PING" else self.breaker
        if breaker is not None and not breaker.allow():
            call.close()  # never sent: no round trip to measure
            raise exceptions.ConnectionError(f"{self.name} is failing: the command was not sent")
        span = None
        if in_trace():
            span = self.tracer.start_span(operation, kind=SpanKind.CLIENT, attributes=attributes)
        began = time.perf_counter()
        try:
            result = await call
        except Exception as exc:
            if breaker is not None:  # an error Redis answered (WRONGTYPE) is an answer
                breaker.record(not isinstance(exc, _UNANSWERED))
            error = type(exc).__qualname__
            self.durations.record(time.perf_counter() - began, {**attributes, "error.type": error})
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.set_attribute("error.type", error)
            raise
        finally:
            if span is not None:
                span.end()
        if breaker is not None:
            breaker.record(True)
        self.durations.record(time.perf_counter() - began, attributes)
        return result


class _ObservedPipeline(Pipeline):
    observed: _Observed

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        operation = "MULTI" if self.is_transaction else "PIPELINE"
        return await self.observed.run(operation, super().execute(raise_on_error))  # type: ignore[no-any-return]


class _ObservedRedis(Redis):
    observed: _Observed

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        operation = str(args[0]).upper() if args else "COMMAND"
        sent = super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self.observed.run(operation, sent)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipeline = _ObservedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipeline.observed = self.observed
        return pipeline


def client(url: str, telemetry: Telemetry, name: str = "redis", **options: Any) -> Redis:
    """A client of the Redis at ``url`` whose commands are traced and measured."""
    redis = _ObservedRedis.from_url(url, **options)
    assert isinstance(redis, _ObservedRedis)
    kwargs = redis.connection_pool.connection_kwargs
    redis.observed = _Observed(
        telemetry, name, str(kwargs.get("host", "")), int(kwargs.get("port", 6379))
    )
    return redis
