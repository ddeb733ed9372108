"""kiban.Service and the public API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

import kiban
from kiban._config import Settings
from kiban.security import NoSecurity
from tests.conftest import ROOT, Lines


def test_the_readme_example_runs(lines: Lines, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## A service in ten lines\s+```python\n(.*?)```", readme, re.S)
    assert code is not None
    assert len(code.group(1).strip().splitlines()) <= 14
    namespace: dict[str, object] = {}
    import os

    os.environ["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/readme.db"
    try:
        exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102
    finally:
        del os.environ["DATABASE_URL"]
    with TestClient(namespace["app"]) as client:  # type: ignore[arg-type]
        assert client.get("/hello/ada").json() == {"hello": "ada"}
        assert client.get("/health/readiness").json()["checks"]["database"]["status"] == "ok"
    greeting = next(line for line in lines.app() if line.get("msg") == "greeting")
    assert greeting["trace_id"] == lines.access()[0]["trace_id"]


def test_fastapis_own_body_limit_still_holds_under_kiban() -> None:
    """kiban is an ordinary middleware: FastAPI's own layers around it keep working."""
    import inspect

    if "max_body_size" not in inspect.signature(FastAPI).parameters:
        pytest.skip("this FastAPI release has no max_body_size of its own")
    app = FastAPI(max_body_size=16)
    kiban.Service(app, Settings(), security=NoSecurity())

    @app.post("/echo")
    async def echo(body: dict[str, str]) -> dict[str, str]:
        return body

    with TestClient(app) as client:
        assert client.post("/echo", json={"a": "b"}).status_code == 200
        refused = client.post("/echo", json={"text": "x" * 64})
    assert refused.status_code == 413


def test_unhandled_errors_are_problems_whatever_fastapis_body_limit() -> None:
    for limit in (None, 1024):
        app = FastAPI(max_body_size=limit)
        kiban.Service(app, Settings(), security=NoSecurity())

        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError("bug")

        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.get("/boom")
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["trace_id"] == response.headers["x-trace-id"]


def test_a_users_exception_handler_for_exception_answers_bugs(lines: Lines) -> None:
    """``@app.exception_handler(Exception)`` answers a bug, as in any Starlette app;
    kiban still logs it with its traceback and counts it in the access line."""
    app = FastAPI()
    kiban.Service(app, Settings(), security=NoSecurity())

    @app.exception_handler(Exception)
    async def mine(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"oops": str(exc)}, status_code=500)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.json() == {"oops": "bug"}
    assert response.headers["x-trace-id"]  # kiban's headers on the user's answer
    assert [line["status"] for line in lines.access()] == [500]
    assert any(line.get("msg") == "unhandled exception" for line in lines.app())


def test_a_users_handlers_for_other_exceptions_and_http_errors_are_kept() -> None:
    """Handlers the app registered before kiban are not replaced by kiban's problems."""
    app = FastAPI()

    @app.exception_handler(HTTPException)
    async def mine(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("mine", status_code=418)

    @app.exception_handler(KeyError)
    async def missing(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("no such key", status_code=404)

    kiban.Service(app, Settings(), security=NoSecurity())

    @app.get("/key")
    async def key() -> None:
        raise KeyError("k")

    with TestClient(app) as client:
        assert client.get("/nowhere").text == "mine"
        assert client.get("/key").text == "no such key"


def test_a_users_middleware_and_lifespan_run_with_kibans(lines: Lines) -> None:
    """The app's own lifespan runs inside kiban's start-up and cleanups; middleware
    added before or after kiban sees every request, in the request context."""
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, str]]:
        events.append("app start")
        yield {"greeting": "hi"}
        events.append("app stop")

    app = FastAPI(lifespan=lifespan)

    class Tagging:
        def __init__(self, app: ASGIApp, tag: str) -> None:
            self.app = app
            self.tag = tag

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                context = kiban._propagation.current()
                events.append(f"{self.tag} {context.trace_id if context else None}")
            await self.app(scope, receive, send)

    app.add_middleware(Tagging, tag="inner")
    service = kiban.Service(app, Settings(), security=NoSecurity())
    app.add_middleware(Tagging, tag="outer")

    async def cleanup() -> None:
        events.append("kiban cleanup")

    service.on_shutdown(cleanup)

    @app.get("/hi")
    async def hi(request: Request) -> dict[str, str]:
        return {"said": request.state.greeting}

    with TestClient(app) as client:
        response = client.get("/hi")
    assert response.json() == {"said": "hi"}
    trace_id = response.headers["x-trace-id"]
    assert events == [
        "app start",
        "outer None",  # outside kiban: no request context yet
        f"inner {trace_id}",
        "app stop",
        "kiban cleanup",
    ]
    assert [line["msg"] for line in lines.app() if line.get("msg") == "started"] == ["started"]


