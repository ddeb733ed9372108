"""Running a service: server limits, timeouts and a graceful, bounded shutdown.

On SIGTERM Kubernetes removes the pod from its endpoints at the same moment, and load
balancers take a while to notice. So kiban first turns readiness 503 and keeps serving
for a drain delay (answering keep-alive clients with ``Connection: close``), then stops
accepting, gives in-flight requests a bounded time to finish, closes its pools through
the app's lifespan, and exits 0. A second signal skips the rest of the drain; a third
exits at once (``kiban._shutdown.Shutdown``, the same on granian).

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
import socket
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from kiban import _log as log
from kiban._config import ConfigError, Settings
from kiban._shutdown import EXIT_ABANDONED, MARGIN, Shutdown, shutdown_bound
from kiban._uvicorn import Config, HttpProtocol

if TYPE_CHECKING:
    from kiban._app import Service

__all__ = ["EXIT_ABANDONED", "EXIT_NOT_STARTED", "Server", "run"]

#: The exit status of a service whose start-up failed (as uvicorn's own).
EXIT_NOT_STARTED = 3


class Server(uvicorn.Server):
    """uvicorn's server with kiban's drain-then-stop shutdown, bounded in every case.

    The shutdown's phases and their bounds: the drain (``HTTP_DRAIN_SECONDS``), the
    in-flight requests (``HTTP_SHUTDOWN_TIMEOUT``; those still running then are
    answered 503 by the service and cancelled), the cleanups (``SHUTDOWN_CLEANUP_TIMEOUT``,
    in the app's lifespan). Past all of them and a margin, a watchdog ends the process
    whatever a dependency is doing, so it never waits for a SIGKILL. What each signal
    does is ``kiban._shutdown.Shutdown``, the same policy as on granian.
    """

    MARGIN = MARGIN

    def __init__(
        self, config: uvicorn.Config, service: Service, settings: Settings | None = None
    ) -> None:
        super().__init__(config)
        settings = settings or service.settings
        self.service = service
        self.shutdown_timeout = settings.http_shutdown_timeout
        self.bound = shutdown_bound(settings)
        self.policy = Shutdown(service, settings, self._stop)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The listening sockets kiban opened (uvicorn closes its servers on them).
        self.listeners: list[socket.socket] = []

    def _stop(self) -> None:
        self.should_exit = True  # uvicorn's public flag: its main loop ends, shutdown begins

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Hand the signal to kiban's policy, on the loop.

        uvicorn's own handler is not called: it records the signal to raise it again
        once the server has stopped, which would end the process by that signal
        instead of with ``run``'s exit status. A signal handler only schedules: the
        policy logs and starts threads, which a handler must not.
        """
        if self._loop is None:  # before serving: nothing to drain
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self.policy.signal)

    async def on_tick(self, counter: int) -> bool:
        now = asyncio.get_running_loop().time()
        for connection in list(self.server_state.connections):
            if isinstance(connection, HttpProtocol):
                connection.expire(now)
        return await super().on_tick(counter)

    def disarm(self) -> None:
        """The shutdown is over: the watchdog has nothing left to guard."""
        self.policy.disarm()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with in-flight requests cut by the service at the timeout.

        uvicorn is given a second more than ``HTTP_SHUTDOWN_TIMEOUT``: by the time it
        cancels what is left, kiban has answered those requests 503 problem+json
        instead of uvicorn's plain-text 500.
        """
        self.policy.start_watchdog()  # also when stopped without a signal (lifespan failed)
        self.service.stop_accepting()  # the gRPC server, beside this one
        cut = asyncio.ensure_future(self._cut_after(self.shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    async def _cut_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.service.interrupt("shutdown")

    async def startup(self, sockets: Any = None) -> None:
        """Take the port, then run the app's lifespan and serve on it.

        The port is taken before the lifespan opens any pool, so a port in use fails
        the start at once (exit 3) with nothing to close. The listening socket is
        handed to uvicorn (its public ``sockets``), whose event loop accepts from it.
        """
        if sockets is None:
            try:
                sockets = [listen(self.config)]
            except OSError as exc:
                log.error(
                    "cannot listen",
                    address=f"{self.config.host}:{self.config.port}",
                    error=str(exc),
                )
                self.should_exit = True
                return
            self.listeners = sockets
        try:
            await super().startup(sockets=sockets)
        except SystemExit:  # uvicorn's way to say the lifespan did not start
            self._close_listeners()
            self.should_exit = True  # not ``started``: ``run`` says why and exits with it
            return
        except BaseException:
            self._close_listeners()
            raise
        # Everything loaded so far lives as long as the process: keep it out of the
        # garbage collector's scans, which otherwise show up as tail latency.
        gc.collect()
        gc.freeze()
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            log.info("listening", url=f"http://{host}:{port}")

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners = []


def listen(config: uvicorn.Config) -> socket.socket:
    """The listening socket for ``config``'s host and port (raises ``OSError``)."""
    host = config.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Named TCP, not left to the default 0: asyncio's event loop sets TCP_NODELAY only
    # on accepted sockets that say they are TCP, and without it Nagle's algorithm holds
    # a response's body back until the head is acknowledged (40 ms a request on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, config.port))
        sock.listen(config.backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def load_target(target: str) -> Any:
    """Import ``module:attribute``, the way uvicorn names an app.

    A target that does not name something raises ``ConfigError`` saying what is
    missing; an error inside the module's own code is left as it is (its traceback is
    the useful part).
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"expected module:attribute such as app:create_app, got {target!r}")
    try:
        value: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        raise ConfigError(f"no module {module_name!r} here (cwd and sys.path)") from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{module_name} has no {attribute!r}") from None
        value = getattr(value, part)
    return value


def run(target: Any, settings: Settings | None = None) -> int:
    """Serve a kiban service (or ``"module:attr"`` naming one) until SIGTERM/SIGINT.

    Returns the process's exit status: 0 when the shutdown finished everything in
    time, ``EXIT_ABANDONED`` (3) when it cut requests or abandoned a cleanup (logged,
    naming which).
    """
    from kiban._app import Service

    if isinstance(target, str):
        target = load_target(target)
    if inspect.isfunction(target):  # an app factory: ``create_app``
        target = target()
    try:
        service = Service.of(target)
    except TypeError:
        raise ConfigError(
            f"{target!r} is not a kiban service: return kiban.Service(app, security=...) "
            "from the factory, or name the Service"
        ) from None
    settings = settings or service.settings
    if settings.server == "granian":
        from kiban._granian import serve

        started = serve(service, settings)
    else:
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
        started = server.started
    return _exit_status(service, started)


def _exit_status(service: Service, started: bool) -> int:
    """Log how the service ended, the same on both servers; its exit status."""
    if service.interrupted:  # stopped by a signal before it served: as asked
        log.info("stopped before it started", exit_status=0)
        status = 0
    elif not started:  # the start-up failed: its ``start-up failed`` line says why
        log.error("not started", exit_status=EXIT_NOT_STARTED)
        status = EXIT_NOT_STARTED
    else:
        status = EXIT_ABANDONED if service.abandoned else 0
        log.info("stopped", exit_status=status, abandoned=service.abandoned or None)
    log.sink.flush()
    return status
