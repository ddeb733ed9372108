"""The request path's cost without a network: ``python -m bench.inprocess VARIANT [N]``.

Drives the variant's ASGI app directly, one request after another on one event loop,
and prints the best of five timings in µs per request. With no sockets, no server and
no client in the measurement it moves by a microsecond or two between runs (more on a
busy shared host), where wrk's numbers move by several percent: the figure to watch when
changing the request path, comparing builds side by side in alternating runs.
``KIBAN_BENCH_OFF`` switches features off as for the served variants.

``--server`` feeds each request's bytes to the HTTP protocol that serves the variant
(uvicorn's httptools protocol, or kiban's for kiban) over a transport that only counts
writes: the same measurement with the server's parsing, task and response writing in it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from bench.apps import API_KEY, load

HEADERS = [(b"host", b"127.0.0.1:8000"), (b"x-api-key", API_KEY.encode())]


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/items/1",
        "raw_path": b"/items/1",
        "query_string": b"",
        "headers": HEADERS,
        "state": {},
    }


class _Transport(asyncio.Transport):
    """Takes a served response's writes: a head, then its body, which ends the request."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []
        self.answered: asyncio.Future[None] | None = None
        self._head = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head:
            self.heads.append(bytes(data[:12]))
        elif self.answered is not None:
            self.answered.set_result(None)
        self._head = not self._head

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _served(variant: str, app: Any) -> tuple[Callable[[], Awaitable[None]], Callable[[], bool]]:
    """One request through the protocol that serves ``variant``, and whether all were 200."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    protocol_class: Any = HttpToolsProtocol
    if variant == "kiban":
        from kiban._uvicorn import HttpProtocol

        protocol_class = HttpProtocol
    # As each is served (bench.serve, kiban.run): uvicorn's default proxy-header
    # rewriting for bare FastAPI, kiban's own X-Forwarded-For handling for kiban.
    config = uvicorn.Config(
        app,
        http=protocol_class,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=variant != "kiban",
    )
    config.load()
    loop = asyncio.get_running_loop()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = _Transport()
    protocol.connection_made(transport)
    request = b"".join(
        [b"GET /items/1 HTTP/1.1\r\n", *(name + b": " + value + b"\r\n" for name, value in HEADERS)]
    )
    request += b"\r\n"

    async def one() -> None:
        transport.answered = loop.create_future()
        protocol.data_received(request)
        await transport.answered

    return one, lambda: {head[9:12] for head in transport.heads} == {b"200"}


async def _measure(variant: str, app: Any, requests: int, served: bool) -> float:
    started = asyncio.Event()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await queue.put({"type": "lifespan.startup"})

    async def lifespan_send(message: dict[str, Any]) -> None:
        started.set()

    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, queue.get, lifespan_send)
    )
    await started.wait()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def direct() -> None:
        await app(_scope(), receive, send)

    one, all_ok = _served(variant, app) if served else (direct, lambda: set(statuses) == {200})
    for _ in range(2000):  # warm up
        await one()
    if not all_ok():
        raise SystemExit("requests were not all answered 200")
    gc.collect()
    gc.freeze()
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(requests):
            await one()
        best = min(best, (time.perf_counter() - began) / requests)
    await queue.put({"type": "lifespan.shutdown"})
    await lifespan
    return best * 1e6


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--server"]
    variant = args[0]
    requests = int(args[1]) if len(args) > 1 else 20_000
    app = load(variant)
    if variant == "kiban":
        from kiban import log

        log.sink.stream = open(os.devnull, "wb")  # noqa: SIM115 (lives as long as the process)
    print(f"{uvloop.run(_measure(variant, app, requests, '--server' in sys.argv)):.1f}")


if __name__ == "__main__":
    main()
