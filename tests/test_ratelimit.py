"""Rate limits per key: exact, shared through Redis across replicas, explicit when Redis fails."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any
from unittest.mock import patch

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.testclient import TestClient

import kiban
from kiban._breaker import Breaker
from kiban._config import Settings, parse_rate
from kiban._ratelimit import Limiter, LocalCounter, RateLimit
from kiban.security import JWT, NoSecurity, RateLimited, Security
from tests.conftest import DEV_KEYS, Lines, Silent, closed_port, token

AUTH = (DEV_KEYS / "auth-dev.pub.pem").read_bytes()
scheme = JWT(algorithms=["EdDSA"], key=AUTH, issuer="kiban-dev-auth")


def user(subject: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token('jwt', subject)}"}


def make_app(limit: str = "3/minute", **settings: Any) -> FastAPI:
    app = FastAPI()
    kiban.Service(
        app,
        Settings(**settings),
        security=Security(scheme),
        rate_limit=RateLimit(limit, name=f"test-{uuid.uuid4().hex}"),
    )

    @app.get("/items")
    async def items() -> dict[str, str]:
        return {}

    @app.get("/search", dependencies=[NoSecurity(), RateLimited("2/minute", key="ip")])
    async def search() -> dict[str, str]:
        return {}

    return app


@pytest.mark.usefixtures("still_clock")
def test_the_limit_is_exact_and_the_headers_agree() -> None:
    with TestClient(make_app()) as client:
        alice = user("alice")
        remaining = []
        for _ in range(3):
            response = client.get("/items", headers=alice)
            assert response.status_code == 200
            assert response.headers["ratelimit-limit"] == "3"
            remaining.append(int(response.headers["ratelimit-remaining"]))
        assert remaining == [2, 1, 0]
        refused = client.get("/items", headers=alice)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == refused.headers["ratelimit-reset"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # Another subject has its own budget.
        assert client.get("/items", headers=user("bob")).status_code == 200


@pytest.mark.usefixtures("still_clock")
def test_a_route_level_limit_replaces_the_api_one_and_keys_by_ip() -> None:
    with TestClient(make_app(limit="100/minute")) as client:
        statuses = [client.get("/search").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert client.get("/items", headers=user("carol")).status_code == 200
        metrics = client.get("/metrics").text
    assert 'kiban_ratelimit_rejected_total{http_route="/search"' in metrics


@pytest.mark.integration
async def test_two_replicas_sharing_redis_admit_exactly_the_limit(
    redis_url: str, lines: Lines
) -> None:
    name = f"shared-{uuid.uuid4().hex}"
    replicas = []
    for _ in range(2):
        app = FastAPI()
        kiban.Service(
            app,
            # What is asserted is the shared count, not the timeout (the Redis-down tests
            # hold that): a loaded host must not turn a slow answer into a fail-open pass.
            Settings(redis_url=redis_url, ratelimit_timeout=5.0),
            security=Security(scheme),
            rate_limit=RateLimit("10/minute", name=name),
        )

        @app.get("/items")
        async def items() -> dict[str, str]:
            return {}

        replicas.append(app)
    headers = user(f"dave-{uuid.uuid4().hex}")
    # The shared (Redis) counter is a sliding window that rounds the previous window's
    # share down: a burst that straddles a window's end may be admitted once more. Start
    # the burst clear of the minute's end so that exactly the limit is what is asserted.
    left = 60 - time.time() % 60
    if left < 2:
        await asyncio.sleep(left + 0.1)
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica")
        for app in replicas
    ]
    try:
        responses = await asyncio.gather(
            *(clients[i % 2].get("/items", headers=headers) for i in range(40))
        )
    finally:
        for client in clients:
            await client.aclose()
    statuses = [response.status_code for response in responses]
    assert not [line for line in lines.app() if line["msg"] == "rate limit storage unavailable"]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 30


@pytest.mark.integration
def test_redis_down_fails_open_with_a_log_line_and_a_metric(lines: Lines) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    with TestClient(make_app(limit="1/minute", redis_url=url)) as client:
        statuses = [client.get("/items", headers=user("erin")).status_code for _ in range(3)]
        metrics = client.get("/metrics").text
    assert statuses == [200, 200, 200]
    # Each request's two checks (the API's limit, the authentication throttle) failed:
    # all six are counted, and logged in one line (at most one a second).
    (failures,) = [line for line in lines.app() if line["msg"] == "rate limit storage unavailable"]
    assert failures["occurrences"] == 1
    errors = next(
        line
        for line in metrics.splitlines()
        if line.startswith("kiban_ratelimit_storage_errors_total")
    )
    assert errors.endswith(" 6.0")


async def test_a_redis_that_stops_answering_costs_a_few_checks_their_timeout(
    silent: Silent,
) -> None:
    """A Redis that accepts connections and never answers (stalled, or its network
    partitioned): every check used to wait its timeout, twice per request."""
    url = f"redis://127.0.0.1:{silent.port}/0"
    limiter = Limiter(url, timeout=0.05, breaker=Breaker(chance=lambda: 0.5))
    rate = RateLimit("10/second")
    took = []
    try:
        for _ in range(60):
            began = time.monotonic()
            assert await limiter.hit(rate, "erin") is None  # fails open
            took.append(time.monotonic() - began)
    finally:
        await limiter.aclose()
    waited = [seconds for seconds in took if seconds >= 0.04]
    assert len(waited) == 12  # until failures outweigh the breaker's protection
    assert sum(took[12:]) < 0.05  # then no check waits on it


@pytest.mark.process
def test_a_stalled_redis_does_not_slow_every_request(spawn: Any, silent: Silent) -> None:
    service = spawn(
        "tests.apps.guarded:app",
        REDIS_URL=f"redis://127.0.0.1:{silent.port}/0",
        RATELIMIT_TIMEOUT="0.1",
    )
    took = []
    with httpx.Client(base_url=service.url, timeout=10) as client:
        # The breaker lets a share of calls through while it learns (about 27 of
        # these 200): enough requests that the median says what the rest do.
        for _ in range(100):
            began = time.monotonic()
            response = client.get("/items", headers={"x-api-key": "good-key"})
            took.append(time.monotonic() - began)
            assert response.status_code == 200  # fails open
    service.stop()
    # Before, every request waited both its checks' timeouts (0.2 s here, 0.5 s by default).
    assert sorted(took)[len(took) // 2] < 0.05
    logged = [
        line for line in service.lines() if line.get("msg") == "rate limit storage unavailable"
    ]
    assert 1 <= len(logged) <= 1 + sum(took)  # at most one line a second


@pytest.mark.integration
def test_redis_down_can_fail_closed_with_503() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    app = make_app(limit="1/minute", redis_url=url, ratelimit_fail_open=False)
    with TestClient(app) as client:
        response = client.get("/items", headers=user("frank"))
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.usefixtures("still_clock")
def test_probes_and_scrapes_are_never_rate_limited() -> None:
    with TestClient(make_app(limit="1/minute")) as client:
        for path in ("/health/liveness", "/health/readiness", "/metrics"):
            assert {client.get(path).status_code for _ in range(5)} == {200}


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=3, allow_nan=False), min_size=1, max_size=40),
    limit=st.sampled_from(["1/second", "3/second", "4/2 seconds", "5/minute"]),
)
def test_the_in_memory_counter_decides_as_limits_memory_storage(
    gaps: list[float], limit: str
) -> None:
    """Same allowed/remaining/reset as limits' own sliding window counter, hit for hit."""
    rate = RateLimit(limit)
    local = LocalCounter()
    reference = SlidingWindowCounterRateLimiter(MemoryStorage())
    # From the real time on: limits' storage also expires keys by the real clock.
    now = time.time()
    for gap in gaps:
        now += gap
        with patch("time.time", return_value=now):
            allowed = reference.hit(rate.item, rate.name, "k")
            reset_at, remaining = reference.get_window_stats(rate.item, rate.name, "k")
        decision = local.hit(rate, "k", now)
        assert (decision.allowed, decision.remaining) == (allowed, max(0, remaining))
        assert abs(decision.reset_seconds - max(1, math.ceil(reset_at - now))) <= 1


