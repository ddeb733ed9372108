"""gRPC on the chassis: kiban's request path for RPCs, as one ``grpc.aio`` interceptor.

What the HTTP chassis does for a request, ``Interceptor`` does for an RPC, in the same
order and with the same pieces: the request context from metadata under the same
trust rules (``propagation.Inbound``), a server span and ``rpc.server.duration``, the
route's security requirement and rate limit (``Policy.admit``, the same schemes reading
the same header names), one access line in the fixed schema, and errors as gRPC
statuses with ``google.rpc.Status`` details instead of problem+json:

    Problem(401)       UNAUTHENTICATED        Problem(403)   PERMISSION_DENIED
    Problem(429)       RESOURCE_EXHAUSTED + RetryInfo
    Problem(400, 422)  INVALID_ARGUMENT       Problem(404)   NOT_FOUND
    Problem(409)       ALREADY_EXISTS         Problem(503)   UNAVAILABLE
    a dependency down  UNAVAILABLE            a bug          INTERNAL, nothing leaked

Servicers are async (``grpc.aio``); a sync servicer method runs on a worker thread with
the request's context copied to it, so ``kiban.current()`` answers there too.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

import grpc
from fastapi import params
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.requests import HTTPConnection

from kiban import _errors as errors
from kiban import _log as log
from kiban import _propagation as propagation
from kiban._accesslog import AccessLog
from kiban._redact import redact_json
from kiban._rpcclient import DEADLINE
from kiban._telemetry import activate, deactivate
from kiban._trust import TrustedPeers
from kiban.security._declare import (
    RateLimitMarker,
    Requirement,
    SecurityConfigError,
)
from kiban.security._routing import Resolved

if TYPE_CHECKING:
    from kiban._app import Service

__all__ = ["GRPC_STATUS_OF", "HTTP_STATUS_OF", "Interceptor", "Method", "Registry", "peer_ip"]

#: The gRPC status a kiban problem's HTTP status becomes.
GRPC_STATUS_OF: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    412: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: The HTTP equivalent of each gRPC status (as grpc-gateway maps them), for the access
#: line's ``status`` and the dashboards that read it.
HTTP_STATUS_OF: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

Declaration = params.Depends | Sequence[params.Depends]


def _markers(declared: Declaration | None) -> tuple[Requirement | None, RateLimitMarker | None]:
    """The requirement and rate-limit marker in one level's declaration."""
    if declared is None:
        return None, None
    items = [declared] if isinstance(declared, params.Depends) else list(declared)
    requirement = None
    rate = None
    for item in items:
        dependency = getattr(item, "dependency", item)
        if isinstance(dependency, Requirement):
            requirement = dependency
        elif isinstance(dependency, RateLimitMarker):
            rate = dependency
        else:
            raise TypeError(
                f"expected Security(...), NoSecurity(), RateLimited(...) or Unlimited(), "
                f"got {item!r}"
            )
    return requirement, rate


