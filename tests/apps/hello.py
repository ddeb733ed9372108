"""A small kiban service that the process tests run with ``kiban run``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from opentelemetry import trace

import kiban
from kiban.security import APIKey, NoSecurity, Security


@asynccontextmanager
async def _warm_up(_: FastAPI) -> AsyncIterator[None]:
    """An app's own start-up that waits on something that never comes (a cache to fill)."""
    kiban.log.info("warming up")
    await asyncio.Event().wait()
    yield


app = FastAPI(title="hello", lifespan=_warm_up if os.environ.get("HELLO_HANG_START") else None)


async def _debug_key(key: str) -> bool:
    return key == "debug-key"


service = kiban.Service(
    app, security=NoSecurity(), debug_security=Security(APIKey(_debug_key, name="debug_key"))
)
greetings = kiban.meter().create_counter("greetings_total", description="Greetings sent.")


async def _goodbye() -> None:
    kiban.log.info("pools closed")


async def _hang() -> None:
    """A pool closing a connection to a database that stopped answering."""
    await asyncio.Event().wait()


if os.environ.get("HELLO_HANG_CLEANUP"):
    service.on_shutdown(_hang)
service.on_shutdown(_goodbye)


@app.get("/hello/{name}")
async def hello(name: str) -> dict[str, str]:
    with trace.get_tracer("hello").start_as_current_span("compose greeting"):
        kiban.log.debug("composing greeting", name=name)
        kiban.log.info("greeting", name=name)
    greetings.add(1, {"kind": "hello"})
    return {"hello": name}


@app.post("/echo")
async def echo(request: Request) -> dict[str, int]:
    return {"bytes": len(await request.body())}


@app.get("/slow")
async def slow(seconds: float = 1.5) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/boom")
async def boom() -> None:
    raise RuntimeError("the hello service broke")


@app.get("/teapot")
async def teapot() -> None:
    raise kiban.Problem(418, "Short and stout.")


@app.get("/stream")
async def stream(seconds: float = 60) -> StreamingResponse:
    """A response that starts at once and then takes ``seconds`` to end."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first chunk\n"
        await asyncio.sleep(seconds)
        yield b"last chunk\n"

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/stubborn")
async def stubborn(seconds: float = 60) -> dict[str, float]:
    """A handler stuck where cancellation does not reach (a driver blocked in a call)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        try:
            await asyncio.sleep(end - loop.time())
        except asyncio.CancelledError:
            continue
    return {"slept": seconds}


@app.get("/big")
async def big(mb: int = 64) -> StreamingResponse:
    """``mb`` MiB of response, for a client that stops reading it."""

    async def chunks() -> AsyncIterator[bytes]:
        block = b"x" * (1024 * 1024)
        for _ in range(mb):
            yield block

    return StreamingResponse(chunks(), media_type="application/octet-stream")
