"""The request path's cost without a server: ``python -m bench.inprocess VARIANT``.

Drives the variant's ASGI app directly, one request after another on one event loop,
and prints the best of five timings in µs per request. With no sockets, no server and
no client in the measurement it moves by a microsecond or two between runs (more on a
busy shared host), where wrk's numbers move by several percent: the figure to watch when
changing the request path, comparing builds side by side in alternating runs.
``KIBAN_BENCH_OFF`` switches features off as for the served variants.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
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


async def _measure(app: Any, requests: int) -> float:
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

    for _ in range(2000):  # warm up
        await app(_scope(), receive, send)
    if set(statuses) != {200}:
        raise SystemExit(f"requests were answered {sorted(set(statuses))}, not 200")
    gc.collect()
    gc.freeze()
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(requests):
            await app(_scope(), receive, send)
        best = min(best, (time.perf_counter() - began) / requests)
    await queue.put({"type": "lifespan.shutdown"})
    await lifespan
    return best * 1e6


def main() -> None:
    variant = sys.argv[1]
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    app = load(variant)
    if variant == "kiban":
        from kiban import log

        log.sink.stream = open(os.devnull, "wb")  # noqa: SIM115 (lives as long as the process)
    print(f"{uvloop.run(_measure(app, requests)):.1f}")


if __name__ == "__main__":
    main()
