"""The access log: exactly one line per request, in one schema for every service.

Written after the response (or the failure) so it has the status, the sizes and the
latency. The field set is fixed (see ``FIELDS``) so that every service's lines can be
parsed and joined by the same query; absent values are ``null``, never missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiban import propagation, routes
from kiban.log import sink, span_id

__all__ = ["FIELDS", "AccessLogMiddleware", "redact_query"]

#: The access-log schema, in the order fields are written.
FIELDS = (
    "time",
    "log",
    "service",
    "method",
    "host",
    "path",
    "query",
    "route",
    "status",
    "request_bytes",
    "response_bytes",
    "latency_s",
    "user_agent",
    "user_ip",
    "remote_addr",
    "forwarded_for",
    "trace_id",
    "span_id",
    "request_id",
    "uid",
    "api_client",
)

_SECRET_PARTS = ("token", "password", "passwd", "secret", "apikey", "api_key", "api-key")
REDACTED = "[REDACTED]"
#: Status written when the client went away before any response was sent (as nginx does).
CLIENT_CLOSED = 499


def redact_query(query: str, names: Iterable[str] = ()) -> str:
    """Replace the values of secret-looking parameters; leave the rest byte for byte."""
    if not query:
        return query
    exact = {name.lower() for name in names}
    parts = []
    for part in query.split("&"):
        key, sep, _ = part.partition("=")
        lowered = key.lower()
        if sep and (lowered in exact or any(secret in lowered for secret in _SECRET_PARTS)):
            part = f"{key}={REDACTED}"
        parts.append(part)
    return "&".join(parts)


class AccessLogMiddleware:
    """Writes the access line for every HTTP request, whatever happened to it."""

    def __init__(self, app: ASGIApp, service: str = "", redact: Iterable[str] = ()) -> None:
        self.app = app
        self.service = service
        self.redact = frozenset(redact)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = {"status": CLIENT_CLOSED, "request_bytes": 0, "response_bytes": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["request_bytes"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["response_bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self._write(scope, state, time.perf_counter() - start)

    def _write(self, scope: Scope, state: dict[str, int], latency: float) -> None:
        context = propagation.current()
        host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
                break
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "log": "access",
            "service": self.service or None,
            "method": scope["method"],
            "host": host,
            "path": scope["path"],
            "query": redact_query(scope["query_string"].decode("latin-1"), self.redact) or None,
            "route": routes.template(scope),
            "status": state["status"],
            "request_bytes": state["request_bytes"],
            "response_bytes": state["response_bytes"],
            "latency_s": round(latency, 6),
            "user_agent": context.user_agent if context else None,
            "user_ip": context.user_ip if context else None,
            "remote_addr": context.remote_addr if context else None,
            "forwarded_for": context.forwarded_for if context else None,
            "trace_id": context.trace_id if context else None,
            "span_id": span_id(),
            "request_id": context.request_id if context else None,
            "uid": context.uid if context else None,
            "api_client": context.api_client if context else None,
        }
        if sink.json:
            sink.write(orjson.dumps(record))
        else:
            sink.write(_console_line(record).encode("utf-8"))


def _console_line(record: dict[str, Any]) -> str:
    head = (
        f"{record['time']} {record['status']} {record['method']} {record['path']}"
        f"{'?' + record['query'] if record['query'] else ''} {record['latency_s'] * 1000:.1f}ms"
    )
    rest = " ".join(
        f"{key}={value}"
        for key, value in record.items()
        if value is not None and key in ("trace_id", "uid", "user_ip", "api_client")
    )
    return f"{head} {rest}"
