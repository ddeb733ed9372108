"""The access log: exactly one line per request, in one schema for every service.

Written after the response (or the failure) so it has the status, the sizes and the
latency. The field set is fixed (see ``FIELDS``) so that every service's lines can be
parsed and joined by the same query; absent values are ``null``, never missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Set
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import Scope

from kiban._log import sink
from kiban._propagation import RequestContext
from kiban._redact import redact_query

__all__ = ["FIELDS", "AccessLog"]

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
    "grpc_status",
    "interrupted",
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

#: Status written when the client went away before any response was sent (as nginx does).
CLIENT_CLOSED = 499


class AccessLog:
    """Writes the access line of a request; kiban's request path calls it once per request."""

    def __init__(
        self, service: str = "", redact: Iterable[str] = (), credentials: Set[str] = frozenset()
    ) -> None:
        self.service = service or None
        self.redact = frozenset(redact)
        #: The query parameters the security schemes take credentials from, kept up to
        #: date by the policy: always redacted, whatever they are called.
        self.credentials = credentials
        self._second = -1
        self._prefix = ""

    def _time(self) -> str:
        """RFC 3339 UTC with microseconds; the part up to the second is formatted once."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = second
        return "%s%06dZ" % (self._prefix, (now - second) * 1_000_000)  # noqa: UP031 (faster)

    def write(
        self,
        context: RequestContext,
        scope: Scope,
        route: str | None,
        host: str | None,
        status: int,
        request_bytes: int,
        response_bytes: int,
        latency: float,
        span_id: str | None,
        interrupted: str | None = None,
        grpc_status: str | None = None,
    ) -> None:
        """``grpc_status`` is an RPC's code name (``status`` its HTTP equivalent)."""
        query = scope["query_string"]
        record: dict[str, Any] = {
            "time": self._time(),
            "log": "access",
            "service": self.service,
            "method": scope["method"],
            "host": host,
            "path": scope["path"],
            "query": (
                redact_query(query.decode("latin-1"), self.redact | self.credentials)
                if query
                else None
            ),
            "route": route,
            "status": status,
            "grpc_status": grpc_status,
            #: Why kiban cut the request short (``"shutdown"``, ``"timeout"``), else null.
            "interrupted": interrupted,
            "request_bytes": request_bytes,
            "response_bytes": response_bytes,
            # Whole microseconds: round(x, 6) is a decimal conversion, this an int one.
            "latency_s": round(latency * 1_000_000) / 1_000_000,
            "user_agent": context.user_agent,
            "user_ip": context.user_ip,
            "remote_addr": context.remote_addr,
            "forwarded_for": context.forwarded_for,
            "trace_id": context.trace_id,
            "span_id": span_id,
            "request_id": context.request_id,
            "uid": context.uid,
            "api_client": context.api_client,
        }
        if sink.json:
            sink.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE), newline=False)
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
