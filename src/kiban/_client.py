"""The outgoing HTTP client: every call carries the request context to the next service.

``service.http_client(base_url=...)`` (or ``kiban._client.create(settings, ...)``) gives a
pooled ``httpx.AsyncClient`` whose transport, on every request, sets the trace id, W3C
``traceparent`` (of a client span it opens), uid, forwarded user-agent, user IP, API
client and, for internal hosts only, the identity token, and appends this hop to
X-Forwarded-For. Nothing is passed by hand, and a call made outside a request (a
background task) carries none of the user headers rather than stale ones. Idempotent
calls are retried a bounded number of times on connection failures and 502/503/504
(not when the answer says ``Retry-After``), within a retry budget (about a tenth of the
calls) and within the request's time budget: each call gets no more than what is left
of it, and an internal callee is told the rest (``x-request-timeout-ms``). A
downstream failing most calls is throttled locally (``Breaker``): calls to it fail fast
(``CircuitOpen``, answered 503 upstream) until it recovers.
"""

from __future__ import annotations

import asyncio
import fnmatch
import random
import time
from collections.abc import Iterable
from typing import Any

import httpx
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kiban import _propagation as propagation
from kiban._breaker import Breaker
from kiban._config import HeaderNames, Settings

__all__ = [
    "Breaker",
    "CircuitOpen",
    "PropagatingTransport",
    "RetryBudget",
    "create",
    "create_with_transport",
]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_STATUSES = frozenset({502, 503, 504})
_tracecontext = TraceContextTextMapPropagator()


def _ascii(headers: dict[str, str]) -> dict[str, str]:
    """The headers with every byte past ASCII percent-encoded (``café`` -> ``caf%C3%A9``).

    ASGI gives header values as latin-1 text of the bytes received; httpx encodes and
    decodes header values as ASCII and fails the whole call on anything else.
    Propagation must never make a request fail, so the bytes go on, escaped.
    """
    return {name: value if value.isascii() else _escape(value) for name, value in headers.items()}


def _escape(value: str) -> str:
    try:
        raw = value.encode("latin-1")  # the bytes as received
    except UnicodeEncodeError:
        raw = value.encode()  # text made here (a token's subject)
    return "".join(chr(byte) if byte < 0x80 else f"%{byte:02X}" for byte in raw)


#: Kept back from the budget forwarded downstream: the time to carry its answer back.
BUDGET_MARGIN = 0.01


def _within_budget(request: httpx.Request, left: float, internal: bool, names: HeaderNames) -> None:
    """Give the call no more than the request's budget, and tell an internal callee.

    With nothing left the call is not made at all: it could only time out downstream.
    """
    if left <= 0:
        raise httpx.ReadTimeout("no time left of the request's budget", request=request)
    timeouts = dict(request.extensions.get("timeout") or {})
    for phase in ("connect", "read", "write", "pool"):
        current = timeouts.get(phase)
        timeouts[phase] = left if current is None else min(current, left)
    request.extensions["timeout"] = timeouts
    if internal:
        request.headers[names.timeout] = str(max(0, int((left - BUDGET_MARGIN) * 1000)))