class _Recorder:
    """Takes what a generated ``add_XServicer_to_server`` registers, to know its methods."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.methods: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.methods[service] = dict(handlers)


@dataclass(frozen=True)
class Method:
    """One RPC as the chassis sees it: its full name and resolved requirement."""

    path: str  # "/pkg.Service/Method"
    service: str
    name: str
    resolved: Resolved


@dataclass
class _Registration:
    adder: Callable[[Any, Any], None]
    servicer: Any
    security: Declaration | None
    methods: Mapping[str, Declaration]


class Registry:
    """The servicers a service serves over gRPC, with their security declarations.

    Resolved at start-up like HTTP routes: a method's requirement is the narrowest one
    declared (method, then service, then the API default given to ``kiban.Service``);
    a method with none anywhere stops the start, as an HTTP route would.
    """

    def __init__(self) -> None:
        self.registrations: list[_Registration] = []
        self.table: dict[str, Method] = {}

    def add(
        self,
        adder: Callable[[Any, Any], None],
        servicer: Any,
        *,
        security: Declaration | None = None,
        methods: Mapping[str, Declaration] | None = None,
    ) -> None:
        self.registrations.append(_Registration(adder, servicer, security, methods or {}))

    @property
    def services(self) -> list[str]:
        return sorted({method.service for method in self.table.values()})

    def resolve(self, default: Requirement | None, default_rate: Any) -> None:
        table: dict[str, Method] = {}
        unsecured = []
        for registration in self.registrations:
            recorder = _Recorder()
            registration.adder(registration.servicer, recorder)
            if not recorder.methods:
                raise SecurityConfigError(
                    f"{registration.adder.__name__} registered no methods by name: "
                    "regenerate the stubs with grpcio-tools >= 1.85"
                )
            service_requirement, service_rate = _markers(registration.security)
            for service, handlers in recorder.methods.items():
                unknown = set(registration.methods) - set(handlers)
                if unknown:
                    raise SecurityConfigError(
                        f"{service} has no method {', '.join(sorted(unknown))} "
                        f"(it has {', '.join(sorted(handlers))})"
                    )
                for name in handlers:
                    requirement, rate = _markers(registration.methods.get(name))
                    requirement = requirement or service_requirement or default
                    rate = rate or service_rate
                    path = f"/{service}/{name}"
                    if requirement is None:
                        unsecured.append(path)
                        continue
                    limit = rate.rate if rate is not None else default_rate
                    table[path] = Method(path, service, name, Resolved(requirement, limit))
        if unsecured:
            raise SecurityConfigError(
                "no security requirement for the gRPC methods "
                + ", ".join(unsecured)
                + ": declare security= or methods= when adding the servicer, "
                "or give kiban.Service(app, security=...)"
            )
        self.table = table

    def register(self, server: Any) -> None:
        """Add every servicer to ``server`` (a ``grpc.aio.Server``)."""
        for registration in self.registrations:
            registration.adder(registration.servicer, server)


def peer_ip(peer: str) -> str | None:
    """The IP in a gRPC peer string: ``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]").split("%", 1)[0] or None
    return None  # unix sockets and in-process channels have no IP


def _metadata_headers(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> list[tuple[bytes, bytes]]:
    """Metadata as the raw header list ``Inbound`` and the security schemes read.

    Binary (``-bin``) values and values that are not Latin-1 are left out: no kiban
    header is binary, and a value that cannot be a header cannot be a credential.
    """
    headers = []
    for key, value in metadata or ():
        if isinstance(value, bytes) or key.endswith("-bin"):
            continue
        try:
            headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
        except UnicodeEncodeError:
            continue
    return headers


def _size(message: Any) -> int:
    byte_size = getattr(message, "ByteSize", None)
    return int(byte_size()) if byte_size is not None else 0


class _Call:
    """One RPC on its way through the chassis: its context, span and outcome so far."""

    __slots__ = (
        "code",
        "context",
        "context_token",
        "deadline_token",
        "method",
        "received",
        "refusal",
        "scope",
        "sent",
        "span",
        "span_token",
        "start",
    )

    def __init__(self, interceptor: Interceptor, method: Method, context: Any) -> None:
        self.start = time.perf_counter()
        self.method = method
        self.code = grpc.StatusCode.OK
        self.received = 0
        self.sent = 0
        #: The problem security or the rate limit answered, if the call was refused.
        self.refusal: errors.Problem | None = None
        inbound = interceptor.inbound
        raw = _metadata_headers(context.invocation_metadata())
        peer = context.peer()
        remote = peer_ip(peer)
        self.scope = _scope(method.path, raw, remote)
        headers = inbound.read(raw)
        trusted = remote in inbound.trusted
        self.context = inbound.context(headers, remote, trusted)
        self.context_token = propagation.enter(self.context)
        remaining = context.time_remaining()
        self.deadline_token = DEADLINE.set(
            time.monotonic() + remaining if remaining is not None else None
        )
        parent, link = inbound.parent(headers, trusted)
        telemetry = interceptor.telemetry
        self.span = telemetry.start_rpc_span(
            method.service, method.name, remote or "", parent, headers.get("tracestate"), link
        )
        self.span_token = activate(self.span)


def _scope(path: str, headers: list[tuple[bytes, bytes]], remote: str | None) -> dict[str, Any]:
    """An ASGI-like scope of the RPC, for the security schemes and the access log."""
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode("latin-1"),
        "query_string": b"",
        "headers": headers,
        "client": (remote, 0) if remote else None,
        "scheme": "grpc",
        "root_path": "",
        "state": {},
    }


