"""A service whose route needs an API key and is rate limited: what Redis backs."""

from __future__ import annotations

from fastapi import FastAPI

import kiban
from kiban._ratelimit import RateLimit
from kiban.security import APIKey, Security

app = FastAPI(title="guarded")


async def _valid(key: str) -> bool:
    return key == "good-key"


service = kiban.Service(app, security=Security(APIKey(_valid)), rate_limit=RateLimit("1000/second"))


@app.get("/items")
async def items() -> dict[str, int]:
    return {"count": 1}
