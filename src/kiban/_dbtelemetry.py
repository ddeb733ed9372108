"""What a service waits on in its database: a span and a duration per statement, pool gauges.

Attached to a database's engine through SQLAlchemy's public events
(``before_cursor_execute``, ``after_cursor_execute``, ``handle_error``): each statement
is a client span named ``OPERATION name`` (``db.system.name``, ``db.operation.name``,
``db.query.text`` as sent, with its parameters as placeholders, never their values) and
a point in ``db.client.operation.duration``; the pool's connections in use and idle are
observed at collection, never counted on the request path.

A statement is a span only inside a traced request or another span: a readiness ping,
a migration or an excluded path (``TELEMETRY_EXCLUDE_PATHS``) makes none, so probes do
not fill the traces; its duration is measured all the same.

A statement's span and start time live in the connection's ``info`` dictionary (the
user dictionary SQLAlchemy gives every connection): a connection runs one statement at
a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from kiban._telemetry import Telemetry, in_trace

__all__ = ["observe"]

_KEY = "kiban.statement"
#: How much of a statement's text a span keeps.
_MAX_TEXT = 2048


def _operation(statement: str) -> str:
    word = statement.lstrip().split(None, 1)
    return word[0].upper() if word else "QUERY"


def observe(
    engine: AsyncEngine,
    telemetry: Telemetry,
    name: str,
    waiting: Callable[[], int] = lambda: 0,
) -> None:
    """Trace and measure ``engine``'s statements; report its pool (named ``name``):
    connections used and idle, overflow beyond the pool's size, and ``waiting``, the
    transactions waiting for a connection (the pool has no public count of those)."""
    sync = engine.sync_engine
    system = sync.dialect.name
    tracer = telemetry.tracer
    durations = telemetry.db_durations
    attributes_of: dict[str, dict[str, str]] = {}

    def attributes(operation: str) -> dict[str, str]:
        found = attributes_of.get(operation)
        if found is None:
            found = attributes_of[operation] = {
                "db.system.name": system,
                "db.operation.name": operation,
                "db.namespace": name,
            }
        return found

    @event.listens_for(sync, "before_cursor_execute")
    def before(
        connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        operation = _operation(statement)
        span = None
        if in_trace():
            span = tracer.start_span(
                f"{operation} {name}",
                kind=SpanKind.CLIENT,
                attributes={**attributes(operation), "db.query.text": statement[:_MAX_TEXT]},
            )
        connection.info[_KEY] = (span, operation, time.perf_counter())

    @event.listens_for(sync, "after_cursor_execute")
    def after(
        connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        started = connection.info.pop(_KEY, None)
        if started is None:
            return
        span, operation, began = started
        durations.record(time.perf_counter() - began, attributes(operation))
        if span is not None:
            span.end()

    @event.listens_for(sync, "handle_error")
    def failed(context: Any) -> None:
        connection = context.connection
        started = connection.info.pop(_KEY, None) if connection is not None else None
        if started is None:
            return
        span, operation, began = started
        error = type(context.original_exception).__name__
        durations.record(
            time.perf_counter() - began, {**attributes(operation), "error.type": error}
        )
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, error))
            span.end()

    pool = sync.pool

    def connections() -> Iterable[Observation]:
        used = getattr(pool, "checkedout", None)
        idle = getattr(pool, "checkedin", None)
        if used is None or idle is None:  # a pool without counts (NullPool, StaticPool)
            return []
        overflow = getattr(pool, "overflow", lambda: 0)
        return [
            Observation(used(), {"db.client.connection.pool.name": name, "state": "used"}),
            Observation(idle(), {"db.client.connection.pool.name": name, "state": "idle"}),
            Observation(
                max(0, overflow()), {"db.client.connection.pool.name": name, "state": "overflow"}
            ),
            Observation(waiting(), {"db.client.connection.pool.name": name, "state": "waiting"}),
        ]

    telemetry.pools.append(connections)
