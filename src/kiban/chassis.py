"""kiban's request path: one pure ASGI layer around the app, in the chain's order.

    context      inbound headers -> RequestContext      propagation.py
    telemetry    server span, HTTP duration histogram   telemetry.py
    access log   one fixed-schema line per request      accesslog.py
    drain        Connection: close while shutting down  health.py, server.py
    errors       any exception -> problem+json          errors.py
    body limit   413 past HTTP_MAX_BODY_BYTES           limits.py
    probes       /health/*, /metrics answered here      health.py, telemetry.py
    policy       the route's security and rate limit    security/policy.py
    payloads     bodies logged when switched on         debug.py

Each step is written in the module of its concept; this layer runs them in that order
with one pass over the headers and one wrapper around ``send`` and ``receive``, the
payload log (switched on at runtime) being the one layer inside it. One layer instead
of eight middlewares is what keeps the chassis cheap on every request.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from opentelemetry import trace
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiban import errors, propagation, routes
from kiban.accesslog import CLIENT_CLOSED, AccessLog
from kiban.debug import PayloadLogMiddleware
from kiban.health import liveness, readiness_endpoint
from kiban.limits import Body, check_length
from kiban.ratelimit import Decision
from kiban.security.policy import RATE_DECISION
from kiban.telemetry import activate, deactivate

if TYPE_CHECKING:
    from kiban.app import Service

__all__ = ["Chassis"]

_CLOSE = (b"connection", b"close")
#: The ASGI extension of kiban's server (``kiban.run``): under ``"lines"`` in this
#: extension the request path puts, just before it sends the response start, header
#: lines it has already checked; the server writes them into that response's head as
#: they are instead of checking each header again.
ENCODED_HEADERS = "kiban.encoded_headers"


class Chassis:
    """The whole of kiban's per-request work for ``service``, around ``app``."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        settings = service.settings
        self.app = app
        # Payload logging is a layer of its own, stepped into only while it is switched on.
        self.payloads = service.payloads
        self.logged = PayloadLogMiddleware(app, service.payloads)
        self.api = service.app
        self.policy = service.policy
        self.health = service.health
        self.telemetry = service.telemetry
        self.access = (
            AccessLog(settings.service_name, settings.log_redact_params)
            if settings.access_log
            else None
        )
        self.max_body = settings.http_max_body_bytes
        # Probes and scrapes are answered here, before routing: public, never rate
        # limited, and no cost to the app's own routes, which no longer try them first.
        self.probes = {
            route.path: route
            for route in (
                Route("/health/liveness", liveness, methods=["GET"]),
                Route("/health/readiness", readiness_endpoint(service.health), methods=["GET"]),
                Route("/metrics", service.telemetry.metrics_endpoint, methods=["GET"]),
            )
        }
        self.inbound = propagation.Inbound(
            settings.headers,
            extra=("tracestate", "host", "content-length", "content-type"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        inbound = self.inbound
        headers = inbound.read(scope["headers"])
        client = scope.get("client")
        remote = client[0] if client else None
        context = inbound.context(headers, remote)
        context_token = propagation.enter(context)
        method = scope["method"]
        path = scope["path"]
        telemetry = self.telemetry
        span: trace.Span | None = None
        span_token = None
        if path not in telemetry.exclude:
            span = telemetry.start_span(
                method,
                path,
                scope.get("scheme", "http"),
                remote or "",
                context.trace_id,
                headers.get("traceparent"),
                headers.get("tracestate"),
            )
            span_token = activate(span)
        telemetry.active += 1
        status: int | None = None  # until the response starts
        response_bytes = 0
        body: Body | None = None
        health = self.health
        extensions = scope.get("extensions")
        head = extensions.get(ENCODED_HEADERS) if extensions is not None else None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                rate: Decision | None = scope.get(RATE_DECISION)
                added: list[tuple[bytes, bytes]] = []
                if head is not None:
                    lines = inbound.lines(context)
                    head["lines"] = lines if rate is None else lines + rate.lines()
                else:
                    added = inbound.echoed(context)
                    if rate is not None:
                        added.extend(rate.encoded())
                if health.draining:  # a header, not a line: the server must see it to close
                    added.append(_CLOSE)
                if added:
                    message["headers"] = [*message.get("headers", ()), *added]
            else:
                response_bytes += len(message.get("body", b""))
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal body
            message = await receive()
            if message["type"] == "http.request":
                if body is None:
                    body = Body(self.max_body, headers.get("content-type"))
                body.take(message)
            return message

        try:
            length = headers.get("content-length")
            if length is not None:
                check_length(length, self.max_body)
            probe = self.probes.get(path)
            if probe is not None:
                scope["route"] = probe
                await probe.handle(scope, receive_wrapper, send_wrapper)
                return
            await self.policy.before_routing(self.api, scope, context)
            inner = self.logged if self.payloads.enabled else self.app
            await inner(scope, receive_wrapper, send_wrapper)
        except Exception as exc:
            await errors.answer_escaped(exc, scope, receive, send_wrapper, status is not None)
        finally:
            elapsed = perf_counter() - start
            telemetry.active -= 1
            route = routes.template(scope)
            final = CLIENT_CLOSED if status is None else status
            span_id = None
            if span is not None:
                span_id = telemetry.end_span(span, method, final, route, elapsed)
                deactivate(span_token)
            if self.access is not None:
                self.access.write(
                    propagation.current() or context,  # a verified identity may have replaced it
                    scope,
                    route,
                    headers.get("host"),
                    final,
                    body.received if body is not None else 0,
                    response_bytes,
                    elapsed,
                    span_id,
                )
            propagation.leave(context_token)
