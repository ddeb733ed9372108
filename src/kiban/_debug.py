"""Debug endpoints: change the log level, log payloads, profile, all while running.

Mounted under ``/debug`` only when ``DEBUG_ENDPOINTS=true``, and always behind the
security requirement the service gives (``kiban.Service(..., debug_security=...)``):

- ``GET|PUT /debug/log-level``: read or set the level (``{"level": "debug"}``); and
  while debug is enabled an ``x-debug: 1`` request header turns on debug lines for that
  request only.
- ``GET|PUT /debug/payloads``: log request and response bodies (``{"enabled": true}``),
  JSON secrets redacted, truncated to ``max_bytes``.
- ``GET /debug/profile?seconds=N``: a CPU profile of the process over N seconds
  (pyinstrument), as an HTML page to open in a browser.
- ``GET /debug/memory?top=N``: the N largest allocation sites (tracemalloc, started on
  first call), ``DELETE`` stops tracing.
- ``GET /debug/tasks``: every asyncio task with where it is waiting.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiban import _log as log
from kiban._errors import Problem
from kiban._redact import redact_json

__all__ = ["PayloadLog", "PayloadLogMiddleware", "router"]


class PayloadLog:
    """Whether payloads are logged, and how much of each."""

    def __init__(self) -> None:
        self.enabled = False
        self.max_bytes = 4096

    def render(self, body: bytes, content_type: str | None) -> Any:
        if not body:
            return None
        if content_type and "json" in content_type:
            try:
                return redact_json(orjson.loads(body))
            except orjson.JSONDecodeError:
                pass
        if content_type and content_type.startswith("text/"):
            return body[: self.max_bytes].decode("utf-8", "replace")
        return f"<{len(body)} bytes of {content_type or 'unknown type'}>"


class PayloadLogMiddleware:
    """Logs bodies when payload logging is on; costs one flag check when it is off."""

    def __init__(self, app: ASGIApp, payloads: PayloadLog) -> None:
        self.app = app
        self.payloads = payloads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.payloads.enabled:
            await self.app(scope, receive, send)
            return
        limit = self.payloads.max_bytes
        request = bytearray()
        response = bytearray()
        response_type: list[str] = []

        async def capture_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(request) < limit:
                request.extend(message.get("body", b"")[: limit - len(request)])
            return message

        async def capture_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name == b"content-type":
                        response_type.append(value.decode("latin-1"))
            elif message["type"] == "http.response.body" and len(response) < limit:
                response.extend(message.get("body", b"")[: limit - len(response)])
            await send(message)

        try:
            await self.app(scope, capture_receive, capture_send)
        finally:
            request_type = next(
                (
                    value.decode("latin-1")
                    for name, value in scope["headers"]
                    if name == b"content-type"
                ),
                None,
            )
            log.info(
                "payload",
                method=scope["method"],
                path=scope["path"],
                request_body=self.payloads.render(bytes(request), request_type),
                response_body=self.payloads.render(
                    bytes(response), response_type[0] if response_type else None
                ),
            )


class LogLevel(BaseModel):
    level: Literal["debug", "info", "warning", "error"]


class Payloads(BaseModel):
    enabled: bool
    max_bytes: int = Field(4096, ge=64, le=1024 * 1024)


_profiling = asyncio.Lock()


def router(payloads: PayloadLog, dependencies: list[Any]) -> APIRouter:
    routes = APIRouter(prefix="/debug", dependencies=dependencies, include_in_schema=False)

    @routes.get("/log-level")
    async def get_log_level() -> LogLevel:
        return LogLevel.model_validate({"level": log.get_level()})

    @routes.put("/log-level")
    async def set_log_level(body: LogLevel) -> LogLevel:
        log.set_level(body.level)
        log.warning("log level changed", level=body.level)
        return body

    @routes.get("/payloads")
    async def get_payloads() -> Payloads:
        return Payloads(enabled=payloads.enabled, max_bytes=payloads.max_bytes)

    @routes.put("/payloads")
    async def set_payloads(body: Payloads) -> Payloads:
        payloads.enabled = body.enabled
        payloads.max_bytes = body.max_bytes
        log.warning("payload logging changed", enabled=body.enabled)
        return body

    @routes.get("/profile")
    async def profile(
        seconds: Annotated[float, Query(gt=0, le=60)] = 10.0,
        interval: Annotated[float, Query(ge=0.0001, le=0.1)] = 0.001,
    ) -> HTMLResponse:
        from pyinstrument import Profiler

        if _profiling.locked():
            raise Problem(409, "A profile is already being taken.")
        async with _profiling:
            profiler = Profiler(interval=interval, async_mode="disabled")
            profiler.start()
            try:
                await asyncio.sleep(seconds)
            finally:
                profiler.stop()
        return HTMLResponse(
            profiler.output_html(),
            headers={"content-disposition": 'inline; filename="profile.html"'},
        )

    @routes.get("/memory")
    async def memory(top: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        if not tracemalloc.is_tracing():
            tracemalloc.start(10)
            return {"tracing": True, "started": True, "top": []}
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("lineno")[:top]
        current, peak = tracemalloc.get_traced_memory()
        return {
            "tracing": True,
            "started": False,
            "current_bytes": current,
            "peak_bytes": peak,
            "top": [
                {"where": str(stat.traceback[0]), "size_bytes": stat.size, "count": stat.count}
                for stat in stats
            ],
        }

    @routes.delete("/memory")
    async def stop_memory() -> dict[str, bool]:
        tracemalloc.stop()
        return {"tracing": False}

    @routes.get("/tasks")
    async def tasks() -> dict[str, Any]:
        found = []
        for task in asyncio.all_tasks():
            coro = task.get_coro()
            found.append(
                {
                    "name": task.get_name(),
                    "coroutine": getattr(coro, "__qualname__", repr(coro)),
                    "done": task.done(),
                    "stack": [
                        f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
                        for frame in task.get_stack(limit=10)
                    ],
                }
            )
        return {"count": len(found), "tasks": found}

    return routes
