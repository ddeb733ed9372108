"""kiban's request path step by step, around a fake ASGI app (no FastAPI routing, no server).

Each test drives ``Chassis`` directly and looks at what the app saw and what was sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI

import kiban
from kiban import _propagation as propagation
from kiban._chassis import Chassis
from kiban._config import Settings
from kiban.security import NoSecurity
from tests.conftest import Lines, asgi_scope, chassis_around, garbage_left_by

Message = dict[str, Any]


class FakeApp:
    """Answers 200 with ``body`` (or runs ``behaviour``); records what it saw."""

    def __init__(self, body: bytes = b"ok", behaviour: Any = None) -> None:
        self.body = body
        self.behaviour = behaviour
        self.calls = 0
        self.context: propagation.RequestContext | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        self.context = propagation.current()
        if self.behaviour is not None:
            await self.behaviour(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(self.body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


def _chassis(app: Any, lifecycle: Any = None, **settings: Any) -> Chassis:
    service = kiban.Service(FastAPI(), Settings(**settings), security=NoSecurity())
    built: Chassis = chassis_around(app, service, lifecycle)
    return built


def drive(chassis: Chassis, scope: Any, body: bytes = b"") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(chassis(scope, receive, send))
    return sent


def test_the_app_runs_inside_the_request_context_and_the_answer_carries_its_ids(
    lines: Lines,
) -> None:
    app = FakeApp()
    sent = drive(_chassis(app), asgi_scope())
    assert app.context is not None
    headers = dict(sent[0]["headers"])
    assert headers[b"x-trace-id"].decode() == app.context.trace_id
    assert headers[b"x-request-id"].decode() == app.context.request_id
    assert b"x-content-type-options" in headers  # the security headers
    (line,) = lines.access()
    assert (line["status"], line["response_bytes"], line["trace_id"]) == (
        200,
        2,
        app.context.trace_id,
    )


def test_probes_are_answered_without_the_app() -> None:
    app = FakeApp()
    sent = drive(_chassis(app), asgi_scope("/health/liveness"))
    assert sent[0]["status"] == 200
    assert app.calls == 0


def test_a_body_declared_too_large_is_413_before_the_app_runs() -> None:
    app = FakeApp()
    scope = asgi_scope(headers=[(b"host", b"svc"), (b"content-length", b"999999999")])
    sent = drive(_chassis(app, http_max_body_bytes=10), scope)
    assert sent[0]["status"] == 413
    assert app.calls == 0


def test_a_bug_in_the_app_is_a_500_problem_with_its_access_line(lines: Lines) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("broken")

    sent = drive(_chassis(FakeApp(behaviour=broken)), asgi_scope())
    assert sent[0]["status"] == 500
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]
    assert [line["status"] for line in lines.access()] == [500]


def test_while_draining_every_answer_asks_to_close_the_connection() -> None:
    chassis = _chassis(FakeApp())
    chassis.health.start_draining()
    sent = drive(chassis, asgi_scope())
    assert (b"connection", b"close") in sent[0]["headers"]


def test_a_redirect_built_from_a_typed_host_stays_on_the_service() -> None:
    async def redirect(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 307,
                "headers": [(b"location", b"http://evil.example/next")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    typed = asgi_scope(headers=[(b"host", b"evil.example")])  # the app trusts Host to build URLs
    sent = drive(_chassis(FakeApp(behaviour=redirect)), typed)
    assert dict(sent[0]["headers"])[b"location"] == b"/next"


def test_a_request_interrupted_at_shutdown_gets_503_and_the_apps_late_answer_is_dropped(
    lines: Lines,
) -> None:
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    chassis = _chassis(FakeApp(behaviour=slow))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def scenario() -> None:
        request = asyncio.ensure_future(chassis(asgi_scope(), receive, send))
        await asyncio.sleep(0.01)
        assert await kiban.Service.of(chassis.api).interrupt("shutdown") == 1
        release.set()
        await request

    asyncio.run(scenario())
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == [503]
    assert b"late" not in [m.get("body") for m in sent]
    (line,) = lines.access()
    assert (line["status"], line["interrupted"]) == (503, "shutdown")


class Recorder:
    """A lifecycle that records when the chassis runs it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[str] = []

    async def startup(self) -> None:
        self.calls.append("startup")
        if self.fail:
            raise RuntimeError("the database is not there")

    def started(self) -> None:
        self.calls.append("started")

    async def shutdown(self) -> None:
        self.calls.append("shutdown")


