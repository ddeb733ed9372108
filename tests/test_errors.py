"""Every error is RFC 9457 problem+json with the trace id; bugs never leak a traceback."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.testclient import TestClient

import kiban
from kiban._config import Settings
from kiban._errors import PROBLEM_JSON
from kiban.security import NoSecurity
from tests.conftest import Lines, closed_port


class Item(BaseModel):
    name: str
    price: int


def make_client() -> TestClient:
    app = FastAPI()
    kiban.Service(app, Settings(http_max_body_bytes=100), security=NoSecurity())

    @app.post("/items")
    async def create(item: Item) -> Item:
        return item

    @app.get("/items/{item_id}")
    async def get(item_id: int) -> dict[str, int]:
        if item_id == 0:
            raise kiban.Problem(
                404, "No item 0.", type="https://errors.example/not-found", item_id=item_id
            )
        if item_id == 1:
            raise HTTPException(409, "Taken.", headers={"x-hint": "retry"})
        return {"id": item_id}

    @app.get("/bug")
    async def bug() -> None:
        raise KeyError("internal-detail-xyz")

    @app.get("/db")
    async def db() -> None:
        engine = create_async_engine(
            f"postgresql+asyncpg://user:pw-secret@127.0.0.1:{closed_port()}/x"
        )
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return TestClient(app, raise_server_exceptions=False)


def assert_problem(response: object, status: int) -> dict[str, object]:
    from httpx import Response

    assert isinstance(response, Response)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["trace_id"] == response.headers["x-trace-id"]
    return body  # type: ignore[no-any-return]


def test_problem_raised_by_a_handler() -> None:
    body = assert_problem(make_client().get("/items/0"), 404)
    assert body["detail"] == "No item 0."
    assert body["type"] == "https://errors.example/not-found"
    assert body["item_id"] == 0


def test_http_exception_keeps_its_headers() -> None:
    response = make_client().get("/items/1")
    assert assert_problem(response, 409)["detail"] == "Taken."
    assert response.headers["x-hint"] == "retry"


def test_unknown_route_and_wrong_method() -> None:
    client = make_client()
    assert_problem(client.get("/nothing/here"), 404)
    response = client.delete("/items/3")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET"


def test_validation_errors_are_422_with_pointers() -> None:
    client = make_client()
    body = assert_problem(client.post("/items", json={"name": "pen", "price": "cheap"}), 422)
    assert body["errors"] == [
        {
            "detail": "Input should be a valid integer, unable to parse string as an integer",
            "pointer": "#/body/price",
        }
    ]
    body = assert_problem(client.get("/items/abc"), 422)
    assert body["errors"][0]["pointer"] == "#/path/item_id"  # type: ignore[index]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"\xff\xfe\xfa", "application/json"),
        (b'{"name": "x", "price": 1}', "text/plain"),
        (b"[" * 40 + b"]" * 40, "application/json"),
    ],
)
def test_malformed_bodies_are_client_errors(content: bytes, content_type: str) -> None:
    response = make_client().post("/items", content=content, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == PROBLEM_JSON


def test_body_over_the_limit_is_413_by_length_or_by_bytes_received() -> None:
    client = make_client()
    assert_problem(
        client.post("/items", content=b"x" * 101, headers={"content-type": "application/json"}), 413
    )

    def chunks() -> object:
        for _ in range(10):
            yield b"x" * 50

    assert_problem(
        client.post(
            "/items",
            content=chunks(),  # type: ignore[arg-type]
            headers={"content-type": "application/json"},
        ),
        413,
    )


def test_a_bug_is_a_bare_500_and_its_traceback_goes_to_the_log(lines: Lines) -> None:
    response = make_client().get("/bug")
    body = assert_problem(response, 500)
    assert set(body) == {"type", "title", "status", "trace_id"}
    assert "internal-detail-xyz" not in response.text
    (record,) = [line for line in lines.app() if line["msg"] == "unhandled exception"]
    assert record["level"] == "error"
    assert "KeyError: 'internal-detail-xyz'" in record["exception"]
    assert record["trace_id"] == response.headers["x-trace-id"]


def test_an_unreachable_database_is_503_not_500_and_hides_the_dsn(lines: Lines) -> None:
    response = make_client().get("/db")
    assert_problem(response, 503)
    assert "pw-secret" not in response.text
    assert "pw-secret" not in lines.text()


def test_a_dependency_that_is_down_is_not_a_log_line_per_request(lines: Lines) -> None:
    client = make_client()
    began = time.monotonic()
    for _ in range(40):
        assert_problem(client.get("/db"), 503)
    # Each request has its access line (503); the outage itself is said once a second.
    written = [line for line in lines.app() if line["msg"] == "dependency unavailable"]
    assert len(written) <= 1 + (time.monotonic() - began)
    assert len([line for line in lines.all() if line.get("status") == 503]) == 40


def test_405_lists_every_method_of_the_path_even_across_routes() -> None:
    app = FastAPI()
    kiban.Service(app, Settings(), security=NoSecurity())

    @app.get("/things")
    async def list_things() -> list[str]:
        return []

    @app.post("/things")
    async def add_thing() -> None:
        return None

    with TestClient(app) as client:
        response = client.delete("/things")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"


@pytest.mark.parametrize(
    "content",
    [
        b'{"name": "x", "price": ' + b"9" * 5000 + b"}",
        b'{"name": "x", "price": 1e999999}',
        b'{"name": "' + b"\\ud800" + b'", "price": 1}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"name": "\xc3\x28", "price": 1}',
    ],
)
def test_hostile_json_is_a_client_error_never_a_500(content: bytes) -> None:
    response = make_client().post(
        "/items", content=content[:100], headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    response = TestClient(_big_app(), raise_server_exceptions=False).post(
        "/items", content=content, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == PROBLEM_JSON


def _big_app() -> FastAPI:
    app = FastAPI()
    kiban.Service(app, Settings(), security=NoSecurity())

    @app.post("/items")
    async def create(item: Item) -> Item:
        return item

    return app
