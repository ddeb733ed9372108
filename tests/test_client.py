"""The outgoing client carries the request context to the next service, and only there."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

import kiban
from kiban import _client as kiban_client
from kiban._config import Settings
from kiban.security import NoSecurity
from tests.conftest import closed_port

pytestmark = pytest.mark.process

ECHO = "tests.apps.echo:app"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


#: The test client's address: a gateway in the trusted network, or anyone.
GATEWAY = ("10.0.0.3", 5000)
STRANGER = ("198.51.100.4", 5000)


@pytest.fixture
def echo(spawn: Any) -> Any:
    """The next service: it trusts its callers on loopback, as a mesh would."""
    return spawn(ECHO, TRUSTED_PROXIES="127.0.0.1")


def caller(upstream: str, peer: tuple[str, int] = GATEWAY, **settings: Any) -> TestClient:
    """A kiban service behind a gateway in 10.0.0.0/8, whose handler calls ``upstream``
    and returns what it saw; ``peer`` is who calls it."""
    app = FastAPI()
    settings.setdefault("trusted_proxies", ["10.0.0.0/8"])
    service = kiban.Service(app, Settings(**settings), security=NoSecurity())
    http = service.http_client(upstream)

    @app.get("/call/{path:path}")
    async def call(path: str, request: Request) -> Any:
        response = await http.get(
            f"/{path}", params=dict(request.query_params), headers={"x-uid": "forged"}
        )
        return (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {"status": response.status_code, "text": response.text}
        )

    return TestClient(app, client=peer)


def test_every_context_header_is_forwarded_and_xff_grows_by_one_hop(echo: Any) -> None:
    with caller(echo.url) as client:
        seen = client.get(
            "/call/headers",
            headers={
                "x-trace-id": TRACE,
                "x-uid": "u-42",
                "user-agent": "Mobile/7",
                "x-user-ip": "203.0.113.7",
                "x-forwarded-for": "203.0.113.7, 10.0.0.1",
                "x-api-client": "ios",
                "x-internal-id-token": "id.token.value",
            },
        ).json()
    assert seen["x-trace-id"] == TRACE
    assert seen["traceparent"].split("-")[1] == TRACE
    assert seen["x-uid"] == "u-42"  # the context's, not the value the handler tried to set
    assert seen["x-forwarded-user-agent"] == "Mobile/7"
    assert seen["x-user-ip"] == "203.0.113.7"
    assert seen["x-forwarded-for"] == "203.0.113.7, 10.0.0.1, 10.0.0.3"
    assert seen["x-api-client"] == "ios"
    assert seen["x-internal-id-token"] == "id.token.value"


def test_the_downstream_access_line_carries_the_same_context(echo: Any) -> None:
    with caller(echo.url) as client:
        client.get("/call/headers", headers={"x-trace-id": TRACE, "x-uid": "u-1"})
    echo.stop()
    line = next(line for line in echo.lines() if line.get("path") == "/headers")
    assert line["trace_id"] == TRACE
    assert line["uid"] == "u-1"
    assert line["forwarded_for"] == "10.0.0.3"


def test_an_untrusted_callers_claims_are_not_forwarded(echo: Any) -> None:
    with caller(echo.url, peer=STRANGER) as client:
        seen = client.get(
            "/call/headers",
            headers={
                "x-trace-id": TRACE,
                "x-uid": "admin",
                "x-forwarded-user-agent": "Forged/1",
                "user-agent": "curl/8",
                "x-user-ip": "10.0.0.1",
                "x-forwarded-for": "10.0.0.1",
                "x-api-client": "partner",
                "x-internal-id-token": "id.token.value",
            },
        ).json()
    assert seen["x-trace-id"] != TRACE
    assert seen["x-forwarded-for"] == "198.51.100.4"  # the chain starts at the stranger
    assert seen["x-user-ip"] == "198.51.100.4"
    assert seen["x-forwarded-user-agent"] == "curl/8"
    for name in ("x-uid", "x-api-client", "x-internal-id-token"):
        assert name not in seen


def test_third_party_hosts_get_no_user_headers_and_no_token(echo: Any) -> None:
    with caller(echo.url, internal_hosts=frozenset({"*.internal"})) as client:
        seen = client.get(
            "/call/headers",
            headers={"x-uid": "u-42", "x-internal-id-token": "id.token.value", "x-trace-id": TRACE},
        ).json()
    for name in (
        "x-uid",
        "x-internal-id-token",
        "x-trace-id",
        "traceparent",
        "x-forwarded-for",
        "x-user-ip",
    ):
        assert name not in seen


async def test_outside_a_request_no_user_headers_are_sent_not_even_stale_ones(
    echo: Any,
) -> None:
    async with kiban_client.create(Settings(), base_url=echo.url) as http:
        seen = (await http.get("/headers", headers={"x-uid": "stale", "x-trace-id": TRACE})).json()
    assert "x-uid" not in seen
    assert "x-trace-id" not in seen
    assert "x-internal-id-token" not in seen


async def test_idempotent_calls_are_retried_on_503_and_others_are_not(echo: Any) -> None:
    async with kiban_client.create(Settings(), base_url=echo.url, retries=2) as http:
        response = await http.get("/flaky/get", params={"failures": 2})
        assert response.status_code == 200
        assert response.text == "3"
        response = await http.post("/flaky/post", params={"failures": 2})
        assert response.status_code == 503
        assert (await http.get("/attempts/post")).json() == 1
        response = await http.get("/flaky/bounded", params={"failures": 10})
        assert response.status_code == 503
        assert (await http.get("/attempts/bounded")).json() == 3


async def test_connection_failures_are_retried_a_bounded_number_of_times() -> None:
    settings = Settings(client_connect_timeout=0.5)
    started = time.monotonic()
    async with kiban_client.create(settings, base_url=f"http://127.0.0.1:{closed_port()}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.post("/anything")
    assert time.monotonic() - started < 2


def test_a_slow_downstream_is_cut_by_the_read_timeout_and_answered_504(echo: Any) -> None:
    with caller(echo.url, client_read_timeout=0.3) as client:
        started = time.monotonic()
        response = client.get("/call/sleep?seconds=3")
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert time.monotonic() - started < 2


def test_a_downstream_that_is_down_is_answered_503() -> None:
    with caller(f"http://127.0.0.1:{closed_port()}") as client:
        response = client.get("/call/headers")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_client_is_closed_on_shutdown() -> None:
    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    http = service.http_client("http://127.0.0.1:1")
    await service.aclose()
    assert http.is_closed
    await asyncio.sleep(0)


def test_unsafe_inbound_values_are_never_forwarded(echo: Any) -> None:
    with caller(echo.url) as client:
        seen = client.get(
            "/call/headers",
            headers={
                "x-uid": "u" * 600,
                "x-user-ip": "1.2.3.4 <script>",
                "x-forwarded-for": "1.2.3.4, not an address",
                "x-api-client": "a\x7fb",
            },
        ).json()
    assert "x-uid" not in seen
    assert seen["x-user-ip"] == "10.0.0.3"  # the peer, not the unsafe claim
    assert seen["x-forwarded-for"] == "10.0.0.3"
    assert "x-api-client" not in seen


def test_a_non_ascii_header_value_never_fails_the_call(echo: Any) -> None:
    """``User-Agent: café`` (UTF-8 bytes) went downstream as sent, instead of a 500."""
    with caller(echo.url) as client:
        response = client.get("/call/headers", headers={"user-agent": "café/1".encode()})
    assert response.status_code == 200
    seen = response.json()
    assert seen["x-forwarded-user-agent"] == "caf%C3%A9/1"  # its bytes, escaped


async def test_a_subject_past_latin_1_is_sent_escaped_not_raised(echo: Any) -> None:
    from kiban import _propagation as propagation

    token = propagation.enter(propagation.RequestContext("a" * 32, "r-1", uid="ユーザー"))
    try:
        async with kiban_client.create(Settings(), base_url=echo.url) as http:
            seen = (await http.get("/headers")).json()
    finally:
        propagation.leave(token)
    assert seen["x-uid"] == "%E3%83%A6%E3%83%BC%E3%82%B6%E3%83%BC"
    assert seen["x-trace-id"] == "a" * 32


BUDGET = "x-request-timeout-ms"


def test_a_budget_from_the_edge_arrives_downstream_smaller(echo: Any) -> None:
    with caller(echo.url) as client:
        seen = client.get("/call/headers", headers={BUDGET: "2000"}).json()
    assert 0 < int(seen[BUDGET]) < 2000


def test_an_untrusted_callers_budget_is_not_believed(echo: Any) -> None:
    with caller(echo.url, peer=STRANGER) as client:
        seen = client.get("/call/headers", headers={BUDGET: "1"}).json()
    assert BUDGET not in seen


def test_no_budget_left_makes_no_call_and_a_504(echo: Any) -> None:
    with caller(echo.url) as client:
        response = client.get("/call/flaky/spent", params={"failures": 0}, headers={BUDGET: "0"})
    assert response.status_code == 504
    assert httpx.get(f"{echo.url}/attempts/spent").json() == 0  # no call was made


def test_a_slow_downstream_is_cut_at_the_callers_budget_not_the_read_timeout(echo: Any) -> None:
    with caller(echo.url) as client:  # CLIENT_READ_TIMEOUT: 5 s
        started = time.monotonic()
        response = client.get("/call/sleep?seconds=3", headers={BUDGET: "400"})
    assert time.monotonic() - started < 1.5
    # The callee, told what was left, gives up first (its own 504), or the caller's
    # read timeout, set to the budget, does.
    assert response.status_code == 504 or response.json()["status"] == 504


async def test_retries_stay_within_a_tenth_of_the_calls(echo: Any) -> None:
    """A downstream that fails every call gets its load and a bounded extra, not 3x."""
    async with kiban_client.create(Settings(), base_url=echo.url, retries=2) as http:
        for number in range(100):
            with contextlib.suppress(kiban_client.CircuitOpen):  # the breaker, later on
                response = await http.get(f"/flaky/down-{number}", params={"failures": 1000})
                assert response.status_code == 503
    async with httpx.AsyncClient(base_url=echo.url) as plain:
        attempts = [(await plain.get(f"/attempts/down-{n}")).json() for n in range(100)]
    made = sum(1 for count in attempts if count)
    # The reserve (10) and a tenth of the calls made (10) in retries, at most.
    assert sum(attempts) - made <= 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_refuses_nothing_while_the_downstream_is_healthy() -> None:
    breaker = kiban_client.Breaker(clock=Clock(), chance=lambda: 0.0)
    for _ in range(1000):
        breaker.record(True)
    assert breaker.drop_probability() == 0.0
    assert breaker.allow()
    few = kiban_client.Breaker(clock=Clock())
    for accepted in (True, False, False, False):  # a handful of failures trips nothing
        few.record(accepted)
    assert few.drop_probability() == 0.0


def test_the_breaker_fails_fast_when_down_and_lets_calls_through_as_it_recovers() -> None:
    clock = Clock()
    breaker = kiban_client.Breaker(clock=clock, chance=lambda: 0.5)
    for _ in range(100):
        breaker.record(False)
    assert breaker.drop_probability() > 0.9
    assert not breaker.allow()
    clock.now += 11  # the window has moved past the failures
    assert breaker.drop_probability() == 0.0
    assert breaker.allow()
    for _ in range(10):  # some failures among successes: still mostly let through
        breaker.record(True)
    breaker.record(False)
    assert breaker.drop_probability() == 0.0


async def test_calls_to_a_failing_downstream_fail_fast_instead_of_piling_on(echo: Any) -> None:
    async with kiban_client.create(Settings(), base_url=echo.url, retries=0) as http:
        refused = 0
        for _ in range(200):
            try:
                response = await http.get("/flaky/failing", params={"failures": 10**6})
            except kiban_client.CircuitOpen:
                refused += 1
            else:
                assert response.status_code == 503
    async with httpx.AsyncClient(base_url=echo.url) as plain:
        attempts = (await plain.get("/attempts/failing")).json()
    assert refused > 100  # most calls were not made at all
    assert attempts + refused == 200
