"""kiban's request path: one pure ASGI layer around the app, in the chain's order.

    shedding     503 past the in-flight cap or load     _shedding.py
    context      inbound headers -> RequestContext      _propagation.py, _trust.py
    telemetry    server span, HTTP duration histogram   _telemetry.py
    access log   one fixed-schema line per request      _accesslog.py
    drain        Connection: close while shutting down  _health.py, _server.py
    errors       any exception -> problem+json          _errors.py
    body limit   413 past HTTP_MAX_BODY_BYTES           _bodylimit.py
    probes       /health/*, /metrics answered here      _health.py, _telemetry.py
    policy       the route's security and rate limit    security/_policy.py
    timeouts     504 past the handler's deadline        security/_declare.py
    payloads     bodies logged when switched on         _debug.py

Each step is written in the module of its concept; this layer runs them in that order
with one pass over the headers and one wrapper around ``send`` and ``receive``, the
payload log (switched on at runtime) being the one layer inside it. One layer instead
of eight middlewares is what keeps the chassis cheap on every request.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from contextvars import Token
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Protocol

from opentelemetry import trace
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiban import _errors as errors
from kiban import _log as log
from kiban import _propagation as propagation
from kiban import _routes as routes
from kiban._accesslog import CLIENT_CLOSED, AccessLog
from kiban._bodylimit import Body, check_length
from kiban._debug import PayloadLogMiddleware
from kiban._health import liveness, readiness_endpoint
from kiban._propagation import RequestContext
from kiban._ratelimit import Decision
from kiban._rolling import Rolling
from kiban._shedding import Shedder
from kiban._telemetry import activate, deactivate
from kiban._trust import AllowedHosts, TrustedPeers, local_location
from kiban.security._declare import HANDLER_TIMEOUT
from kiban.security._policy import RATE_DECISION

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kiban._config import Settings
    from kiban._debug import PayloadLog
    from kiban._health import Checker
    from kiban._telemetry import Telemetry
    from kiban.security._policy import Policy

__all__ = ["Chassis", "Exchange", "Lifecycle"]

_CLOSE = (b"connection", b"close")
_REFUSED = errors.problem_body(503, "The service is at capacity; retry shortly.")
_REFUSED_HEAD = {
    "type": "http.response.start",
    "status": 503,
    "headers": [
        (b"content-type", errors.PROBLEM_JSON.encode()),
        (b"content-length", str(len(_REFUSED)).encode()),
        (b"retry-after", b"1"),
    ],
}
_REFUSED_BODY = {"type": "http.response.body", "body": _REFUSED}
#: How often requests past their handler deadline are looked for.
EXPIRY_TICK = 0.05
#: Seconds after the last refusal that readiness still reports the load (degraded).
SATURATION_WINDOW = 5
#: A body this size goes to the socket's buffers at once: no write timeout needed.
_BUFFERED = 64 * 1024


#: Exceptions that are answers (a 4xx or 5xx problem), not bugs to record on the span.
_EXPECTED = (errors.Problem, HTTPException)


class ClientTooSlow(Exception):
    """The client stopped taking the response (``HTTP_WRITE_TIMEOUT``)."""


class Lifecycle(Protocol):
    """What runs around the app's own lifespan: kiban's start-up and cleanups (``Service``)."""

    async def startup(self) -> None: ...

    def started(self) -> None: ...

    async def shutdown(self) -> None: ...


class Chassis:
    """The whole of kiban's per-request work, around ``app``.

    Built from its collaborators, each a concept of its own module: the settings, the
    routes' ``policy`` (security, rate limits, handler timeouts), the ``telemetry``,
    the ``health`` checker (drain, readiness), the runtime ``payloads`` switch, the set
    of requests ``inflight`` (which the shutdown reaches), and the ``lifecycle`` run
    around the app's lifespan. ``api`` is the FastAPI app the routes and exception
    handlers are on; ``app`` is the ASGI app inside the chassis (its middleware stack).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api: FastAPI,
        settings: Settings,
        policy: Policy,
        telemetry: Telemetry,
        health: Checker,
        payloads: PayloadLog,
        inflight: set[Exchange],
        lifecycle: Lifecycle,
    ) -> None:
        self.app = app
        self.lifecycle = lifecycle
        # Payload logging is a layer of its own, stepped into only while it is switched on.
        self.payloads = payloads
        self.logged = PayloadLogMiddleware(app, payloads)
        self.api = api
        self.policy = policy
        self.health = health
        self.telemetry = telemetry
        self.access = (
            AccessLog(
                settings.service_name,
                settings.log_redact_params,
                credentials=policy.query_credentials,
            )
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
                Route("/health/readiness", readiness_endpoint(health), methods=["GET"]),
                Route("/metrics", telemetry.metrics_endpoint, methods=["GET"]),
            )
        }
        #: The requests being served, for the shutdown to interrupt past its timeout.
        self.inflight = inflight
        self.inbound = propagation.Inbound(
            settings.headers,
            extra=("tracestate", "host", "content-length", "content-type"),
            trusted=TrustedPeers(settings.trusted_proxies),
            untrusted_parent=settings.trace_untrusted_parent,
        )
        self.hosts = AllowedHosts(settings.allowed_hosts)
        self.log_buffering = settings.log_buffering
        self.max_inflight = settings.http_max_inflight
        self.handler_timeout = settings.http_handler_timeout or None
        self.read_body_timeout = settings.http_read_body_timeout
        self.write_timeout = settings.http_write_timeout
        #: Requests refused, in one-second buckets over the last SATURATION_WINDOW.
        self._refused = Rolling(1.0, SATURATION_WINDOW, lambda: [0], monotonic)
        health.saturation = self.saturation
        self._expiry: asyncio.Future[None] | None = None
        self.shedder = (
            Shedder(
                settings.http_shed_loop_lag,
                lag=telemetry.current_lag,
                cpu_threshold=settings.http_shed_cpu,
                cpu=lambda: telemetry.cpu_usage,
            )
            if settings.http_shed_loop_lag or settings.http_shed_cpu
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.websocket(scope, receive, send)
            return
        if kind == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        if (self.max_inflight or self.shedder is not None) and scope["path"] not in self.probes:
            reason = self.refusal()
            if reason is not None:
                await self.refuse(send, reason)
                return
        exchange = Exchange(self, scope, receive, send)
        inflight = self.inflight
        inflight.add(exchange)
        try:
            headers = exchange.headers
            length = headers.get("content-length")
            if length is not None:
                check_length(length, self.max_body)
            probe = self.probes.get(exchange.path)
            if probe is not None:
                scope["route"] = probe
                await probe.handle(scope, exchange.receive, exchange.send)
                return
            # After the probes: kubelet and Prometheus address a pod by its IP.
            hosts = self.hosts
            if not hosts.any and headers.get("host") not in hosts:
                raise errors.Problem(400, "The Host header names no host this service serves.")
            loop = asyncio.get_running_loop()
            began = loop.time()
            default = self.handler_timeout
            deadline = None if default is None else began + default
            cap = None  # the caller's budget, which no route's timeout exceeds
            if exchange.budget is not None:
                cap = began + exchange.budget
                deadline = cap if deadline is None else min(deadline, cap)
            # Kept on the exchange, not a timer per request: the expiry task cancels the
            # request once its deadline has passed (the head deadline's pattern).
            exchange.deadline = deadline
            exchange.began = began
            exchange.task = asyncio.current_task()
            if deadline is not None and self._expiry is None:
                self._expiry = asyncio.ensure_future(self._expire(loop))
            # The route's marker narrows it once FastAPI has routed the request.
            scope[HANDLER_TIMEOUT] = (exchange, began, default, cap)
            try:
                await self.policy.before_routing(self.api, scope, exchange.context)
                inner = self.logged if self.payloads.enabled else self.app
                await inner(scope, exchange.receive, exchange.send)
            except asyncio.CancelledError:
                if exchange.timed_out is None:
                    raise  # the server's, or another cancellation: not a timeout
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # this cancellation was kiban's, and ends here
                self.timed_out(exchange, began)
        except ClientTooSlow:
            pass  # logged; the server closes the connection of an unfinished response
        except Exception as exc:
            exchange.failed = not isinstance(exc, _EXPECTED)
            if exchange.failed:
                exchange.error = type(exc).__qualname__
            span = exchange.span
            if span is not None and span.is_recording() and not isinstance(exc, _EXPECTED):
                span.record_exception(exc)  # a bug: its type and traceback on the span
            if exchange.interrupted is None:
                handlers = self.api.exception_handlers
                await errors.answer_escaped(
                    exc,
                    scope,
                    receive,
                    exchange.send,
                    exchange.status is not None,
                    handlers.get(Exception) or handlers.get(500),
                )
        except asyncio.CancelledError:
            # The server cancels what is still running once the shutdown has answered
            # it: the request is over, not failed. Any other cancellation goes on.
            if exchange.interrupted is None:
                raise
        finally:
            if exchange.answering is not None:
                # The app may not return before the answer made for it is sent.
                await asyncio.shield(exchange.answering)
            inflight.discard(exchange)
            # The scope and the exchange refer to each other through this entry: break
            # the cycle, so the request's objects are freed at once and not by the GC.
            scope.pop(HANDLER_TIMEOUT, None)
            exchange.finish(propagation.current())
            propagation.leave(exchange.context_token)
            if exchange.deadline_token is not None:
                propagation.DEADLINE.reset(exchange.deadline_token)
            if exchange.held is not None:
                log.stop_holding(exchange.held[1])

    def refusal(self) -> str | None:
        """Why a new request is refused now (past the in-flight cap, or overloaded past
        the capacity shown), or None: it is served."""
        inflight = len(self.inflight)
        if self.max_inflight and inflight >= self.max_inflight:
            return "inflight"
        shedder = self.shedder
        if shedder is not None and shedder.should_shed(inflight):
            return "overload"
        return None

    def saturation(self) -> str | None:
        """Readiness's ``load`` check: requests refused lately is saturation, reported
        as degraded, not as a failure: taking a saturated instance out of rotation moves
        its load onto the others, which then saturate too."""
        refused = int(sum(bucket[0] for bucket in self._refused.buckets()))
        if refused:
            return f"{refused} requests refused in the last {SATURATION_WINDOW} s"
        return None

    async def refuse(self, send: Send, reason: str) -> None:
        """Answer 503 before any of the request's own work: no context, span or access
        line, a body made once. An overloaded server that spends on refusals what it
        would have spent on requests gains nothing; they are counted (``kiban.shed``) and
        logged one in a hundred. The connection is kept: a reconnect (a load balancer's,
        most often) would cost more than the refusal did."""
        shed = self.telemetry.shed
        shed[reason] = shed.get(reason, 0) + 1
        self._refused.current()[0] += 1
        total = sum(shed.values())
        if total % 100 == 1:  # sampled: shedding is when logs are least affordable
            log.warning("request shed", reason=reason, inflight=len(self.inflight), shed=total)
        await send(_REFUSED_HEAD)
        await send(_REFUSED_BODY)

    async def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel requests past their deadline, while any are in flight (a tick, not a
        timer per request: the deadline is precise to ``EXPIRY_TICK``)."""
        try:
            while self.inflight:
                await asyncio.sleep(EXPIRY_TICK)
                now = loop.time()
                for exchange in list(self.inflight):
                    deadline = exchange.deadline
                    if (
                        deadline is not None
                        and now >= deadline
                        and exchange.timed_out is None
                        and exchange.task is not None
                    ):
                        exchange.timed_out = deadline
                        exchange.task.cancel()
                        # Answered now, not once the handler's cleanup is over.
                        seconds = round(deadline - exchange.began, 3)
                        answer = exchange.interrupt(
                            "timeout",
                            504,
                            f"The request took longer than its {seconds} s budget.",
                            close=False,
                            finish=False,
                        )
                        if answer is not None:
                            exchange.answering = asyncio.ensure_future(answer)
        finally:
            self._expiry = None

    def timed_out(self, exchange: Exchange, began: float) -> None:
        """The handler ran past its time: it was cancelled; answer 504 if nothing was sent."""
        when = exchange.timed_out
        seconds = round(when - began, 3) if when is not None else None
        log.warning("handler timed out", path=exchange.path, timeout_s=seconds)
        if exchange.status is None:
            raise errors.Problem(504, f"The request took longer than its {seconds} s budget.")
        # The response had started: the connection is closed as the app ends mid-response.

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI lifespan, around the app's own: kiban's start-up before, cleanups after.

        kiban refuses to start (``lifespan.startup.failed``) while a route has no
        security declaration; its pools, clients and exporters are closed, bounded,
        once the app's lifespan has finished, or failed to start.
        """
        message = await receive()
        if message["type"] != "lifespan.startup":  # not the protocol kiban knows: stand aside
            await self.app(scope, _replay(message, receive), send)
            return
        lifecycle = self.lifecycle
        try:
            await lifecycle.startup()
        except BaseException as exc:  # cancelled too: a signal stops a start-up (``Service``)
            await lifecycle.shutdown()
            await send({"type": "lifespan.startup.failed", "message": _start_failed(exc)})
            raise  # as Starlette's router does: the server reports it

        async def sent(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                lifecycle.started()
            elif kind in _LIFESPAN_ENDS:
                if kind == "lifespan.startup.failed":  # the app's own lifespan failed to start
                    said = _start_failed(sys.exception(), message.get("message"))
                    message = {**message, "message": said}
                await lifecycle.shutdown()
            await send(message)

        await self.app(scope, _replay(message, receive), sent)

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A websocket handshake passes the route's security first, with the same context.

        A refused one is answered with its problem+json where the server can send an
        HTTP response to a handshake (the ASGI ``websocket.http.response`` extension),
        else closed with 1008 (policy violation) before it is accepted.
        """
        inbound = self.inbound
        client = scope.get("client")
        remote = client[0] if client else None
        token = propagation.enter(inbound.context(inbound.read(scope["headers"]), remote))
        try:
            try:
                await self.policy.admit_websocket(self.api, scope)
            except errors.Problem as problem:
                await _refuse_handshake(scope, send, problem)
                return
            await self.app(scope, receive, send)
        finally:
            propagation.leave(token)


def _start_failed(exc: BaseException | None, said: str | None = None) -> str:
    """Log why the start-up failed, once; what the server is told (it logs that too).

    The exception's type is named: a start-up that timed out (``TimeoutError()``) has no
    message of its own, and the server would log an empty line. ``said`` is what an app
    that failed without raising said.
    """
    if isinstance(exc, asyncio.CancelledError):
        log.warning("start-up stopped before the service was ready")
        return "start-up stopped before the service was ready"
    if exc is None:
        reason = said or "the app's lifespan did not start"
    else:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    log.error("start-up failed", error=reason, exc_info=exc)
    return f"start-up failed: {reason}"


#: What the app sends when its lifespan is over, whether it started or not.
_LIFESPAN_ENDS = frozenset(
    {"lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"}
)


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` that gives ``first`` once before what ``receive`` gives."""
    pending: list[Message] = [first]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


def _keep_redirect_local(message: Message, host: str | None) -> None:
    """A redirect the app built from the request's Host goes to a path on this service."""
    message["headers"] = [
        (name, local_location(value, host) if name == b"location" else value)
        for name, value in message.get("headers", ())
    ]


async def _refuse_handshake(scope: Scope, send: Send, problem: errors.Problem) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        body = errors.problem_body(problem.status, problem.detail, **problem.extensions)
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in problem.headers.items()
        ]
        await send(
            {
                "type": "websocket.http.response.start",
                "status": problem.status,
                "headers": [(b"content-type", errors.PROBLEM_JSON.encode()), *headers],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": 1008})


class Exchange:
    """One request on its way through the chassis: its context, span and response so far.

    Per-request state lives here rather than in closures (Starlette's responder
    pattern), so the shutdown can reach a request still in flight: ``interrupt``
    answers it 503 (or marks its connection for closing) from outside its task.
    """

    def __init__(self, chassis: Chassis, scope: Scope, receive: Receive, send: Send) -> None:
        self.start = perf_counter()
        self.chassis = chassis
        self.scope = scope
        self._receive = receive
        self._send = send
        inbound = chassis.inbound
        self.headers = headers = inbound.read(scope["headers"])
        client = scope.get("client")
        remote = client[0] if client else None
        trusted = remote in inbound.trusted
        self.context = context = inbound.context(headers, remote, trusted)
        self.context_token = propagation.enter(context)
        #: Seconds the caller gave this request (a trusted peer's x-request-timeout-ms).
        self.budget: float | None = None
        self.deadline_token: Token[float | None] | None = None
        if trusted:
            self.budget = propagation.budget_seconds(headers.get(inbound.names.timeout))
            if self.budget is not None:
                self.deadline_token = propagation.DEADLINE.set(monotonic() + self.budget)
        self.method = method = scope["method"]
        self.path = path = scope["path"]
        telemetry = chassis.telemetry
        self.span: trace.Span | None = None
        self.span_token: object = None
        if path not in telemetry.exclude:
            parent, link = inbound.parent(headers, trusted)
            self.span = telemetry.start_span(
                method,
                path,
                scope.get("scheme", "http"),
                remote or "",
                parent,
                headers.get("tracestate"),
                link,
            )
            self.span_token = activate(self.span)
        telemetry.active += 1
        #: The response's status once it has started; None until then.
        self.status: int | None = None
        self.response_bytes = 0
        self.body: Body | None = None
        #: Why kiban cut the request short ("shutdown"), or None.
        self.interrupted: str | None = None
        self.finished = False
        self.body_done = False
        #: When the handler's time runs out (loop time; None: never), and its task.
        self.deadline: float | None = None
        self.task: asyncio.Task[object] | None = None
        #: The deadline that cancelled it, once it has.
        self.timed_out: float | None = None
        #: When the handler's time began (the loop's clock).
        self.began = 0.0
        #: The 504 being sent for it from outside its task, once its time is out, and
        #: when (its latency in the access line).
        self.answering: asyncio.Future[None] | None = None
        self.answered: float | None = None
        #: The request's held log lines (``LOG_BUFFERING``), unless it asked for debug.
        self.held = log.hold_lines() if chassis.log_buffering and not context.debug else None
        self.failed = False
        #: The class of the exception the request failed on (``error.type``), if any.
        self.error: str | None = None

    def reschedule(self, when: float | None) -> None:
        """Move the handler's deadline (loop time; None: none): the route's own timeout."""
        self.deadline = when

    async def send(self, message: Message) -> None:
        if self.interrupted is not None:
            return  # kiban answered for the app already: the rest is dropped
        if message["type"] == "http.response.start":
            self.status = status = message["status"]
            if 300 <= status < 400:
                _keep_redirect_local(message, self.headers.get("host"))
            self._start(message, self.context)
        else:
            size = len(message.get("body", b""))
            self.response_bytes += size
            if size > _BUFFERED or message.get("more_body", False):
                # Big enough to wait on the client: bounded, so one that stops reading
                # does not hold the connection (the app ends, the server closes it).
                try:
                    async with asyncio.timeout(self.chassis.write_timeout):
                        await self._send(message)
                except TimeoutError:
                    log.warning("client did not read the response in time, closing")
                    raise ClientTooSlow from None
                return
        await self._send(message)

    def _start(self, message: Message, context: RequestContext, close: bool = False) -> None:
        """Add kiban's headers to a response start; ``close`` ends its connection after."""
        inbound = self.chassis.inbound
        rate: Decision | None = self.scope.get(RATE_DECISION)
        added = inbound.echoed(context)
        if rate is not None:
            added.extend(rate.encoded())
        if close or self.chassis.health.draining:  # a header: the server must see it
            added.append(_CLOSE)
        if added:
            message["headers"] = [*message.get("headers", ()), *added]

    async def receive(self) -> Message:
        if self.body_done:  # after the body: a wait for the disconnect, unbounded
            return await self._receive()
        remaining = self.chassis.read_body_timeout - (perf_counter() - self.start)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                message = await self._receive()
        except TimeoutError:
            # An HTTPException: FastAPI passes those on from reading a body (others, 400).
            raise HTTPException(
                408, "The request body did not arrive in time.", headers={"connection": "close"}
            ) from None
        if message["type"] == "http.request":
            body = self.body
            if body is None:
                body = self.body = Body(self.chassis.max_body, self.headers.get("content-type"))
            body.take(message)
            self.body_done = not message.get("more_body", False)
        else:
            self.body_done = True
        return message

    def interrupt(
        self,
        reason: str,
        status: int = 503,
        detail: str = "The service is shutting down; retry the request elsewhere.",
        close: bool = True,
        finish: bool = True,
    ) -> Awaitable[None] | None:
        """Cut the request short: answer ``status`` if its response has not started.

        Called from outside the request's task (the shutdown, the handler's deadline):
        a cancelled handler's cleanup can wait on a dependency that has gone slow, and
        the caller is not kept waiting for it. What the app sends afterwards is dropped.
        With ``finish`` the access line is written now (the shutdown: the task may never
        end); without, by the task when it ends, with the identity it verified and the
        time of this answer. Returns the answer to await, if any; a started response's
        connection is closed by the server when it cancels the task.
        """
        if self.interrupted is not None or self.finished:
            return None
        self.interrupted = reason
        answer = None
        if self.status is None:
            self.status = status
            body = errors.problem_body(status, detail, trace_id=self.context.trace_id)
            headers = [
                (b"content-type", errors.PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
            ]
            if status == 503:
                headers.append((b"retry-after", b"1"))
            message: Message = {"type": "http.response.start", "status": status, "headers": headers}
            self._start(message, self.context, close=close)
            self.response_bytes = len(body)
            answer = self._answer(message, body)
        if finish:
            self.finish(None, outside=True)
        else:
            self.answered = perf_counter()
        return answer

    async def _answer(self, start: Message, body: bytes) -> None:
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def finish(self, context: RequestContext | None, outside: bool = False) -> None:
        """End the span and write the access line, once (``outside`` the request's task:
        its span stays current there)."""
        if self.finished:
            return
        self.finished = True
        chassis = self.chassis
        telemetry = chassis.telemetry
        answered = self.answered
        elapsed = (perf_counter() if answered is None else answered) - self.start
        telemetry.active -= 1
        scope = self.scope
        route = routes.template(scope)
        status = self.status
        final = CLIENT_CLOSED if status is None else status
        shedder = chassis.shedder
        if shedder is not None and final < 500:
            shedder.done(elapsed)
        span_id = None
        span = self.span
        if span is not None:
            span_id = telemetry.end_span(
                span,
                self.method,
                final,
                route,
                elapsed,
                scope.get("scheme", "http"),
                scope.get("http_version", "1.1"),
                self.error,
            )
            if not outside:
                deactivate(self.span_token)
        held = self.held
        if held is not None:
            dropped = held[0].release(final >= 500 or self.failed)
            if dropped:
                telemetry.log_dropped.add(dropped)
        access = chassis.access
        if access is not None:
            body = self.body
            access.write(
                context or self.context,  # a verified identity may have replaced it
                scope,
                route,
                self.headers.get("host"),
                final,
                body.received if body is not None else 0,
                self.response_bytes,
                elapsed,
                span_id,
                self.interrupted,
            )
