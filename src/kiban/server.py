"""Running a service: server limits, timeouts and a graceful, bounded shutdown.

On SIGTERM Kubernetes removes the pod from its endpoints at the same moment, and load
balancers take a while to notice. So kiban first turns readiness 503 and keeps serving
for a drain delay (answering keep-alive clients with ``Connection: close``), then stops
accepting, gives in-flight requests a bounded time to finish, closes its pools through
the app's lifespan, and exits 0. A second signal skips the rest of the drain; a third
stops at once.

uvicorn reads request heads without a deadline, so a client trickling its headers
(slowloris) could hold a connection forever; kiban's HTTP protocol closes a connection
whose head is not complete within ``HTTP_READ_HEADER_TIMEOUT`` and answers 431 to a
head larger than ``HTTP_MAX_HEADER_BYTES``.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import inspect
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiban import log
from kiban.config import Settings
from kiban.errors import problem_body
from kiban.health import Checker

__all__ = ["Server", "run"]


class Config(uvicorn.Config):
    """uvicorn's config plus the limits uvicorn itself lacks."""

    def __init__(
        self, app: Any, *, read_header_timeout: float, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.read_header_timeout = read_header_timeout
        self.max_header_bytes = max_header_bytes


def _header_too_large() -> bytes:
    body = problem_body(431)  # outside any request: no trace id to add
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/problem+json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and a head size limit."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.read_header_timeout: float = getattr(config, "read_header_timeout", 10.0)
        self.max_header_bytes: int = getattr(config, "max_header_bytes", 16 * 1024)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._rejected = False

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.read_header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expired(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            log.warning(
                "request head not received in time, closing connection",
                remote_addr=self.client[0] if self.client else None,
                timeout_s=self.read_header_timeout,
            )
            self.transport.close()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes and not self._rejected:
            self._rejected = True
            self._disarm()
            self.transport.write(_header_too_large())
            self.transport.close()
            raise ValueError("request head too large")  # stops the parser

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._rejected:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if not self._rejected:  # the 431 was sent already
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


class Server(uvicorn.Server):
    """uvicorn's server with kiban's drain-then-stop shutdown, exiting 0 on SIGTERM."""

    def __init__(self, config: uvicorn.Config, checker: Checker, drain_seconds: float) -> None:
        super().__init__(config)
        self.checker = checker
        self.drain_seconds = drain_seconds
        self._drain_until: float | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: only flip flags here, log from on_tick.
        if self._drain_until is None:
            self.checker.start_draining()
            self._drain_until = time.monotonic() + self.drain_seconds
        elif not self.should_exit:
            self.should_exit = True
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None:
            if not self._announced:
                self._announced = True
                log.info("shutdown requested, draining", drain_s=self.drain_seconds)
            if time.monotonic() >= self._drain_until:
                self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        # Everything loaded so far lives as long as the process: keep it out of the
        # garbage collector's scans, which otherwise show up as tail latency.
        gc.collect()
        gc.freeze()
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("listening", url=f"http://{host}:{port}")


def load_target(target: str) -> Any:
    """Import ``module:attribute``, the way uvicorn names an app."""
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise ValueError(f"expected 'module:attribute', got {target!r}")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def run(target: Any, settings: Settings | None = None) -> None:
    """Serve a kiban service (or ``"module:attr"`` naming one) until SIGTERM/SIGINT."""
    from kiban.app import Service

    if isinstance(target, str):
        target = load_target(target)
    if inspect.isfunction(target):  # an app factory: ``create_app``
        target = target()
    service = Service.of(target)
    settings = settings or service.settings
    config = Config(
        service.app,
        host=settings.http_host,
        port=settings.http_port,
        http=HttpProtocol,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=int(max(1, settings.http_keep_alive_timeout)),
        timeout_graceful_shutdown=int(max(1, settings.http_shutdown_timeout)),
        read_header_timeout=settings.http_read_header_timeout,
        max_header_bytes=settings.http_max_header_bytes,
    )
    server = Server(config, service.health, settings.http_drain_seconds)
    server.run()
    log.info("stopped")
    log.sink.flush()
