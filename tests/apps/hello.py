"""A small kiban service that the process tests run with ``kiban run``."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

import kiban

app = FastAPI(title="hello")
service = kiban.Service(app)


async def _goodbye() -> None:
    kiban.log.info("pools closed")


service.on_shutdown(_goodbye)


@app.get("/hello/{name}")
async def hello(name: str) -> dict[str, str]:
    kiban.log.info("greeting", name=name)
    return {"hello": name}


@app.get("/slow")
async def slow(seconds: float = 1.5) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}
