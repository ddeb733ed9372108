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
import os
import socket
import threading
import time
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from kiban import log
from kiban.chassis import ENCODED_HEADERS
from kiban.config import Settings
from kiban.errors import problem_body

if TYPE_CHECKING:
    from kiban.app import Service

__all__ = ["EXIT_ABANDONED", "Server", "run"]


class Config(uvicorn.Config):
    """uvicorn's config plus the limits uvicorn itself lacks."""

    def __init__(
        self, app: Any, *, read_header_timeout: float, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.read_header_timeout = read_header_timeout
        self.max_header_bytes = max_header_bytes


def _refusal(status: int, detail: str | None = None) -> bytes:
    """A problem+json answer the server writes itself, before any request exists."""
    body = problem_body(status, detail)  # outside any request: no trace id to add
    return (
        b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
        + b"content-type: application/problem+json\r\n"
        + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body
    )


_HEADER_TOO_LARGE = _refusal(431)
#: What every request the HTTP parser refuses gets (bare LF, obs-fold, CL with TE, a bad
#: Content-Length, an invalid method, NUL in a header...): the parser's own message is
#: not repeated, it may quote the request.
_MALFORMED = _refusal(400, "The request is not valid HTTP/1.1.")


class _HeadWriter:
    """A request's transport until its response head is written: the head gains lines.

    ``extension`` is the request's ``ENCODED_HEADERS`` extension: the request path puts
    header lines it has already checked under its ``"lines"`` just before it sends the
    response start, and they are written before the head's closing blank line (uvicorn
    writes a status line and headers in one piece). With the head, the cycle gets the
    real transport back, so the body is written straight to the socket.
    """

    __slots__ = ("cycle", "extension", "transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self.transport = transport
        self.cycle: RequestResponseCycle | None = cycle
        self.extension: dict[object, object] = {}

    def write(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started:  # the head (not a 100 Continue)
            cycle.transport = self.transport
            self.cycle = None
            lines = self.extension.get("lines")
            end = data.find(b"\r\n\r\n") + 2  # the head's last header line ends here
            if isinstance(lines, bytes) and end > 1:
                data = data[:end] + lines + data[end:]
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and a head size limit.

    Both are kept off the per-header path: the deadline is a start time that the
    server's tick (every 0.1 s) compares, not a timer per request, and the head is
    measured by the bytes received while it is incomplete, counted exactly (request
    line and headers) only when its last chunk could have taken it past the limit.
    """

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.read_header_timeout: float = getattr(config, "read_header_timeout", 10.0)
        self.max_header_bytes: int = getattr(config, "max_header_bytes", 16 * 1024)
        #: Loop time since which a request head has been awaited; None once it is in.
        self.head_since: float | None = None
        self._head_bytes = 0  # of the head being received, as of the last chunk: at least
        self._head_upper = 0  # of the head being received before this chunk: at most
        self._chunk = 0  # bytes of the chunk being parsed
        self._began = False  # a request head began in the chunk being parsed
        self._rejected = False

    def expire(self, now: float) -> None:
        """Close the connection if its request head is overdue (called by the server tick)."""
        if self.head_since is None or now - self.head_since < self.read_header_timeout:
            return
        self.head_since = None
        if not self.transport.is_closing():
            log.warning(
                "request head not received in time, closing connection",
                remote_addr=self.client[0] if self.client else None,
                timeout_s=self.read_header_timeout,
            )
            self.transport.close()

    def _parsed_head_bytes(self) -> int:
        """The request line and headers parsed so far, as they came in (names, values, CRLFs)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _reject(self) -> None:
        self._rejected = True
        self.head_since = None
        self.transport.write(_HEADER_TOO_LARGE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._chunk = len(data)
        self._began = False
        super().data_received(data)
        if self.head_since is not None and not self._rejected:  # a head is still incomplete
            # A head that began in this chunk is measured (the chunk may end a previous
            # request's body); a head that goes on counts the whole chunk.
            # Bounds, not counts: a header still arriving is not in the parsed ones, and
            # the bytes before the head (a body's tail) are not part of it.
            if self._began:
                self._head_bytes = self._parsed_head_bytes()
                self._head_upper = self._chunk
            else:
                self._head_bytes += self._chunk
                self._head_upper += self._chunk
            if self._head_bytes > self.max_header_bytes:
                self._reject()

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers a request its parser refuses in plain text; kiban in problem+json."""
        if not self._rejected:  # else the 431 was sent already
            self._rejected = True
            self.head_since = None
            self.transport.write(_MALFORMED)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_upper = 0
        self._began = True
        if self.head_since is None:  # a connection's first head is timed from its connect
            self.head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self.head_since = None
        # Measured exactly (every header is in) when the head could be past the limit:
        # however its bytes were split across reads, the upper bound says so.
        if (
            self._head_upper + self._chunk > self.max_header_bytes
            and self._parsed_head_bytes() > self.max_header_bytes
        ):
            self._reject()
            raise ValueError("request head too large")  # stops the parser
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not an upgrade: a new cycle
            # Its task has not run yet. (The cycle stays uvicorn's own class: giving it
            # another would slow every one of its attribute lookups.)
            head = _HeadWriter(self.transport, cycle)
            cycle.transport = head  # type: ignore[assignment]
            self.scope["extensions"] = {ENCODED_HEADERS: head.extension}


class Server(uvicorn.Server):
    """uvicorn's server with kiban's drain-then-stop shutdown, bounded in every case.

    The shutdown's phases and their bounds: the drain (``HTTP_DRAIN_SECONDS``), the
    in-flight requests (``HTTP_SHUTDOWN_TIMEOUT``; those still running then are
    answered 503 by the service and cancelled), the cleanups (``SHUTDOWN_CLEANUP_TIMEOUT``,
    in the app's lifespan). Past all of them and a margin, a watchdog ends the process
    whatever a dependency is doing, so it never waits for a SIGKILL.
    """

    #: Time past the phases' bounds before the watchdog ends the process.
    MARGIN = 2.0

    def __init__(
        self, config: uvicorn.Config, service: Service, settings: Settings | None = None
    ) -> None:
        super().__init__(config)
        settings = settings or service.settings
        self.service = service
        self.checker = service.health
        self.drain_seconds = settings.http_drain_seconds
        self.shutdown_timeout = settings.http_shutdown_timeout
        self.bound = (
            self.drain_seconds
            + self.shutdown_timeout
            + settings.shutdown_cleanup_timeout
            + self.MARGIN
        )
        self._drain_until: float | None = None
        self._announced = False
        self._watchdog: threading.Timer | None = None

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
        now = asyncio.get_running_loop().time()
        for connection in list(self.server_state.connections):
            if isinstance(connection, HttpProtocol):
                connection.expire(now)
        if self._drain_until is not None:
            if not self._announced:
                self._announced = True
                self._start_watchdog()
                log.info("shutdown requested, draining", drain_s=self.drain_seconds)
            if time.monotonic() >= self._drain_until:
                self.should_exit = True
        return await super().on_tick(counter)

    def _start_watchdog(self) -> None:
        self._watchdog = threading.Timer(self.bound, self._overdue)
        self._watchdog.daemon = True
        self._watchdog.start()

    def disarm(self) -> None:
        """The shutdown is over: the watchdog has nothing left to guard."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _overdue(self) -> None:
        """The shutdown took longer than all its bounds: end the process now."""
        log.error(
            "shutdown exceeded its bound, exiting",
            bound_s=round(self.bound, 3),
            abandoned=self.service.abandoned or None,
        )
        log.sink.flush()
        os._exit(EXIT_ABANDONED)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with in-flight requests cut by the service at the timeout.

        uvicorn is given a second more than ``HTTP_SHUTDOWN_TIMEOUT``: by the time it
        cancels what is left, kiban has answered those requests 503 problem+json
        instead of uvicorn's plain-text 500.
        """
        if self._watchdog is None:  # stopped without a signal (the app's lifespan failed)
            self._start_watchdog()
        cut = asyncio.ensure_future(self._cut_after(self.shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    async def _cut_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.service.interrupt("shutdown")

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


#: The exit status of a shutdown that had to abandon something (requests or cleanups).
EXIT_ABANDONED = 3


def load_target(target: str) -> Any:
    """Import ``module:attribute``, the way uvicorn names an app."""
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise ValueError(f"expected 'module:attribute', got {target!r}")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def run(target: Any, settings: Settings | None = None) -> int:
    """Serve a kiban service (or ``"module:attr"`` naming one) until SIGTERM/SIGINT.

    Returns the process's exit status: 0 when the shutdown finished everything in
    time, ``EXIT_ABANDONED`` (3) when it cut requests or abandoned a cleanup (logged,
    naming which).
    """
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
        timeout_graceful_shutdown=settings.http_shutdown_timeout + 1,
        read_header_timeout=settings.http_read_header_timeout,
        max_header_bytes=settings.http_max_header_bytes,
    )
    server = Server(config, service, settings)
    server.run()
    server.disarm()
    status = EXIT_ABANDONED if service.abandoned else 0
    log.info("stopped", exit_status=status, abandoned=service.abandoned or None)
    log.sink.flush()
    return status
