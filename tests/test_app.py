"""kiban.Service and the public API."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI
from starlette.testclient import TestClient

import kiban
from kiban.config import Settings
from kiban.security import NoSecurity
from tests.conftest import ROOT, Lines


def test_public_names_are_locked() -> None:
    """Adding or removing a public name is a deliberate change to this list."""
    assert sorted(kiban.__all__) == sorted(
        [
            "ConfigError",
            "HTTPPinger",
            "HeaderNames",
            "Pinger",
            "Problem",
            "RedisPinger",
            "RequestContext",
            "SQLPinger",
            "Service",
            "Settings",
            "current",
            "load",
            "log",
            "meter",
            "run",
            "tracer",
        ]
    )
    for name in kiban.__all__:
        assert hasattr(kiban, name)


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
    """kiban leaves out FastAPI's outer layers only when they have nothing to do."""
    app = FastAPI(max_body_size=16)
    kiban.Service(app, Settings(), security=NoSecurity())

    @app.post("/echo")
    async def echo(body: dict[str, str]) -> dict[str, str]:
        return body

    with TestClient(app) as client:
        assert client.post("/echo", json={"a": "b"}).status_code == 200
        refused = client.post("/echo", json={"text": "x" * 64})
    assert refused.status_code == 413


def test_unhandled_errors_are_problems_with_or_without_fastapis_outer_layers() -> None:
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
