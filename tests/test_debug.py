"""Debug endpoints: off by default, always secured, and they change what the process does."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import kiban
from kiban import _log as log
from kiban._config import ConfigError, Settings
from kiban.security import APIKey, NoSecurity, Security
from tests.conftest import Lines

KEY = {"x-api-key": "debug-key"}


async def _validate(key: str) -> bool:
    return key == "debug-key"


def make_app(enabled: bool = True) -> FastAPI:
    app = FastAPI()
    kiban.Service(
        app,
        Settings(debug_endpoints=enabled, trusted_proxies=["10.0.0.0/8"]),
        security=NoSecurity(),
        debug_security=Security(APIKey(_validate)),
    )

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        log.debug("echo detail", keys=sorted(body))
        return {"got": body, "access_token": "issued-secret"}

    @app.get("/busy")
    async def busy_loop_work(seconds: float) -> dict[str, int]:
        deadline, count = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            count += sum(range(500))
        return {"count": count}

    return app


@pytest.fixture
def client(lines: Lines) -> Any:
    with TestClient(make_app(), client=("10.0.0.3", 5000)) as test_client:  # a trusted peer
        yield test_client
    log.set_level("info")


def test_debug_endpoints_are_off_by_default() -> None:
    with TestClient(make_app(enabled=False)) as client:
        assert client.get("/debug/log-level", headers=KEY).status_code == 404


def test_enabling_them_without_a_requirement_is_refused() -> None:
    with pytest.raises(ConfigError, match="debug_security"):
        kiban.Service(FastAPI(), Settings(debug_endpoints=True), security=NoSecurity())


def test_they_are_secured(client: TestClient) -> None:
    assert client.get("/debug/log-level").status_code == 401
    assert client.get("/debug/tasks", headers={"x-api-key": "wrong"}).status_code == 401


def test_log_level_toggle_shows_and_hides_debug_lines(client: TestClient, lines: Lines) -> None:
    client.post("/echo", json={"a": 1})
    assert client.get("/debug/log-level", headers=KEY).json() == {"level": "info"}
    assert client.put("/debug/log-level", json={"level": "debug"}, headers=KEY).status_code == 200
    client.post("/echo", json={"b": 2})
    client.put("/debug/log-level", json={"level": "info"}, headers=KEY)
    client.post("/echo", json={"c": 3})
    details = [line["keys"] for line in lines.app() if line["msg"] == "echo detail"]
    assert details == [["b"]]
    assert client.put("/debug/log-level", json={"level": "loud"}, headers=KEY).status_code == 422


def test_a_debug_header_turns_on_debug_lines_for_that_request_only(
    client: TestClient, lines: Lines
) -> None:
    client.post("/echo", json={"first": 1})
    client.post("/echo", json={"second": 2}, headers={"x-debug": "1"})
    client.post("/echo", json={"third": 3})
    details = [line["keys"] for line in lines.app() if line["msg"] == "echo detail"]
    assert details == [["second"]]


def test_payload_logging_redacts_secrets(client: TestClient, lines: Lines) -> None:
    client.post("/echo", json={"user": "ada", "password": "hunter2"})
    assert not [line for line in lines.app() if line["msg"] == "payload"]
    client.put("/debug/payloads", json={"enabled": True}, headers=KEY)
    client.post(
        "/echo", json={"user": "ada", "password": "hunter2", "nested": {"api_key": "k-999"}}
    )
    client.put("/debug/payloads", json={"enabled": False}, headers=KEY)
    client.post("/echo", json={"user": "grace"})
    payloads = [
        line for line in lines.app() if line["msg"] == "payload" and line["path"] == "/echo"
    ]
    assert len(payloads) == 1
    assert payloads[0]["request_body"] == {
        "user": "ada",
        "password": "[REDACTED]",
        "nested": {"api_key": "[REDACTED]"},
    }
    assert payloads[0]["response_body"]["access_token"] == "[REDACTED]"
    for secret in ("hunter2", "k-999", "issued-secret"):
        assert secret not in lines.text()


def test_cpu_profile_of_live_work(client: TestClient) -> None:
    """The profile covers the event loop while it runs other requests' handlers."""

    def later() -> None:
        time.sleep(0.2)
        client.get("/busy", params={"seconds": 0.4})

    worker = threading.Thread(target=later)
    worker.start()
    response = client.get("/debug/profile", params={"seconds": 1.0}, headers=KEY)
    worker.join()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "busy_loop_work" in response.text


def test_memory_top_and_task_dump(client: TestClient) -> None:
    assert client.get("/debug/memory", headers=KEY).json()["started"] is True
    data = [bytearray(1000) for _ in range(1000)]
    top = client.get("/debug/memory", params={"top": 5}, headers=KEY).json()
    assert len(top["top"]) == 5
    assert top["current_bytes"] > 0
    assert client.delete("/debug/memory", headers=KEY).json() == {"tracing": False}
    del data
    tasks = client.get("/debug/tasks", headers=KEY).json()
    assert tasks["count"] >= 1
    assert all("coroutine" in task for task in tasks["tasks"])


@pytest.mark.process
def test_log_level_toggle_in_a_real_process(spawn: Any) -> None:
    service = spawn("tests.apps.hello:app", DEBUG_ENDPOINTS="true")
    with httpx.Client(base_url=service.url) as client:
        client.get("/hello/before")
        assert (
            client.put(
                "/debug/log-level", json={"level": "debug"}, headers={"x-api-key": "debug-key"}
            ).status_code
            == 200
        )
        client.get("/hello/during")
        client.put("/debug/log-level", json={"level": "info"}, headers={"x-api-key": "debug-key"})
        client.get("/hello/after")
    service.stop()
    composed = [line["name"] for line in service.lines() if line.get("msg") == "composing greeting"]
    assert composed == ["during"]