def _lifespan(chassis: Chassis, sent: list[str]) -> None:
    """Run a lifespan through ``chassis``; ``sent`` gets the messages the server was sent."""
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    asyncio.run(chassis({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))


def test_the_lifecycle_runs_around_the_apps_own_lifespan() -> None:
    calls: list[str] = []
    lifecycle = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        calls.append(f"app start after {lifecycle.calls}")
        await send({"type": "lifespan.startup.complete"})
        await receive()
        calls.append(f"app end after {lifecycle.calls}")
        await send({"type": "lifespan.shutdown.complete"})

    sent: list[str] = []
    _lifespan(_chassis(app, lifecycle), sent)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert calls == ["app start after ['startup']", "app end after ['startup', 'started']"]
    assert lifecycle.calls == ["startup", "started", "shutdown"]


def test_a_failed_start_up_cleans_up_and_tells_the_server() -> None:
    lifecycle = Recorder(fail=True)
    app = FakeApp()
    sent: list[str] = []
    with pytest.raises(RuntimeError, match="the database is not there"):  # the server reports it
        _lifespan(_chassis(app, lifecycle), sent)
    assert sent[0] == "lifespan.startup.failed"
    assert lifecycle.calls == ["startup", "shutdown"]
    assert app.calls == 0  # the app's lifespan never began


def test_a_failed_start_up_is_logged_once_naming_its_exception(lines: Lines) -> None:
    """``TimeoutError()`` has no message: the server was told an empty one and logged an
    empty line, and the cause was nowhere in the log."""
    told: list[Message] = []

    class TimesOut(Recorder):
        async def startup(self) -> None:
            raise TimeoutError

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        told.append(message)

    chassis = _chassis(FakeApp(), TimesOut())
    with pytest.raises(TimeoutError):
        asyncio.run(chassis({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert told == [{"type": "lifespan.startup.failed", "message": "start-up failed: TimeoutError"}]
    [failed] = [line for line in lines.app() if line["msg"] == "start-up failed"]
    assert failed["error"] == "TimeoutError"
    assert "in startup" in failed["exception"]  # where it came from


def test_the_apps_own_failed_lifespan_is_logged_by_kiban_once(lines: Lines) -> None:
    """Starlette tells the server the whole traceback as the message, which the server
    logs as one unstructured line; kiban logs it structured and tells the server a line."""
    from contextlib import asynccontextmanager

    from fastapi.testclient import TestClient

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        raise ConnectionRefusedError("the cache is not there")
        yield

    app = FastAPI(lifespan=lifespan)
    kiban.Service(app, Settings(), security=NoSecurity())
    with pytest.raises(ConnectionRefusedError), TestClient(app):
        pass
    [failed] = [line for line in lines.app() if line["msg"] == "start-up failed"]
    assert failed["error"] == "ConnectionRefusedError: the cache is not there"
    assert "in lifespan" in failed["exception"]


@pytest.mark.parametrize("outcome", ["answered", "bug", "probe"])
def test_a_request_leaves_nothing_for_the_garbage_collector(outcome: str) -> None:
    """Every object a request made is freed when it ends, by reference counting.

    An object cycle (the scope holding the exchange that holds the scope) left ~40
    objects a request to the cyclic GC: a collection every ~16 requests, each pausing
    the event loop, and the full ones longer as the heap grows.
    """

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("broken")

    chassis = _chassis(FakeApp(behaviour=broken if outcome == "bug" else None))
    path = "/health/liveness" if outcome == "probe" else "/thing"

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    async def serve(requests: int) -> None:
        for _ in range(requests):
            await chassis(asgi_scope(path), receive, send)

    async def left_for_the_gc() -> int:
        await serve(10)  # caches filled, lazy state made
        return len(await garbage_left_by(lambda: serve(50)))

    assert asyncio.run(left_for_the_gc()) == 0
