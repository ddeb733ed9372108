"""Exactly one access line per request, in the fixed schema, whatever happened."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from starlette.testclient import TestClient

import kiban
from kiban._accesslog import FIELDS
from kiban._config import Settings
from kiban._redact import REDACTED, redact_query
from kiban.security import NoSecurity
from tests.conftest import Lines, chassis_around


def make_app() -> FastAPI:
    app = FastAPI()
    kiban.Service(
        app,
        Settings(service_name="shop", http_max_body_bytes=1024, trusted_proxies=["10.0.0.0/8"]),
        security=NoSecurity(),
    )

    @app.post("/items/{item_id}")
    async def create(item_id: int, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": item_id, **body}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    return app


def test_one_line_per_request_with_every_field_in_order(lines: Lines) -> None:
    with TestClient(make_app(), client=("10.0.0.3", 50000)) as client:  # a trusted gateway
        response = client.post(
            "/items/7?color=red",
            content=b'{"name":"pen"}',  # these bytes, whatever httpx's JSON spacing
            headers={
                "content-type": "application/json",
                "x-uid": "u-1",
                "x-api-client": "web",
                "user-agent": "ua/1",
                "x-forwarded-for": "203.0.113.9",
            },
        )
    (line,) = lines.access()
    assert tuple(line) == FIELDS
    assert line["log"] == "access"
    assert line["service"] == "shop"
    assert line["method"] == "POST"
    assert line["host"] == "testserver"
    assert line["path"] == "/items/7"
    assert line["query"] == "color=red"
    assert line["route"] == "/items/{item_id}"
    assert line["status"] == 200
    assert line["request_bytes"] == len(b'{"name":"pen"}')
    assert line["response_bytes"] == len(response.content)
    assert 0 < line["latency_s"] < 5
    assert line["user_agent"] == "ua/1"
    assert line["forwarded_for"] == "203.0.113.9"
    assert line["remote_addr"] == "10.0.0.3"
    assert line["trace_id"] == response.headers["x-trace-id"]
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["uid"] == "u-1"
    assert line["api_client"] == "web"
    # RFC 3339 with microseconds, in UTC
    assert len(line["time"]) == len("2026-01-01T00:00:00.000000Z")
    assert line["time"][-1] == "Z"


def test_errors_are_logged_too_with_the_same_schema(lines: Lines) -> None:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        client.get("/nowhere")
        client.get("/boom")
        client.post("/items/x", json={})
        client.post("/items/1", content=b"x" * 2048, headers={"content-type": "application/json"})
    statuses = [line["status"] for line in lines.access()]
    assert statuses == [404, 500, 422, 413]
    assert all(tuple(line) == FIELDS for line in lines.access())


def test_query_secrets_are_redacted(lines: Lines) -> None:
    with TestClient(make_app()) as client:
        client.get("/nowhere?access_token=abc123&API_KEY=k9&password=pw&q=shoes&code=c0de")
    (line,) = lines.access()
    assert line["query"] == (
        f"access_token={REDACTED}&API_KEY={REDACTED}&password={REDACTED}&q=shoes&code={REDACTED}"
    )
    for secret in ("abc123", "k9", "=pw", "c0de"):
        assert secret not in lines.text()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "token",
                    "id_token",
                    "client_secret",
                    "Password",
                    "x_api_key",
                    "Cookie",
                    "auth_credential",
                ]
            ),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=6),
        )
    )
)
def test_secret_values_never_survive_redaction(pairs: list[tuple[str, str]]) -> None:
    query = "&".join(f"{key}={value}" for key, value in pairs)
    redacted = redact_query(query)
    for _, value in pairs:
        assert f"={value}" not in redacted


def test_client_disconnect_before_response_is_logged_as_499(lines: Lines) -> None:
    """A client that goes away is still one line, with nginx's 499."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "http.disconnect"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent to a gone client")

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/slow",
        "query_string": b"",
        "headers": [(b"host", b"svc")],
        "client": ("192.0.2.1", 1234),
    }
    service = kiban.Service(FastAPI(), Settings(service_name="svc"), security=NoSecurity())
    asyncio.run(chassis_around(app, service)(scope, receive, send))
    (line,) = lines.access()
    assert line["status"] == 499
    assert line["host"] == "svc"


def test_health_probes_and_every_request_log_once_even_with_two_routers(lines: Lines) -> None:
    """The chain is installed once: a second Service on the same app is refused."""
    app = make_app()
    try:
        kiban.Service(app, Settings(), security=NoSecurity())
    except RuntimeError:
        pass
    else:
        raise AssertionError("a second Service must be refused")
    with TestClient(app) as client:
        for _ in range(3):
            client.get("/health/liveness")
    assert len(lines.access()) == 3


def test_the_access_log_can_be_turned_off(lines: Lines) -> None:
    app = FastAPI()
    kiban.Service(app, Settings(access_log=False), security=NoSecurity())
    with TestClient(app) as client:
        assert client.get("/health/liveness").status_code == 200
    assert lines.access() == []
