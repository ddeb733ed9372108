"""``kiban.Service``: one call that puts the whole convention around a FastAPI app.

The request path, outermost first (run by one ASGI layer, ``chassis.Chassis``)::

    context      inbound headers -> RequestContext      propagation.py
    telemetry    server span, HTTP metrics              telemetry.py
    access log   one fixed-schema line per request      accesslog.py
    drain        Connection: close while shutting down  server.py
    errors       any exception -> problem+json          errors.py
    body limit   413 past HTTP_MAX_BODY_BYTES           limits.py
    probes       /health/*, /metrics answered here      health.py, telemetry.py
    policy       the route's security and rate limit    security/policy.py
    payloads     bodies logged when switched on         debug.py
    FastAPI      routing, validation, the route's security requirement, handlers

The chain is installed once, in ``Service.__init__``; a second Service on the same app
is refused, so no request is ever logged or traced twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from kiban import debug, errors, log
from kiban.chassis import Chassis
from kiban.config import ConfigError, Settings, load
from kiban.health import Checker, Pinger, SQLPinger
from kiban.ratelimit import Limiter, RateLimit
from kiban.security.policy import Policy, SecurityConfigError, Unlimited
from kiban.telemetry import Telemetry

if TYPE_CHECKING:  # imported when used: a service without a database or client skips them
    import httpx
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Service"]

Cleanup = Callable[[], Awaitable[Any]]


class Service:
    """A FastAPI app wearing kiban: context, logs, errors, health, limits, shutdown."""

    def __init__(
        self,
        app: FastAPI,
        settings: Settings | None = None,
        *,
        security: Any = None,
        rate_limit: RateLimit | None = None,
        debug_security: Any = None,
    ) -> None:
        if getattr(app.state, "kiban", None) is not None:
            raise RuntimeError("kiban.Service is already installed on this app")
        self.app = app
        self.settings = settings if settings is not None else load(Settings)
        self.health = Checker(
            timeout=self.settings.health_timeout, cache_seconds=self.settings.health_cache_seconds
        )
        self._cleanups: list[Cleanup] = []
        log.configure(
            self.settings.log_level, self.settings.log_format, service=self.settings.service_name
        )
        self.telemetry = Telemetry(self.settings)
        errors.init_sentry(self.settings)
        self.policy = Policy(
            security,
            rate_limit,
            Limiter(
                self.settings.redis_url,
                fail_open=self.settings.ratelimit_fail_open,
                timeout=self.settings.ratelimit_timeout,
                telemetry=self.telemetry,
            ),
            self.telemetry,
        )
        # The API default goes first in every later route's chain; narrower ones win.
        app.router.dependencies.extend(self.policy.api_dependencies())
        app.state.kiban = self
        _disable_native_telemetry(app)
        errors.install(app)
        self.payloads = debug.PayloadLog()
        if self.settings.debug_endpoints:
            if debug_security is None:
                raise ConfigError(
                    "DEBUG_ENDPOINTS is on but the service gives no debug_security: "
                    "the debug endpoints are never public"
                )
            app.include_router(debug.router(self.payloads, [debug_security, Unlimited()]))
        log.allow_request_debug(self.settings.debug_endpoints)
        app.add_middleware(Chassis, service=self)
        _chassis_outermost(app)
        app.router.lifespan_context = self._lifespan(app.router.lifespan_context)
        self._document_openapi(app)

    @classmethod
    def of(cls, target: Any) -> Service:
        """The Service for ``target``: a Service itself, or an app a Service was installed on."""
        if isinstance(target, Service):
            return target
        service = getattr(getattr(target, "state", None), "kiban", None)
        if isinstance(service, Service):
            return service
        raise TypeError(f"{target!r} is not a kiban.Service nor an app wrapped by one")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def add_pinger(self, pinger: Pinger, critical: bool = True) -> None:
        """Make readiness report ``pinger``, and fail with it when it is critical."""
        self.health.add(pinger, critical)

    def on_shutdown(self, cleanup: Cleanup) -> None:
        """Run ``cleanup`` after the server has drained, newest first."""
        self._cleanups.append(cleanup)

    def database(
        self, url: str | None = None, name: str = "database", **options: Any
    ) -> AsyncEngine:
        """A SQLAlchemy async engine that readiness pings and shutdown disposes."""
        from sqlalchemy.ext.asyncio import create_async_engine

        errors.install_dependency_errors(self.app)
        engine = create_async_engine(
            url or self.settings.database_url, pool_pre_ping=True, **options
        )
        self.add_pinger(SQLPinger(engine, name))
        self.on_shutdown(engine.dispose)
        return engine

    def http_client(self, base_url: str = "", **options: Any) -> httpx.AsyncClient:
        """An outgoing client that propagates the request context; closed on shutdown."""
        from kiban import client as kiban_client

        errors.install_dependency_errors(self.app)
        client = kiban_client.create(self.settings, base_url=base_url, **options)
        self.on_shutdown(client.aclose)
        return client

    @staticmethod
    def _document_openapi(app: FastAPI) -> None:
        """The OpenAPI document shows kiban's problem responses and resolved security."""
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                policy: Policy = app.state.kiban.policy
                policy.resolve(app)
                app.openapi_schema = policy.document(errors.document(generate()))
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]

    async def aclose(self) -> None:
        """Release what the service holds (pools, clients), newest first, each at most once."""
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                await cleanup()
            except Exception:
                log.exception("cleanup failed", cleanup=getattr(cleanup, "__qualname__", None))

    def _lifespan(
        self, inner: Callable[[Any], AbstractAsyncContextManager[Any]]
    ) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            try:
                try:
                    self.policy.resolve(self.app)
                except SecurityConfigError as exc:
                    log.error("invalid security declarations", error=str(exc))
                    raise
                async with inner(app) as state:
                    log.info(
                        "started",
                        service=self.settings.service_name,
                        version=self.settings.service_version,
                        telemetry=self.telemetry.describe(),
                        sentry=errors.sentry_enabled(),
                    )
                    yield state
            finally:
                await self.aclose()
                await asyncio.to_thread(self.telemetry.shutdown)

        return lifespan


#: FastAPI's layers outside the user's middleware. Under kiban's request path none has
#: work to do: the chassis answers every exception, FastAPI's telemetry is off, and its
#: body limit is unset unless the app sets ``max_body_size``.
_OUTER = frozenset(
    {"ServerErrorMiddleware", "ExceptionTelemetryMiddleware", "AppBodyLimitMiddleware"}
)


def _chassis_outermost(app: FastAPI) -> None:
    """Serve the request path as the app's outermost layer when nothing is lost by it.

    FastAPI puts three layers around the user's middleware, each a call per request
    and one more per message sent. They are left out when they are all that stands
    outside the chassis and the app sets no ``max_body_size`` of FastAPI's own.
    """
    build = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        stack = build()
        if getattr(app, "max_body_size", None) is not None:
            return stack
        layer: Any = stack
        while type(layer).__name__ in _OUTER:
            layer = getattr(layer, "app", None)
        return layer if isinstance(layer, Chassis) else stack

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def _disable_native_telemetry(app: FastAPI) -> None:
    """Turn off FastAPI's own OpenTelemetry instrumentation (FastAPI >= 0.16x).

    kiban makes the one server span and the HTTP metrics itself, with the request
    context's trace id; FastAPI's would be a second server span per request, three
    operation spans, and a second ``http.server.request.duration`` series.
    """
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        config.update(tracing=False, metrics=False, logs=False, operation_spans=False)