def test_a_failing_app_lifespan_still_runs_kibans_cleanups() -> None:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("cannot start")
        yield

    app = FastAPI(lifespan=lifespan)
    service = kiban.Service(app, Settings(), security=NoSecurity())
    cleaned: list[bool] = []

    async def cleanup() -> None:
        cleaned.append(True)

    service.on_shutdown(cleanup)
    with pytest.raises(RuntimeError, match="cannot start"), TestClient(app):
        pass
    assert cleaned == [True]


def test_requests_through_the_whole_service_leave_nothing_for_the_garbage_collector() -> None:
    """Security, rate limit, span, metrics, access line and FastAPI's routing together:
    every request's objects are freed by reference counting when it ends, answered,
    refused or not found (a cycle a request would put the GC on the serving loop)."""
    import asyncio
    from typing import Any

    from fastapi.exceptions import RequestValidationError

    from kiban import RateLimit
    from kiban.security import APIKey, Security
    from tests.conftest import asgi_scope, garbage_left_by

    async def validate(key: str) -> bool:
        return key == "k"

    app = FastAPI()
    kiban.Service(
        app, Settings(), security=Security(APIKey(validate)), rate_limit=RateLimit("1000/second")
    )

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    requests = {
        200: ("/items/1", b"k"),
        401: ("/items/1", b"wrong"),
        422: ("/items/x", b"k"),
        404: ("/nothing", b"k"),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def serve(path: str, key: bytes, count: int) -> None:
        for _ in range(count):
            scope = asgi_scope(path, [(b"host", b"svc"), (b"x-api-key", key)])
            # One failed key per client: repeated failures would lock a client out.
            scope["client"] = (f"192.0.2.{len(statuses) % 250}", 1234)
            await app(scope, receive, send)

    async def left_for_the_gc() -> dict[int, list[object]]:
        lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started = asyncio.Event()

        async def lifespan_send(message: dict[str, Any]) -> None:
            started.set()

        await lifespan.put({"type": "lifespan.startup"})
        running = asyncio.create_task(
            app(
                {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},  # type: ignore[arg-type]
                lifespan.get,
                lifespan_send,
            )
        )
        await started.wait()
        left: dict[int, list[object]] = {}
        for status, (path, key) in requests.items():
            await serve(path, key, 5)  # caches filled, lazy state made
            left[status] = await garbage_left_by(lambda: serve(path, key, 25))  # noqa: B023 (awaited here)
            assert statuses[-1] == status
        await lifespan.put({"type": "lifespan.shutdown"})
        await running
        return left

    left = asyncio.run(left_for_the_gc())
    assert {status: len(objects) for status, objects in left.items() if status != 422} == {
        200: 0,
        401: 0,
        404: 0,
    }
    # FastAPI releases up to at least 0.121 (the lowest kiban supports) keep a
    # RequestValidationError in a cycle with the frames its traceback holds; that
    # cycle is FastAPI's, and newer releases leave nothing here either.
    assert not left[422] or any(isinstance(o, RequestValidationError) for o in left[422])
