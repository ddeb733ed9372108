"""The dashboard's HTTP side: the OTLP/HTTP receiver, the JSON API, live events, pages.

One Starlette app on one loopback port. Services export to ``/v1/traces``,
``/v1/logs`` and ``/v1/metrics`` as to any OTLP/HTTP collector; the pages are static
files served from the package (no CDN) that read ``/api/*`` and refetch when
``/api/events`` (server-sent events) says the window changed.

The dashboard shows what services log and trace, and can restart them, so it guards
what a browser could be tricked into: a ``Host`` that is not a loopback name is refused
(DNS rebinding), and a restart needs the ``x-kiban-dev`` header, which no cross-site
form or image can send. Attributes named like a credential are redacted as they
arrive, on top of the services' own redaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kiban._dashboard._otlp import DecodeError, decode_body
from kiban._dashboard._otlp import logs as decode_logs
from kiban._dashboard._otlp import metrics as decode_metrics
from kiban._dashboard._otlp import spans as decode_spans
from kiban._dashboard._store import Store
from kiban._errors import problem_response
from kiban._redact import redact_json
from kiban._trust import AllowedHosts

__all__ = ["LOOPBACK_HOSTS", "create_app"]

#: The Host names the dashboard answers (kiban's Host rules: any port, any case).
LOOPBACK_HOSTS = AllowedHosts(("localhost", "127.0.0.1", "[::1]"))
MAX_BODY = 16 * 1024 * 1024
_STATIC = resources.files("kiban._dashboard") / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}

Restart = Callable[[str], Awaitable[bool]]


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


class LoopbackHost:
    """Refuse any request whose ``Host`` is not a loopback name (DNS rebinding)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host not in LOOPBACK_HOSTS:
                response = problem_response(421, "the dashboard answers loopback names only")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(store: Store, restart: Restart | None = None, poll: float = 0.25) -> ASGIApp:
    """The dashboard over ``store``; ``restart(name)`` restarts a service kiban dev runs."""

    async def body(request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/x-protobuf":
            raise DecodeError(
                f"content-type {content_type or 'none'}: send OTLP/HTTP protobuf "
                "(OTLP_PROTOCOL=http/protobuf)"
            )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise DecodeError("export request over 16 MiB")
        return decode_body(bytes(data), request.headers.get("content-encoding"))

    def receiver(ingest: Callable[[bytes], None]) -> Callable[[Request], Awaitable[Response]]:
        async def export(request: Request) -> Response:
            try:
                ingest(await body(request))
            except DecodeError as error:
                return problem_response(400, str(error), title="Bad OTLP export request")
            # An empty Export*ServiceResponse: full success.
            return Response(b"", media_type="application/x-protobuf")

        return export

    def ingest_spans(data: bytes) -> None:
        spans = decode_spans(data)
        for span in spans:
            span.attributes = redact_json(span.attributes)
        store.add_spans(spans)

    def ingest_logs(data: bytes) -> None:
        logs = decode_logs(data)
        for log in logs:
            log.attributes = redact_json(log.attributes)
        store.add_logs(logs)

    def ingest_metrics(data: bytes) -> None:
        store.add_histograms(decode_metrics(data))

    async def index(_: Request) -> Response:
        return static_file("index.html")

    def static_file(name: str) -> Response:
        path = _STATIC / name
        suffix = "." + name.rsplit(".", 1)[-1]
        if "/" in name or name.startswith(".") or suffix not in _TYPES or not path.is_file():
            return problem_response(404, f"no file {name}")
        return Response(
            path.read_bytes(), media_type=_TYPES[suffix], headers={"cache-control": "no-cache"}
        )

    async def static(request: Request) -> Response:
        return static_file(request.path_params["name"])

    def query(request: Request, name: str) -> str | None:
        value = request.query_params.get(name, "").strip()
        return value or None

    def limit(request: Request) -> int:
        try:
            return max(1, min(int(request.query_params.get("limit", "200")), 2000))
        except ValueError:
            return 200

    async def services(_: Request) -> Response:
        now = time.time()
        return _json({"services": [state.as_dict(now) for state in store.services.values()]})

    async def requests(request: Request) -> Response:
        return _json(
            {
                "requests": store.requests(
                    service=query(request, "service"),
                    status=query(request, "status"),
                    route=query(request, "route"),
                    uid=query(request, "uid"),
                    trace_id=query(request, "trace_id"),
                    limit=limit(request),
                    probes=query(request, "probes") in ("1", "true"),
                )
            }
        )

    async def logs(request: Request) -> Response:
        return _json(
            {
                "logs": store.search_logs(
                    level=query(request, "level"),
                    service=query(request, "service"),
                    trace_id=query(request, "trace_id"),
                    text=query(request, "q"),
                    limit=limit(request),
                )
            }
        )

    async def traces(request: Request) -> Response:
        return _json({"traces": store.traces(min(limit(request), 200))})

    async def one_trace(request: Request) -> Response:
        trace_id = request.path_params["trace_id"].lower()
        found = store.trace(trace_id)
        if found is None:
            return problem_response(404, f"trace {trace_id} is not in the window")
        return _json(found)

    async def service_map(_: Request) -> Response:
        return _json(store.service_map())

    async def status(_: Request) -> Response:
        return _json({"version": store.version, "spans": len(store.spans), "logs": len(store.logs)})

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            seen = -1
            idle = 0.0
            while True:  # Starlette ends the stream when the page goes away
                if store.version != seen:
                    seen = store.version
                    idle = 0.0
                    yield f"event: change\ndata: {seen}\n\n".encode()
                elif idle >= 15:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                await asyncio.sleep(poll)
                idle += poll

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def restart_service(request: Request) -> Response:
        name = request.path_params["name"]
        if request.headers.get("x-kiban-dev") != "1":
            return problem_response(403, "a restart needs the x-kiban-dev: 1 header")
        state = store.services.get(name)
        if restart is None or state is None or not state.managed:
            return problem_response(404, f"kiban dev does not run a service {name}")
        await restart(name)
        return _json({"restarting": name}, 202)

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/v1/traces", receiver(ingest_spans), methods=["POST"]),
        Route("/v1/logs", receiver(ingest_logs), methods=["POST"]),
        Route("/v1/metrics", receiver(ingest_metrics), methods=["POST"]),
        Route("/api/status", status),
        Route("/api/services", services),
        Route("/api/services/{name}/restart", restart_service, methods=["POST"]),
        Route("/api/requests", requests),
        Route("/api/logs", logs),
        Route("/api/traces", traces),
        Route("/api/traces/{trace_id}", one_trace),
        Route("/api/map", service_map),
        Route("/api/events", events),
    ]

    async def not_found(request: Request, _: Exception) -> Response:
        return problem_response(404, f"no page {request.url.path}")

    async def not_allowed(request: Request, _: Exception) -> Response:
        return problem_response(405, f"{request.method} {request.url.path}")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    return LoopbackHost(app)
