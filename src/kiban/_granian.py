"""kiban's services on granian, with the same drain, bounds and exit status as on uvicorn.

``SERVER=granian`` serves through granian's embedded server (``granian.server.embed``,
its public API for running in a program's own event loop), the ASGI interface with its
lifespan. granian has the request-head deadline (``header_read_timeout``) and a head
buffer limit as settings; kiban adds what a server cannot know about the service: on
SIGTERM readiness turns 503 and requests are still served for ``HTTP_DRAIN_SECONDS``,
then granian stops taking connections and finishes what is in flight, those still
running after ``HTTP_SHUTDOWN_TIMEOUT`` are answered 503 by the service, the cleanups
run in the lifespan, and a watchdog bounds the whole. The signals follow the same policy as
on uvicorn (``kiban._shutdown.Shutdown``). pyproject.toml bounds granian from above.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

from granian.constants import Interfaces
from granian.errors import FatalError
from granian.http import HTTP1Settings
from granian.server.embed import Server

from kiban import _log as log
from kiban._config import Settings
from kiban._shutdown import Shutdown

if TYPE_CHECKING:
    from kiban._app import Service

__all__ = ["serve"]


async def _serve(service: Service, settings: Settings) -> bool:
    server = Server(
        service.app,
        address=settings.http_host,
        port=settings.http_port,
        interface=Interfaces.ASGI,
        http1_settings=HTTP1Settings(
            header_read_timeout=int(settings.http_read_header_timeout * 1000),
            max_buffer_size=max(settings.http_max_header_bytes, 8192),
        ),
        log_enabled=False,
    )
    loop = asyncio.get_running_loop()

    def stop() -> None:
        service.stop_accepting()
        loop.call_later(
            settings.http_shutdown_timeout,
            lambda: asyncio.ensure_future(service.interrupt("shutdown")),
        )
        server.stop()  # type: ignore[no-untyped-call]  # granian's API is untyped

    shutdown = Shutdown(service, settings, stop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.signal)
    log.info("listening", url=f"http://{settings.http_host}:{settings.http_port}", server="granian")
    try:
        await server.serve()
    except FatalError:  # granian's word for a lifespan that did not start (kiban logged why)
        return False
    finally:
        shutdown.disarm()
    return True


def serve(service: Service, settings: Settings) -> bool:
    """Serve until signalled; whether the service started (``kiban.run`` gives the status)."""
    import uvloop

    return uvloop.run(_serve(service, settings))