class Interceptor(grpc.aio.ServerInterceptor):
    """kiban's request path for every RPC the server answers."""

    def __init__(self, service: Service, registry: Registry, public: Iterable[str] = ()) -> None:
        settings = service.settings
        self.service = service
        self.registry = registry
        self.policy = service.policy
        self.telemetry = service.telemetry
        self.inbound = propagation.Inbound(
            settings.headers,
            extra=("tracestate",),
            trusted=TrustedPeers(settings.trusted_proxies),
            untrusted_parent=settings.trace_untrusted_parent,
        )
        self.access = AccessLog(settings.service_name) if settings.access_log else None
        #: Services answered without security or limits (health, reflection).
        self.public = frozenset(public)
        self.unavailable = errors.dependency_errors()
        self.inflight = 0
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}
        #: Switched on at runtime with the HTTP payload log (the debug endpoints).
        self.payloads = service.payloads

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return handler  # grpc answers UNIMPLEMENTED
        path = details.method
        cached = self._wrapped.get(path)
        if cached is not None and cached[0] is handler:
            return cached[1]  # a method's handler is the same object call after call
        method = self.registry.table.get(path)
        if method is None:
            service, _, name = path.strip("/").partition("/")
            if service not in self.public:
                return handler  # registered on the server outside kiban: not ours to wrap
            method = Method(path, service, name, Resolved(Requirement(()), None))
        wrapped = self._wrap(handler, method)
        self._wrapped[path] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: Method
    ) -> grpc.RpcMethodHandler[Any, Any]:
        common = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, stream_in=False), **common
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, stream_in=True), **common
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, stream_in=False), **common
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, method, stream_in=True), **common
        )

    def _unary(
        self, behavior: Callable[..., Any], method: Method, stream_in: bool
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        invoke = _invoker(behavior)

        async def unary(request: Any, context: Any) -> Any:
            call = await self._begin(method, context)
            try:
                if call.code is grpc.StatusCode.OK:
                    request = self._taken(request, call, stream_in)
                    response = await invoke(request, context)
                    call.sent = _size(response)
                    if self.payloads.enabled and not stream_in:
                        self._log_payloads(method, request, response)
                    return response
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self._finish(call, context)
            await self._abort_refused(call, context)
            return None

        return unary

    def _streaming(
        self, behavior: Callable[..., Any], method: Method, stream_in: bool
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            call = await self._begin(method, context)
            try:
                if call.code is grpc.StatusCode.OK:
                    request = self._taken(request, call, stream_in)
                    responses = behavior(request, context)
                    if inspect.isasyncgen(responses) or hasattr(responses, "__aiter__"):
                        async for response in responses:
                            call.sent += _size(response)
                            yield response
                    else:
                        for response in await asyncio.to_thread(list, responses):
                            call.sent += _size(response)
                            yield response
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self._finish(call, context)
            await self._abort_refused(call, context)

        return streaming

    def _log_payloads(self, method: Method, request: Any, response: Any) -> None:
        """The call's messages, as the HTTP payload log writes bodies (secrets redacted)."""
        log.info(
            "payload",
            method="POST",
            path=method.path,
            request_body=_render(request, self.payloads.max_bytes),
            response_body=_render(response, self.payloads.max_bytes),
        )

    def _taken(self, request: Any, call: _Call, stream_in: bool) -> Any:
        """The call's request, measured: a message now, a stream as it is read."""
        if stream_in:
            return self._counted(request, call)
        call.received = _size(request)
        return request

    async def _counted(self, requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
        async for request in requests:
            call.received += _size(request)
            yield request

    async def _begin(self, method: Method, context: Any) -> _Call:
        """Start the call's context and span, and admit it; a refusal is kept for later."""
        self.inflight += 1
        call = _Call(self, method, context)
        try:
            await self.policy.admit(
                method.resolved, HTTPConnection(call.scope), method.path, call.context
            )
        except errors.Problem as problem:
            call.code = GRPC_STATUS_OF.get(problem.status, grpc.StatusCode.UNKNOWN)
            call.refusal = problem
        return call

    async def _abort_refused(self, call: _Call, context: Any) -> None:
        if call.refusal is not None:
            await _abort(context, self.service.settings.service_name, call.refusal)

    async def _fail(self, call: _Call, exc: BaseException, context: Any) -> None:
        """Map what the servicer raised to its status; re-raises to end the call."""
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code()
            call.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            call.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, errors.Problem):
            call.code = GRPC_STATUS_OF.get(exc.status, grpc.StatusCode.UNKNOWN)
            await _abort(context, self.service.settings.service_name, exc)
        if isinstance(exc, self.unavailable):
            call.code = grpc.StatusCode.UNAVAILABLE
            errors.UNAVAILABLE.warning(rpc=call.method.path, error_type=type(exc).__name__)
            await _abort(
                context,
                self.service.settings.service_name,
                errors.Problem(503, "A dependency of the service is unavailable; retry later."),
            )
        if not isinstance(exc, Exception):
            raise exc
        call.code = grpc.StatusCode.INTERNAL
        if call.span.is_recording():
            call.span.record_exception(exc)
        errors.report(exc, {"method": "POST", "path": call.method.path})
        log.exception("unhandled exception", rpc=call.method.path)
        await _abort(
            context, self.service.settings.service_name, errors.Problem(500, "Internal error.")
        )

    def _finish(self, call: _Call, context: Any) -> None:
        self.inflight -= 1
        code = context.code() if call.code is grpc.StatusCode.OK else call.code
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.OK if code in (None, 0) else grpc.StatusCode.UNKNOWN
        elapsed = time.perf_counter() - call.start
        method = call.method
        span_id = self.telemetry.end_rpc_span(
            call.span, method.service, method.name, code.value[0], elapsed
        )
        deactivate(call.span_token)
        DEADLINE.reset(call.deadline_token)
        context_now = propagation.current() or call.context
        propagation.leave(call.context_token)
        if self.access is not None:
            self.access.write(
                context_now,
                call.scope,
                method.path,
                None,
                HTTP_STATUS_OF.get(code, 500),
                call.received,
                call.sent,
                elapsed,
                span_id,
                grpc_status=code.name,
            )


def _render(message: Any, limit: int) -> Any:
    """A message as JSON with secret-looking fields redacted; a large one by its size."""
    if message is None:
        return None
    size = _size(message)
    descriptor = getattr(message, "DESCRIPTOR", None)
    if descriptor is None:
        return f"<{type(message).__name__}>"
    if size > limit:
        return f"<{size} bytes of {descriptor.full_name}>"
    return redact_json(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _invoker(behavior: Callable[..., Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    """An async servicer method as it is; a sync one run on a thread, context copied."""
    if inspect.iscoroutinefunction(behavior):
        return cast("Callable[[Any, Any], Awaitable[Any]]", behavior)

    async def on_thread(request: Any, context: Any) -> Any:
        return await asyncio.to_thread(behavior, request, context)

    return on_thread


def _status(service: str, problem: errors.Problem) -> grpc.Status:
    code = GRPC_STATUS_OF.get(problem.status, grpc.StatusCode.UNKNOWN)
    message = problem.detail or problem.title or HTTPStatus(problem.status).phrase
    info = error_details_pb2.ErrorInfo(
        reason=HTTPStatus(problem.status).name,
        domain=service,
        metadata={
            key: str(value)
            for key, value in problem.extensions.items()
            if isinstance(value, str | int | float)
        }
        | {"http_status": str(problem.status)},
    )
    details = [info]
    retry_after = {k.lower(): v for k, v in problem.headers.items()}.get("retry-after")
    if retry_after is not None and retry_after.isdigit():
        details.append(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after)))
        )
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


async def _abort(context: Any, service: str, problem: errors.Problem) -> None:
    status = _status(service, problem)
    await context.abort(status.code, status.details, status.trailing_metadata)


def code_name(code: int) -> str:
    """``code_pb2`` name of a numeric status code (for tests and messages)."""
    return str(code_pb2.Code.Name(code))
