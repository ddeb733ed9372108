"""The gRPC server of a kiban service: beside the HTTP one, in the same process and loop.

Started with the service (after its start-up hooks, so migrations come first) when
servicers were added, on ``GRPC_PORT``; it serves the standard health service
(``grpc.health.v1``, driven by the same pingers and drain as HTTP readiness) and server
reflection. On SIGTERM its health turns NOT_SERVING as HTTP readiness turns 503; once
the drain is over it stops taking calls and gives those in flight the same shutdown
budget as HTTP requests (``HTTP_SHUTDOWN_TIMEOUT``), before the pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kiban import _log as log
from kiban._rpc import Declaration, Interceptor, Registry

if TYPE_CHECKING:
    from kiban._app import Service

__all__ = ["GrpcServer"]


class _MetadataEncoding(logging.Filter):
    """grpcio logs a client's metadata value that is not UTF-8 at error level, with a
    traceback, then reads it as Latin-1. A caller must not be able to write error lines
    and tracebacks into a service's log at will: the record becomes one warning, without
    the traceback or the value (which may be a credential)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid encoding on"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "gRPC metadata value is not UTF-8: read as Latin-1", ()
            record.exc_info = record.exc_text = None
        return True


#: grpcio's own logger (a name it documents by using it); one filter, added once.
_GRPC_LOGGER = logging.getLogger("grpc._cython.cygrpc")
if not any(isinstance(item, _MetadataEncoding) for item in _GRPC_LOGGER.filters):
    _GRPC_LOGGER.addFilter(_MetadataEncoding())

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: How often the health service looks at the drain flag (set from a signal handler).
_DRAIN_POLL = 0.1


class GrpcServer:
    """The servicers of a service and, once started, the ``grpc.aio`` server serving them."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = Registry()
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        #: The port bound once started (``GRPC_PORT=0`` picks a free one).
        self.port: int | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._address = ""

    def add(
        self,
        adder: Callable[[Any, Any], None],
        servicer: Any,
        *,
        security: Declaration | None = None,
        methods: Mapping[str, Declaration] | None = None,
    ) -> None:
        """Serve ``servicer`` (added by its generated ``add_XServicer_to_server``).

        ``security`` is the service level's declaration, ``methods`` maps a method's name
        to its own: ``Security(...)``, ``NoSecurity()``, ``RateLimited(...)``,
        ``Unlimited()``, or a list of them. The narrowest wins; the API default given to
        ``kiban.Service`` covers the rest, and a method with none stops the start.
        """
        if self.server is not None:
            raise RuntimeError("the gRPC server has started: add servicers before")
        self.registry.add(adder, servicer, security=security, methods=methods)

    @property
    def enabled(self) -> bool:
        return bool(self.registry.registrations)

    def bind(self) -> None:
        """Resolve the methods' declarations and take the port, before any start-up hook:
        an undeclared method or a port in use fails the start before a migration runs."""
        service = self.service
        settings = service.settings
        policy = service.policy
        self.registry.resolve(policy.default, policy.routes.default_rate)
        services = self.registry.services
        interceptor = Interceptor(
            service,
            self.registry,
            public=(HEALTH_SERVICE, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"),
        )
        server = grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
                ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
                ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
                # Keepalive enforcement: a client pinging more often than this is told to
                # go away (GOAWAY ENHANCE_YOUR_CALM) after two strikes.
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    int(settings.grpc_min_ping_interval * 1000),
                ),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.registry.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*services, HEALTH_SERVICE, reflection.SERVICE_NAME], server
        )
        host = settings.grpc_host or settings.http_host
        self.port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
        self.server = server
        self._address = f"grpc://{host}:{self.port}"

    async def start(self) -> None:
        """Serve on the port ``bind`` took, health following HTTP readiness."""
        assert self.server is not None, "bind() first"
        await self.server.start()
        services = self.registry.services
        await self._set_all(services, await self._status())
        self._watch = asyncio.ensure_future(self._follow(services))
        log.info("listening", url=self._address, services=services)

    async def _status(self) -> int:
        report = await self.service.health.check()
        return int(_SERVING if report.ok else _NOT_SERVING)

    async def _set_all(self, services: list[str], status: int) -> None:
        for name in ("", *services):
            await self.health.set(name, status)

    async def _follow(self, services: list[str]) -> None:
        """Keep the health service's answers those of HTTP readiness, per service name."""
        settings = self.service.settings
        checker = self.service.health
        loop = asyncio.get_running_loop()
        next_check = loop.time() + settings.health_cache_seconds
        while True:
            await asyncio.sleep(_DRAIN_POLL)
            if checker.draining:
                await self.health.enter_graceful_shutdown()
                return
            if loop.time() >= next_check:
                await self._set_all(services, await self._status())
                next_check = loop.time() + settings.health_cache_seconds

    def begin_stop(self, grace: float) -> None:
        """Stop taking calls now; those in flight get ``grace`` seconds (idempotent)."""
        if self.server is None or self._stopping is not None:
            return
        self._stopping = asyncio.ensure_future(self._stop(self.server, grace))

    async def _stop(self, server: grpc.aio.Server, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await server.stop(grace)

    async def stopped(self, grace: float) -> None:
        """Stop (if not begun) and wait until the server has, then stop following health."""
        self.begin_stop(grace)
        if self._stopping is not None:
            await self._stopping
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
