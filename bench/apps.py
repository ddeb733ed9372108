"""The variants ``make bench`` compares, each served by its own process.

- ``raw``: a bare ASGI callable, the ceiling.
- ``fastapi``: a bare FastAPI route.
- ``kiban``: the same route in the full kiban chassis: context, access log to a file,
  a span per request at 100% sampling into an exporter that drops, HTTP metrics, an
  API-key requirement and an in-memory rate limit.
- ``typical``: what a team assembles today: opentelemetry-instrumentation-fastapi,
  prometheus-fastapi-instrumentator, asgi-correlation-id, a structlog JSON access line
  and a FastAPI ``Security`` API-key dependency.
- ``members``: the sample members service's GET-by-id on SQLite.
- ``members-fastapi``: the same GET-by-id, same model and SQLite, on bare FastAPI with a
  SQLAlchemy session per request: the database path with and without kiban.
- ``members-pg``, ``members-fastapi-pg``: the same two on PostgreSQL (asyncpg).
- ``litestar``: the route on bare Litestar.
- ``litestar-stack``: what a Litestar team would use: Litestar's own OpenTelemetry,
  Prometheus and structlog (request logging) plugins and an API-key guard.

``KIBAN_BENCH_OFF`` (comma-separated: telemetry, accesslog, security, ratelimit) turns
chassis features off one at a time for the cost table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

PAYLOAD = {"id": 1, "name": "Ada"}
API_KEY = "bench-key"


async def raw(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id":1,"name":"Ada"}'})


def _route(app: FastAPI, dependencies: Sequence[Any] = ()) -> FastAPI:
    @app.get("/items/{item_id}", dependencies=list(dependencies))
    async def item(item_id: int) -> dict[str, Any]:
        return PAYLOAD

    return app


fastapi_app = _route(FastAPI())


def _kiban() -> FastAPI:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    import kiban
    from kiban import Settings
    from kiban._ratelimit import RateLimit
    from kiban.security import APIKey, NoSecurity, Security

    off = set(filter(None, os.environ.get("KIBAN_BENCH_OFF", "").split(",")))

    async def validate(key: str) -> bool:
        return key == API_KEY

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    app = FastAPI()
    settings = Settings(
        service_name="bench",
        telemetry_exclude_paths=frozenset({"/items/1"}) if "telemetry" in off else frozenset(),
        access_log="accesslog" not in off,
    )
    service = kiban.Service(
        app,
        settings,
        security=NoSecurity() if "security" in off else Security(APIKey(validate)),
        rate_limit=None if "ratelimit" in off else RateLimit("100000000/second"),
    )
    service.telemetry.export_spans(Drop())  # as OTLP's exporter is given its spans
    return _route(app)


def _typical() -> FastAPI:
    import logging

    import structlog
    from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
    from fastapi import HTTPException
    from fastapi import Security as FastAPISecurity
    from fastapi.security import APIKeyHeader
    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from prometheus_fastapi_instrumentator import Instrumentator

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", filename=os.environ.get("BENCH_LOG", "/dev/null")
    )
    structlog.configure(
        processors=[
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
    access = structlog.get_logger("access")
    header = APIKeyHeader(name="x-api-key")

    async def check(key: str = FastAPISecurity(header)) -> str:
        if key != API_KEY:
            raise HTTPException(401)
        return key

    app = FastAPI(
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    )

    @app.middleware("http")
    async def access_log(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        access.info(
            "access",
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            request_id=correlation_id.get(),
        )
        return response

    app.add_middleware(CorrelationIdMiddleware)
    Instrumentator().instrument(app).expose(app)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    return _route(app, [FastAPISecurity(check)])


def _members() -> FastAPI:
    from services.members.app import MembersSettings, create_app

    off = set(filter(None, os.environ.get("KIBAN_BENCH_OFF", "").split(",")))
    excluded = frozenset({"/members/1"}) if "telemetry" in off else frozenset()
    return create_app(
        MembersSettings(
            database_url=os.environ.get(
                "BENCH_DATABASE_URL", "sqlite+aiosqlite:///./.run/bench.db"
            ),
            rate_limit="100000000/second",
            # No request span and no SQL spans for the measured route.
            telemetry_exclude_paths=excluded,
        )
    )


def _members_fastapi() -> FastAPI:
    from bench.members_fastapi import create_app

    return create_app(
        os.environ.get("BENCH_DATABASE_URL", "sqlite+aiosqlite:///./.run/bench-fastapi.db")
    )


def _litestar() -> Any:
    from litestar import Litestar, get

    @get("/items/{item_id:int}")
    async def item(item_id: int) -> dict[str, Any]:
        return PAYLOAD

    return Litestar([item])


def _litestar_stack() -> Any:
    from litestar import Litestar, get
    from litestar.connection import ASGIConnection
    from litestar.exceptions import NotAuthorizedException
    from litestar.handlers.base import BaseRouteHandler
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
    from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
    from litestar.plugins.structlog import StructlogPlugin
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))

    async def api_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if connection.headers.get("x-api-key") != API_KEY:
            raise NotAuthorizedException()

    @get("/items/{item_id:int}", guards=[api_key])
    async def item(item_id: int) -> dict[str, Any]:
        return PAYLOAD

    prometheus = PrometheusConfig(app_name="bench")
    return Litestar(
        [item, PrometheusController],
        middleware=[prometheus.middleware],
        plugins=[
            OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=provider)),
            StructlogPlugin(),
        ],
    )


def load(name: str) -> Any:
    return {
        "raw": lambda: raw,
        "fastapi": lambda: fastapi_app,
        "kiban": _kiban,
        "typical": _typical,
        "members": _members,
        "members-fastapi": _members_fastapi,
        "members-pg": _members,
        "members-fastapi-pg": _members_fastapi,
        "litestar": _litestar,
        "litestar-stack": _litestar_stack,
    }[name]()
