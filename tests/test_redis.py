"""service.redis(): the app's Redis, traced, measured, pinged and closed, on a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import kiban
from kiban._config import ConfigError, Settings
from kiban.security import NoSecurity
from kiban.testing import capture_spans
from tests.conftest import Silent, closed_port

pytestmark = pytest.mark.integration


def _app(url: str) -> tuple[FastAPI, kiban.Service]:
    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    redis = service.redis(url, socket_timeout=1, socket_connect_timeout=1)
    key = f"kiban-test:{uuid.uuid4().hex}"

    @app.post("/visits")
    async def visit() -> dict[str, int]:
        count = await redis.incr(key)
        pipeline = redis.pipeline()
        pipeline.expire(key, 60)
        pipeline.get(key)
        _, seen = await pipeline.execute()
        return {"count": count, "seen": int(seen)}

    return app, service


def test_commands_and_pipelines_are_client_spans_inside_the_request_without_data(
    redis_url: str,
) -> None:
    app, service = _app(redis_url)
    spans = capture_spans(service)
    with TestClient(app) as client:
        assert client.post("/visits").json() == {"count": 1, "seen": 1}
        assert client.get("/health/readiness").json()["checks"]["redis"]["status"] == "ok"
        metrics = client.get("/metrics").text
    finished = spans.get_finished_spans()
    (server,) = [span for span in finished if span.name.startswith("POST")]
    commands = {
        span.name: span
        for span in finished
        if span.kind.name == "CLIENT" and span.context.trace_id == server.context.trace_id
    }
    assert set(commands) == {"INCRBY", "MULTI"}  # a pipeline is one round trip, one span
    assert "PING" not in {span.name for span in finished}  # readiness: measured, not traced
    for span in commands.values():
        assert span.parent is not None
        assert span.parent.span_id == server.context.span_id
        assert span.attributes is not None
        assert span.attributes["db.system.name"] == "redis"
        assert span.attributes["server.port"] == 6379
        assert not any("kiban-test" in str(value) for value in span.attributes.values())
    assert 'db_system_name="redis"' in metrics
    assert 'db_operation_name="INCRBY"' in metrics


def test_redis_down_is_503_and_readiness_503_and_the_span_says_why() -> None:
    app, service = _app(f"redis://127.0.0.1:{closed_port()}/0")
    spans = capture_spans(service)
    with TestClient(app) as client:
        answer = client.post("/visits")
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        readiness = client.get("/health/readiness")
        assert readiness.status_code == 503
        assert client.get("/health/liveness").status_code == 200
    (failed,) = [span for span in spans.get_finished_spans() if span.name == "INCRBY"]
    assert failed.status.status_code.name == "ERROR"
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "ConnectionError"


def test_a_stalled_redis_is_503_in_its_timeout_then_at_once(silent: Silent) -> None:
    """Fault drill: the app's Redis takes connections and never answers. Without a
    timeout (redis-py has none by default) every request waited for its handler's 30 s;
    then, each one would still wait ``REDIS_TIMEOUT``."""
    app = FastAPI()
    service = kiban.Service(app, Settings(redis_timeout=0.2), security=NoSecurity())
    redis = service.redis(f"redis://127.0.0.1:{silent.port}/0")

    @app.get("/cached")
    async def cached() -> str | None:
        value = await redis.get("kiban-test:cached")
        return None if value is None else value.decode()

    took = []
    with TestClient(app) as client:
        for _ in range(80):  # about 21 reach Redis while the breaker learns
            began = time.monotonic()
            answer = client.get("/cached")
            took.append(time.monotonic() - began)
            assert answer.status_code == 503
            assert answer.headers["content-type"] == "application/problem+json"
        assert client.get("/health/readiness").status_code == 503
    assert silent.connected.is_set()
    assert max(took) < 1  # each within its timeout (0.2 s), never the handler's 30 s
    assert sorted(took)[len(took) // 2] < 0.05  # most at once: not sent to a failing Redis


def test_an_answered_error_is_not_a_failing_redis(redis_url: str) -> None:
    """A command Redis refuses (a wrong type) is the app's error, answered at once: it
    does not make later commands fail fast."""
    from redis.exceptions import ResponseError

    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    redis = service.redis(redis_url)
    key = f"kiban-test:{uuid.uuid4().hex}"

    async def scenario() -> None:
        await redis.set(key, "text", ex=60)
        for _ in range(30):
            with pytest.raises(ResponseError):
                await redis.incr(key)
        assert await redis.get(key) == b"text"
        await redis.aclose()

    asyncio.run(scenario())


def test_no_url_is_a_config_error_that_says_so() -> None:
    service = kiban.Service(FastAPI(), Settings(), security=NoSecurity())
    with pytest.raises(ConfigError, match="REDIS_URL"):
        service.redis()