def test_the_in_memory_counter_forgets_keys_whose_windows_have_passed() -> None:
    rate = RateLimit("2/second")
    local = LocalCounter()
    local.sweep_every = 3
    local.hit(rate, "a", 100.0)
    local.hit(rate, "b", 100.1)
    assert len(local.windows) == 2
    local.hit(rate, "c", 103.0)  # the third hit sweeps: a and b are two windows behind
    assert set(key for _, key in local.windows) == {"c"}


@given(
    amount=st.integers(1, 10**6),
    multiples=st.one_of(st.none(), st.integers(1, 1000)),
    unit=st.sampled_from(["second", "minute", "hour", "day", "month", "year"]),
    plural=st.booleans(),
    separator=st.sampled_from(["/", " / ", " per ", "per"]),
    upper=st.booleans(),
)
def test_kibans_rate_notation_is_the_limits_librarys(
    amount: int, multiples: int | None, unit: str, plural: bool, separator: str, upper: bool
) -> None:
    """The in-memory limiter parses rates itself; the Redis one hands them to ``limits``."""
    import limits

    text = f"{amount}{separator}{multiples or ''} {unit}{'s' if plural else ''}"
    text = text.upper() if upper else text
    item = limits.parse(text)
    assert parse_rate(text) == (item.amount, item.get_expiry())


@pytest.mark.parametrize("text", ["", "ten/second", "10/fortnight", "0/second", "10/0 minutes"])
def test_a_rate_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


def test_a_redis_rate_limit_check_is_a_client_span_inside_the_request(redis_url: str) -> None:
    from opentelemetry.trace import SpanKind

    from kiban.testing import capture_spans

    app = make_app(redis_url=redis_url, ratelimit_timeout=5.0)
    spans = capture_spans(kiban.Service.of(app))
    with TestClient(app) as client:
        assert client.get("/items", headers=user("alice")).status_code == 200
    finished = spans.get_finished_spans()
    server = next(span for span in finished if span.kind == SpanKind.SERVER)
    check = next(span for span in finished if span.name == "ratelimit hit")
    assert check.kind == SpanKind.CLIENT
    assert check.attributes["db.system.name"] == "redis"
    assert check.parent is not None
    assert check.parent.span_id == server.context.span_id
