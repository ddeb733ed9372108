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
import contextlib
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, params

from kiban import _debug as debug
from kiban import _errors as errors
from kiban import _extras, _fastapi
from kiban import _log as log
from kiban._chassis import Chassis
from kiban._config import ConfigError, Settings, load
from kiban._health import Checker, Pinger, RedisPinger, SQLPinger
from kiban._ratelimit import Limiter, RateLimit
from kiban._telemetry import Telemetry
from kiban.security._declare import Unlimited
from kiban.security._policy import Policy

if TYPE_CHECKING:  # imported when used: a service without a database or client skips them
    import httpx
    from opentelemetry.sdk.trace.sampling import Sampler

    from kiban._chassis import Exchange
    from kiban._client import PropagatingTransport
    from kiban._rpcclient import Channel
    from kiban._rpcserver import GrpcServer
    from kiban.database import Database

__all__ = ["Service"]

Cleanup = Callable[[], Awaitable[Any]]


#: Pooled database connections are replaced after this long, before a server or a
#: proxy between drops them for their age (MariaDB's wait_timeout is 8 hours).
RECYCLE_SECONDS = 1800


class Service:
    """A FastAPI app wearing kiban: context, logs, errors, health, limits, shutdown."""

    def __init__(
        self,
        app: FastAPI,
        settings: Settings | None = None,
        *,
        security: params.Depends | None = None,
        rate_limit: RateLimit | None = None,
        debug_security: params.Depends | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        if getattr(app.state, "kiban", None) is not None:
            raise RuntimeError("kiban.Service is already installed on this app")
        self.app = app
        self.settings = settings if settings is not None else load(Settings)
        _extras.check_settings(self.settings)
        self.health = Checker(
            timeout=self.settings.health_timeout, cache_seconds=self.settings.health_cache_seconds
        )
        self._cleanups: list[Cleanup] = []
        self._startups: list[Callable[[], Awaitable[None]]] = []
        #: What shutdown had to give up on (requests cut, cleanups past their time).
        self.abandoned: list[str] = []
        self.default_database: Database | None = None
        #: The requests being served (``chassis.Exchange``), for the shutdown to cut.
        self.inflight: set[Exchange] = set()
        self._grpc: GrpcServer | None = None
        #: The HTTP clients made with ``http_client`` and their kiban transports.
        self.http_clients: list[tuple[httpx.AsyncClient, PropagatingTransport]] = []
        self._loop_watch: asyncio.Future[None] | None = None
        #: The task running the start-up until the service has started (see ``interrupt_start``).
        self._starting: asyncio.Task[Any] | None = None
        #: A signal stopped the start-up before the service served anything.
        self.interrupted = False
        log.configure(
            self.settings.log_level,
            self.settings.log_format,
            service=self.settings.service_name,
            max_held=self.settings.log_max_held_bytes,
        )
        self.telemetry = Telemetry(self.settings, sampler)
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
            auth_failures=(
                RateLimit(self.settings.auth_failure_limit, key="ip", name="auth-failures")
                if self.settings.auth_failure_limit
                else None
            ),
            handler_timeout=self.settings.http_handler_timeout or None,
        )
        self.on_shutdown(self.policy.limiter.aclose)
        # The API default goes first in every later route's chain; narrower ones win.
        app.router.dependencies.extend(self.policy.api_dependencies())
        app.state.kiban = self
        _fastapi.disable_native_telemetry(app)
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
        # An ordinary ASGI middleware: it sees the lifespan too, and runs kiban's
        # start-up and cleanups around the app's own lifespan (``Chassis.lifespan``).
        app.add_middleware(
            Chassis,
            api=app,
            settings=self.settings,
            policy=self.policy,
            telemetry=self.telemetry,
            health=self.health,
            payloads=self.payloads,
            inflight=self.inflight,
            lifecycle=self,
        )
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

    @property
    def grpc(self) -> GrpcServer:
        """The service's gRPC server: ``service.grpc.add(add_XServicer_to_server, servicer)``.

        Needs ``kiban[grpc]``. It starts with the service, on ``GRPC_PORT``, once a
        servicer is added, under the same chassis as HTTP (``docs/grpc.md``).
        """
        if self._grpc is None:
            _extras.require("grpc_health", "grpc", "a gRPC server")
            from kiban._rpcserver import GrpcServer

            self._grpc = GrpcServer(self)
        return self._grpc

    def grpc_channel(self, target: str, **options: Any) -> Channel:
        """A ``grpc.aio`` channel to ``target`` that propagates the request context and
        deadline (``kiban[grpc]``); closed on shutdown."""
        _extras.require("grpc_health", "grpc", "a gRPC channel")
        from kiban._rpcclient import channel

        opened = channel(
            self.settings,
            target,
            tracer=self.telemetry.tracer_provider.get_tracer("kiban._rpcclient"),
            **options,
        )
        self.on_shutdown(opened.close)
        return opened

    def stop_accepting(self) -> None:
        """The drain is over: other servers stop taking calls, in-flight ones get the budget."""
        if self._grpc is not None:
            self._grpc.begin_stop(self.settings.http_shutdown_timeout)

    def on_shutdown(self, cleanup: Cleanup) -> None:
        """Run ``cleanup`` after the server has drained, newest first."""
        self._cleanups.append(cleanup)

    def on_startup(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` at start-up, in order, before the app's own lifespan and before
        readiness can pass; one that fails stops the start (``lifespan.startup.failed``)."""
        self._startups.append(hook)

    def database(
        self,
        url: str | None = None,
        name: str = "database",
        *,
        migrations: str | Path | None = None,
        **options: Any,
    ) -> Database:
        """A database that readiness pings and shutdown disposes (``kiban.database``).

        Handlers take its sessions through ``kiban.database.Session`` (the first
        database made) or ``db.session``: they commit before the response starts.
        With ``migrations`` (an alembic script folder) and ``MIGRATE_ON_START``, the
        schema is upgraded at start-up, before the service can be ready.
        """
        url = url or self.settings.database_url
        _extras.check_database(url)
        from sqlalchemy.ext.asyncio import create_async_engine

        from kiban.database import Database

        errors.install_dependency_errors(self.app)
        merged = {**self._pool_options(url), **options}
        engine = create_async_engine(url, **merged)
        from kiban._dbtelemetry import observe

        connect_timeout = self.settings.database_connect_timeout
        database = Database(
            engine, name, connections=_pool_bound(merged), connect_timeout=connect_timeout
        )
        observe(engine, self.telemetry, name, waiting=lambda: database.waiting)
        if migrations is not None and self.settings.migrate_on_start:
            from kiban.database import upgrade

            location = migrations

            async def migrate() -> None:
                await upgrade(engine, location, connect_timeout=connect_timeout)

            self.on_startup(migrate)
        self.add_pinger(SQLPinger(engine, name))
        self.on_shutdown(database.dispose)
        if self.default_database is None:
            self.default_database = database
        return database

    def _pool_options(self, url: str) -> dict[str, Any]:
        """The pool's size from the settings, for a server database.

        SQLite keeps the pool SQLAlchemy picks for it (a file's differs between
        SQLAlchemy releases, and an in-memory database has one connection).
        """
        from sqlalchemy.engine import make_url

        if make_url(url).get_backend_name() == "sqlite":
            return {"pool_recycle": RECYCLE_SECONDS}
        return {
            "pool_recycle": RECYCLE_SECONDS,
            "pool_size": self.settings.database_pool_size,
            "max_overflow": self.settings.database_max_overflow,
        }

    def redis(self, url: str | None = None, name: str = "redis", **options: Any) -> Any:
        """A ``redis.asyncio.Redis`` (``kiban[redis]``) whose commands are client spans
        and points in ``db.client.operation.duration``; readiness pings it, shutdown
        closes it, and its connection errors and timeouts (``REDIS_TIMEOUT``) are
        answered 503. While it fails, most commands fail at once instead of waiting
        (``kiban._breaker``). ``url`` defaults to ``REDIS_URL``; ``options`` are
        redis-py's (``socket_timeout=...``)."""
        _extras.require("redis", "redis", "service.redis()")
        from kiban._redis import client

        url = url or self.settings.redis_url
        if not url:
            raise ConfigError("service.redis() needs a URL: set REDIS_URL or pass one")
        timeout = self.settings.redis_timeout
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **options}
        redis = client(url.removeprefix("async+"), self.telemetry, name, **options)
        errors.install_dependency_errors(self.app)
        self.add_pinger(RedisPinger(redis, name))
        self.on_shutdown(redis.aclose)
        return redis

    def http_client(self, base_url: str = "", **options: Any) -> httpx.AsyncClient:
        """An outgoing client that propagates the request context; closed on shutdown."""
        from kiban import _client as kiban_client

        errors.install_dependency_errors(self.app)
        client, transport = kiban_client.create_with_transport(
            self.settings,
            base_url=base_url,
            tracer=self.telemetry.tracer_provider.get_tracer("kiban._client"),
            **options,
        )
        self.http_clients.append((client, transport))
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

    async def aclose(self, deadline: float | None = None) -> None:
        """Release what the service holds (pools, clients), newest first.

        Each cleanup runs at most once, and all of them together by ``deadline`` (loop
        time; ``SHUTDOWN_CLEANUP_TIMEOUT`` from now by default): a cleanup still running
        then (a pool closing a connection to a database that stopped answering) is
        abandoned with a log line and named in ``abandoned``, so a hung dependency never
        holds the process.
        """
        if deadline is None:
            deadline = self._cleanup_deadline()
        while self._cleanups:
            cleanup = self._cleanups.pop()
            name = getattr(cleanup, "__qualname__", repr(cleanup))
            await self._settle(name, asyncio.ensure_future(cleanup()), deadline)

    def _cleanup_deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.shutdown_cleanup_timeout

    async def _settle(self, name: str, task: asyncio.Future[Any], deadline: float) -> None:
        """Wait for a cleanup until ``deadline``; past it, abandon it and say so."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait({task}, timeout=remaining)
        if not done:
            task.cancel()  # not awaited: it may not answer its cancellation either
            self.abandoned.append(f"cleanup {name}")
            log.error(
                "cleanup abandoned: did not finish in time",
                cleanup=name,
                timeout_s=self.settings.shutdown_cleanup_timeout,
            )
        elif not task.cancelled() and task.exception() is not None:
            log.error("cleanup failed", cleanup=name, exc_info=task.exception())

    async def interrupt(self, reason: str = "shutdown", within: float = 1.0) -> int:
        """Cut every request still in flight short; how many there were.

        Requests whose response has not started are answered 503 problem+json with
        ``Retry-After`` and ``Connection: close`` (a client or load balancer retries
        elsewhere); started ones are marked so the server closes their connection.
        """
        answers = [
            answer
            for exchange in list(self.inflight)
            if (answer := exchange.interrupt(reason)) is not None
        ]
        count = len(self.inflight)
        if count:
            self.abandoned.append(f"{count} request(s) cut at the {reason} timeout")
            log.warning("requests cut short", reason=reason, count=count)
        if answers:
            await asyncio.wait([asyncio.ensure_future(a) for a in answers], timeout=within)
        return count

    async def startup(self) -> None:
        """What the ASGI ``lifespan.startup`` runs before the app's own lifespan.

        Refuses to start (``SecurityConfigError``) while a route or gRPC method has no
        security, or while the gRPC port is taken; then runs the start-up hooks
        (migrations), in order, and starts serving gRPC.
        """
        self._starting = asyncio.current_task()
        self.policy.resolve(self.app)
        grpc = self._grpc if self._grpc is not None and self._grpc.enabled else None
        if grpc is not None:
            grpc.bind()  # as the HTTP port: taken before any hook runs
        for hook in self._startups:
            await hook()
        if grpc is not None:
            await grpc.start()
        self._loop_watch = asyncio.ensure_future(self.telemetry.watch_loop())

    def interrupt_start(self) -> bool:
        """Stop a start-up still under way (a signal came first); whether there was one.

        The start-up's task (kiban's hooks, then the app's own lifespan up to
        ``lifespan.startup.complete``) is cancelled where it waits: a migration waiting
        for a database that does not answer ends now, not at the shutdown's bound. The
        app's lifespan sees the cancellation as a failed start; the pools close as after
        any failed start.
        """
        starting = self._starting
        if starting is None or starting.done():
            return False
        self.interrupted = True
        starting.cancel()
        return True

    def started(self) -> None:
        self._starting = None
        log.info(
            "started",
            service=self.settings.service_name,
            version=self.settings.service_version,
            telemetry=self.telemetry.describe(),
            sentry=errors.sentry_enabled(),
        )

    async def shutdown(self) -> None:
        """What runs after the app's own lifespan has finished (or failed to start).

        The exporters flush while the pools close: a hung pool cannot starve them.
        """
        self._starting = None
        if self._loop_watch is not None:
            self._loop_watch.cancel()
        if self._grpc is not None:
            # In-flight calls finish (within the shutdown budget) before the pools close.
            await self._grpc.stopped(self.settings.http_shutdown_timeout)
        deadline = self._cleanup_deadline()
        flushing = asyncio.ensure_future(_on_thread("telemetry", self.telemetry.shutdown))
        # Error reports of the last moments (a request that failed as the signal came)
        # are sent too; on a thread of their own, so that neither flush starves the other.
        reporting = asyncio.ensure_future(
            _on_thread("error reports", lambda: errors.flush_reports(self.settings))
        )
        await self.aclose(deadline)
        await self._settle("telemetry flush", flushing, deadline)
        await self._settle("error reports flush", reporting, deadline)


async def _on_thread(what: str, flush: Callable[[], object]) -> None:
    """Run ``flush`` on a daemon thread: a hung exporter is abandoned with it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            flush()
        except Exception:
            log.exception(f"{what} flush failed")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: abandoned
                loop.call_soon_threadsafe(settle)

    name = f"kiban-{what.replace(' ', '-')}-flush"
    threading.Thread(target=run, name=name, daemon=True).start()
    await done


def _pool_bound(options: dict[str, Any]) -> int | None:
    """How many connections a pool made with ``options`` lends at most, if bounded."""
    size, overflow = options.get("pool_size"), options.get("max_overflow")
    if "poolclass" in options or not isinstance(size, int) or not isinstance(overflow, int):
        return None
    return size + overflow if overflow >= 0 else None  # -1: no bound
