"""Timeouts on every phase and the in-flight cap: a slow client or handler holds nothing.

In process (httpx's ASGI transport) where the chassis alone decides; a real ``kiban
run`` process where the server's sockets are the point (a client that stops reading).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import kiban
from kiban import NoTimeout, Timeout
from kiban.security import NoSecurity
from tests.conftest import Lines, asgi_scope


def _app(**settings: Any) -> tuple[FastAPI, dict[str, asyncio.Event]]:
    app = FastAPI()
    kiban.Service(app, kiban.Settings(**settings), security=NoSecurity())
    events = {name: asyncio.Event() for name in ("released", "entered", "go")}

    @app.get("/forever", dependencies=[Timeout(0.2)])
    async def forever() -> None:
        try:
            events["entered"].set()
            await events["go"].wait()
        finally:
            events["released"].set()  # what a handler's session or pool slot would be

    @app.get("/default")
    async def default() -> None:
        await events["go"].wait()

    @app.get("/patient", dependencies=[NoTimeout()])
    async def patient(seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @app.post("/upload")
    async def upload(body: dict[str, Any]) -> dict[str, int]:
        return {"keys": len(body)}

    return app, events


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_a_handler_past_its_route_timeout_is_cancelled_and_answered_504() -> None:
    app, events = _app()
    async with _client(app) as client:
        began = time.monotonic()
        response = await client.get("/forever")
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert "0.2 s" in response.json()["detail"]
    assert time.monotonic() - began < 2
    assert events["released"].is_set()  # cancelled: its finally ran, its resources freed


async def test_the_api_default_applies_and_no_timeout_lifts_it() -> None:
    app, _ = _app(http_handler_timeout=0.2)
    async with _client(app) as client:
        assert (await client.get("/default")).status_code == 504
        patient = await client.get("/patient", params={"seconds": 0.4})
    assert patient.status_code == 200


async def test_no_default_timeout_with_zero() -> None:
    app, events = _app(http_handler_timeout=0)
    async with _client(app) as client:
        waiting = asyncio.ensure_future(client.get("/default"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        events["go"].set()
        assert (await waiting).status_code == 200


async def test_a_handlers_own_timeout_error_is_not_a_504() -> None:
    app, _ = _app()

    @app.get("/own")
    async def own() -> None:
        raise TimeoutError("the handler's own")

    async with _client(app) as client:
        assert (await client.get("/own")).status_code == 500


async def test_at_the_inflight_cap_new_requests_get_503_and_probes_pass() -> None:
    app, events = _app(http_max_inflight=1, http_handler_timeout=0)
    async with _client(app) as client:
        first = asyncio.ensure_future(client.get("/default"))
        await asyncio.sleep(0.05)
        shed = await client.get("/patient", params={"seconds": 0})
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.headers["content-type"] == "application/problem+json"
        assert (await client.get("/health/liveness")).status_code == 200
        events["go"].set()
        assert (await first).status_code == 200
        assert (await client.get("/patient", params={"seconds": 0})).status_code == 200
        # Refusals are counted by reason on /metrics.
        metrics = (await client.get("/metrics")).text
        assert re.search(r'^kiban_shed_total\{[^}]*reason="inflight"[^}]*\} 1\.0$', metrics, re.M)


async def test_the_504_goes_out_at_the_deadline_while_a_slow_cleanup_runs(lines: Lines) -> None:
    from kiban.security import APIKey, Principal, Security

    async def partner(key: str) -> Principal | None:
        return Principal("api_key", "partner") if key == "partner-key" else None

    app = FastAPI()
    kiban.Service(app, kiban.Settings(), security=Security(APIKey(partner)))
    cleaned = asyncio.Event()

    @app.get("/stuck", dependencies=[Timeout(0.2)])
    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(1.0)  # a rollback on a database that has gone slow
            cleaned.set()

    sent: list[tuple[float, dict[str, Any]]] = []
    began = time.monotonic()

    async def send(message: dict[str, Any]) -> None:
        sent.append((time.monotonic() - began, message))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = asgi_scope("/stuck", [(b"host", b"test"), (b"x-api-key", b"partner-key")])
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    (answered, start), (_, body) = sent  # the 504, whole, and nothing the app sent after
    assert start["status"] == 504
    assert not body.get("more_body", False)
    assert answered < 0.6  # at the deadline, not after the second of cleanup
    assert cleaned.is_set()  # the cleanup ran to its end all the same
    (line,) = [line for line in lines.access() if line["path"] == "/stuck"]
    assert (line["status"], line["interrupted"]) == (504, "timeout")
    assert line["api_client"] == "partner"  # the identity the request proved, kept
    assert line["latency_s"] < 0.6  # when it was answered, not when its cleanup ended


async def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    app, _ = _app(http_read_body_timeout=0.2)
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": b'{"a": ', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop()
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"test"), (b"content-type", b"application/json")]
    scope = asgi_scope("/upload", headers, method="POST")
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    start = sent[0]
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert (b"content-type", b"application/problem+json") in start["headers"]


@pytest.mark.process
def test_a_client_that_stops_reading_is_disconnected_while_others_are_served(
    spawn: Any,
) -> None:
    service = spawn("tests.apps.hello:app", HTTP_WRITE_TIMEOUT="1")
    host, port = service.url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /big?mb=64 HTTP/1.1\r\nhost: x\r\n\r\n")
    time.sleep(0.5)
    assert httpx.get(f"{service.url}/hello/ada").status_code == 200  # others are served
    # The request ends about HTTP_WRITE_TIMEOUT after the client stopped reading: its
    # access line says so. (What the kernel had buffered still trickles to the stalled
    # socket after the close, at the pace of its tiny window: not read here.)
    deadline = time.monotonic() + 10
    while not (big := [line for line in service.lines() if line.get("path") == "/big"]):
        assert time.monotonic() < deadline, "the stalled request never ended"
        time.sleep(0.1)
    stalled.close()
    assert big[0]["latency_s"] < 3
    assert big[0]["response_bytes"] < 64 * 1024 * 1024  # cut short, not served in full
    lines = service.lines()
    assert any(
        line.get("msg") == "client did not read the response in time, closing" for line in lines
    )
