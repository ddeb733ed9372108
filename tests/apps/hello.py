"""A small kiban service that the process tests run with ``kiban run``."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from opentelemetry import trace

import kiban
from kiban.security import APIKey, NoSecurity, Security

app = FastAPI(title="hello")


async def _debug_key(key: str) -> bool:
    return key == "debug-key"


service = kiban.Service(
    app, security=NoSecurity(), debug_security=Security(APIKey(_debug_key, name="debug_key"))
)
greetings = kiban.meter().create_counter("greetings_total", description="Greetings sent.")


async def _goodbye() -> None:
    kiban.log.info("pools closed")


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
