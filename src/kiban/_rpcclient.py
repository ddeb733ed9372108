"""Outgoing gRPC: a channel whose every call carries the request context, as the HTTP client.

``service.grpc_channel("members:8081")`` gives a ``grpc.aio`` channel whose interceptors
set the same metadata the HTTP client sets as headers (trace id, ``traceparent`` of a
client span, uid, forwarded user-agent, user IP, API client, this hop in
X-Forwarded-For, and the identity token only to internal hosts), and give each call
the smaller of its own timeout, ``CLIENT_READ_TIMEOUT`` and what is left of the
current RPC's deadline: a caller that gave up is not waited for downstream.

Each channel throttles its target as the HTTP client throttles a host (``Breaker``,
Google SRE's adaptive throttling): while most recent calls end in a server-side
failure, new calls fail at once with ``UNAVAILABLE`` ("not made") instead of adding
load to a downstream that is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kiban import _propagation as propagation
from kiban._client import Breaker, _ascii, is_internal
from kiban._config import Settings

__all__ = ["DEADLINE", "Channel", "channel"]

#: The current request's or RPC's deadline (``time.monotonic()``).
DEADLINE = propagation.DEADLINE
_tracecontext = TraceContextTextMapPropagator()
#: Codes that count against the target in its breaker: the server failed or was
#: overloaded (HTTP's 5xx and 429). A caller's own cancellation counts for nothing.
_FAILED = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class _Propagating:
    """What the channel does around every call, whatever its kind; ``interceptors()``
    gives it to grpc.aio as one interceptor of each kind (a channel files an interceptor
    under the first kind it is an instance of, so one object of all four kinds would
    intercept unary calls only)."""

    def __init__(
        self,
        settings: Settings,
        host: str,
        tracer: trace.Tracer | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.names = settings.headers
        self.breaker = breaker or Breaker()
        self._ending: set[asyncio.Future[None]] = set()
        self.internal = is_internal(host, settings.internal_hosts)
        self.timeout = settings.client_read_timeout
        self.tracer = tracer or trace.get_tracer("kiban._rpcclient")
        self.host = host
        self._managed = propagation.managed_headers(settings.headers)

    def _details(
        self, details: grpc.aio.ClientCallDetails, span: trace.Span
    ) -> grpc.aio.ClientCallDetails:
        # Whatever the caller set for these is replaced: they come from the context only.
        metadata = [
            (key, value)
            for key, value in (details.metadata or ())
            if key.lower() not in self._managed
        ]
        context = propagation.current()
        if context is not None and self.internal:
            metadata += list(_ascii(propagation.outbound_headers(context, self.names)).items())
        if self.internal:
            carrier: dict[str, str] = {}
            _tracecontext.inject(carrier, trace.set_span_in_context(span))
            metadata += list(carrier.items())
        timeout = min(details.timeout or self.timeout, self.timeout)
        deadline = DEADLINE.get()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        return grpc.aio.ClientCallDetails(
            details.method,
            timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )

    def _span(self, details: grpc.aio.ClientCallDetails) -> trace.Span:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.strip("/").partition("/")
        return self.tracer.start_span(
            method.strip("/"),
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "server.address": self.host,
            },
        )

    async def _start(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> tuple[Any, trace.Span]:
        if not self.breaker.allow():
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=f"{self.host} is failing: the call was not made",
            )
        span = self._span(details)
        return await continuation(self._details(details, span), request), span

    def _finish(self, span: trace.Span, code: grpc.StatusCode) -> None:
        _end(span, code)
        if code is not grpc.StatusCode.CANCELLED:  # the caller's doing, not the target's
            self.breaker.record(code not in _FAILED)

    async def _unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """A call with one response: awaited here, so its outcome is known when it ends;
        the call itself is returned, so the caller still sees its metadata and error."""
        call, span = await self._start(continuation, details, request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            self._finish(span, error.code())
        except asyncio.CancelledError:
            self._finish(span, grpc.StatusCode.CANCELLED)
            raise
        else:
            self._finish(span, grpc.StatusCode.OK)
        return call

    async def _streaming(self, continuation: Any, details: Any, request: Any) -> Any:
        """A call with a stream of responses: its outcome is read when the stream ends."""
        call, span = await self._start(continuation, details, request)

        async def ended() -> None:
            self._finish(span, await call.code())  # aio reads a code only by awaiting

        def done(_: Any) -> None:
            ending = asyncio.ensure_future(ended())
            self._ending.add(ending)  # held until it has run: the loop keeps weak refs
            ending.add_done_callback(self._ending.discard)

        call.add_done_callback(done)
        return call

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [
            _UnaryUnary(self._unary),
            _UnaryStream(self._streaming),
            _StreamUnary(self._unary),
            _StreamStream(self._streaming),
        ]


Intercept = Callable[[Any, Any, Any], Awaitable[Any]]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, intercept: Intercept) -> None:
        self.intercept = intercept

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self.intercept(continuation, details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, intercept: Intercept) -> None:
        self.intercept = intercept

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self.intercept(continuation, details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, intercept: Intercept) -> None:
        self.intercept = intercept

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self.intercept(continuation, details, requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, intercept: Intercept) -> None:
        self.intercept = intercept

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self.intercept(continuation, details, requests)


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class _Deferred:
    """A multi-callable made on its first call, from the channel opened then."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._callable is None:
            self._callable = self._make()
        return self._callable(*args, **kwargs)


class Channel:
    """A ``grpc.aio`` channel opened on first use, in the loop that serves.

    ``grpc.aio`` binds a channel to the event loop it is made in, and a service builds
    its clients (and their stubs) before the server's loop runs. This channel can be
    given to a generated stub at once: the real one is opened on the first call.
    """

    def __init__(self, open_channel: Callable[[], grpc.aio.Channel]) -> None:
        self._open = open_channel
        self._channel: grpc.aio.Channel | None = None

    @property
    def opened(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._open()
        return self._channel

    def _deferred(self, kind: str, method: str, args: Any, kwargs: Any) -> _Deferred:
        return _Deferred(lambda: getattr(self.opened, kind)(method, *args, **kwargs))

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._deferred("unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._deferred("unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._deferred("stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._deferred("stream_stream", method, args, kwargs)

    async def close(self, grace: float | None = None) -> None:
        if self._channel is not None:
            await self._channel.close(grace)

    def __getattr__(self, name: str) -> Any:  # channel_ready, get_state, ...
        return getattr(self.opened, name)


def channel(
    settings: Settings,
    target: str,
    tracer: trace.Tracer | None = None,
    breaker: Breaker | None = None,
    **options: Any,
) -> Channel:
    """An insecure ``grpc.aio`` channel to ``target`` (``host:port``) that propagates context.

    ``options`` are grpc channel options: ``**{"grpc.max_receive_message_length": n}``.
    ``breaker`` throttles the target (one per channel by default).
    """
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    return Channel(
        lambda: grpc.aio.insecure_channel(
            target,
            options=list(options.items()),
            interceptors=_Propagating(settings, host, tracer, breaker).interceptors(),
        )
    )