def is_internal(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ours (matches a pattern such as ``*.svc.cluster.local``)."""
    host = host.lower()
    return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in patterns)


class CircuitOpen(httpx.TransportError):
    """The downstream has failed most recent calls: this one was not made (fails fast)."""


class RetryBudget:
    """Retries as a share of calls (Finagle's and gRPC's retry budget): at most about
    ``ratio`` of the calls made, plus a small reserve, so a failing downstream gets
    its load plus a tenth, never three times it."""

    def __init__(self, ratio: float = 0.1, reserve: float = 10.0) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self.tokens = reserve

    def deposit(self) -> None:
        self.tokens = min(self.reserve, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class PropagatingTransport(httpx.AsyncBaseTransport):
    """Adds the context headers and a client span to each request, and retries safely."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        names: HeaderNames,
        internal_hosts: Iterable[str],
        retries: int = 2,
        backoff: float = 0.05,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.inner = inner
        self.names = names
        self.internal_hosts = tuple(internal_hosts)
        self.retries = retries
        self.backoff = backoff
        self.retry_budget = RetryBudget()
        self.breakers: dict[str, Breaker] = {}
        self.durations = metrics.get_meter("kiban._client").create_histogram(
            "http.client.request.duration", unit="s", description="Duration of outgoing calls."
        )
        #: The service's tracer (its provider's processors see the client spans), or
        #: the global one.
        self.tracer = tracer or trace.get_tracer("kiban._client")
        self._managed = propagation.managed_headers(names)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Whatever the caller set for these is replaced: they come from the context only.
        for name in self._managed:
            if name in request.headers:
                del request.headers[name]
        internal = is_internal(request.url.host, self.internal_hosts)
        left = propagation.remaining()
        if left is not None:
            _within_budget(request, left, internal, self.names)
        context = propagation.current()
        if context is not None and internal:
            request.headers.update(_ascii(propagation.outbound_headers(context, self.names)))
        method = request.method
        with self.tracer.start_as_current_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": method,
                "server.address": request.url.host,
                "server.port": request.url.port or (443 if request.url.scheme == "https" else 80),
                "url.full": str(request.url.copy_with(query=None)),
            },
        ) as span:
            if internal:
                carrier: dict[str, str] = {}
                _tracecontext.inject(carrier)
                request.headers.update(carrier)
            response = await self._guarded(request, span)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def _guarded(self, request: httpx.Request, span: trace.Span) -> httpx.Response:
        """The call through its host's breaker, measured."""
        host = request.url.host
        breaker = self.breakers.get(host)
        if breaker is None:
            breaker = self.breakers[host] = Breaker()
        attributes: dict[str, str | int] = {
            "http.request.method": request.method,
            "server.address": host,
        }
        if not breaker.allow():
            span.set_status(Status(StatusCode.ERROR, "circuit open"))
            raise CircuitOpen(f"{host} is failing: the call was not made", request=request)
        started = time.perf_counter()
        try:
            response = await self._send(request, span)
        except httpx.TransportError as exc:
            breaker.record(False)
            attributes["error.type"] = type(exc).__name__
            self.durations.record(time.perf_counter() - started, attributes)
            raise
        breaker.record(response.status_code < 500 and response.status_code != 429)
        attributes["http.response.status_code"] = response.status_code
        self.durations.record(time.perf_counter() - started, attributes)
        return response

    async def _send(self, request: httpx.Request, span: trace.Span) -> httpx.Response:
        attempt = 0
        self.retry_budget.deposit()
        while True:
            try:
                response = await self.inner.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Never sent: safe to retry whatever the method.
                if attempt >= self.retries or not self._may_retry(attempt):
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    raise
            else:
                retryable = (
                    request.method in IDEMPOTENT
                    and response.status_code in RETRY_STATUSES
                    # A server that says when to come back is overloaded: not now.
                    and "retry-after" not in response.headers
                )
                if not retryable or attempt >= self.retries or not self._may_retry(attempt):
                    return response
                await response.aclose()
            attempt += 1
            span.set_attribute("http.request.resend_count", attempt)
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        jitter = 0.5 + random.random()  # noqa: S311 (not a secret)
        return float(self.backoff * 2 ** (attempt - 1) * jitter)

    def _may_retry(self, attempt: int) -> bool:
        """Whether one more attempt fits the request's time and the retry budget."""
        left = propagation.remaining()
        if left is not None and left <= self.backoff * (2**attempt):
            return False
        return self.retry_budget.withdraw()

    async def aclose(self) -> None:
        await self.inner.aclose()


def create(
    settings: Settings,
    *,
    base_url: str = "",
    retries: int | None = None,
    timeout: httpx.Timeout | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """A pooled client that propagates the request context; close it on shutdown."""
    return create_with_transport(
        settings, base_url=base_url, retries=retries, timeout=timeout, **kwargs
    )[0]


def create_with_transport(
    settings: Settings,
    *,
    base_url: str = "",
    retries: int | None = None,
    timeout: httpx.Timeout | None = None,
    tracer: trace.Tracer | None = None,
    **kwargs: Any,
) -> tuple[httpx.AsyncClient, PropagatingTransport]:
    """``create``'s client and its kiban transport (whose ``inner`` tests may replace)."""
    transport = PropagatingTransport(
        httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20)
        ),
        settings.headers,
        settings.internal_hosts,
        retries=settings.client_retries if retries is None else retries,
        tracer=tracer,
    )
    client = httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=timeout
        or httpx.Timeout(
            settings.client_read_timeout,
            connect=settings.client_connect_timeout,
            pool=settings.client_connect_timeout,
        ),
        follow_redirects=False,
        **kwargs,
    )
    return client, transport
