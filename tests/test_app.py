"""kiban.Service and the public API."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.testclient import TestClient

import kiban
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
