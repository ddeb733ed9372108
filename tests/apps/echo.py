"""An upstream for client tests: echoes what it received, fails on request."""

from __future__ import annotations

import asyncio
from collections import Counter

from fastapi import FastAPI, Request, Response

import kiban
from kiban.security import NoSecurity

app = FastAPI(title="echo")
kiban.Service(app, security=NoSecurity())
attempts: Counter[str] = Counter()


@app.api_route("/headers", methods=["GET", "POST"])
async def headers(request: Request) -> dict[str, str]:
    return dict(request.headers)


@app.api_route("/flaky/{key}", methods=["GET", "POST"])
async def flaky(key: str, failures: int = 2) -> Response:
    """Answers 503 ``failures`` times for ``key``, then 200 with the attempt count."""
    attempts[key] += 1
    if attempts[key] <= failures:
        return Response(status_code=503)
    return Response(str(attempts[key]), media_type="text/plain")


@app.get("/attempts/{key}")
async def count(key: str) -> int:
    return attempts[key]


@app.get("/sleep")
async def sleep(seconds: float) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}
