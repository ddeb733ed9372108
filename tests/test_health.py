"""Liveness never touches dependencies; readiness pings them, bounded and cached."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.testclient import TestClient

import kiban
from kiban._config import Settings
from kiban._health import Checker, HTTPPinger, RedisPinger, SQLPinger
from kiban.security import NoSecurity
from tests.conftest import Lines, closed_port


class Counting:
    def __init__(self, name: str, fail: bool = False, delay: float = 0.0) -> None:
        self.name = name
        self.fail = fail
        self.delay = delay
        self.calls = 0

    async def ping(self) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("db.internal:5432 password=hunter2 refused")


def client_with(*pingers: kiban.Pinger, cache: float = 0.0) -> TestClient:
    app = FastAPI()
    service = kiban.Service(
        app, Settings(health_timeout=0.3, health_cache_seconds=cache), security=NoSecurity()
    )
    for pinger in pingers:
        service.add_pinger(pinger)
    return TestClient(app)


def test_liveness_stays_200_and_never_pings_when_dependencies_are_down() -> None:
    down = Counting("database", fail=True)
    response = client_with(down).get("/health/liveness")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert down.calls == 0


def test_probes_answer_get_and_head_and_refuse_other_methods_as_problems() -> None:
    """Probes are answered before routing, yet keep HTTP's method rules and kiban's errors."""
    app = FastAPI()
    kiban.Service(app, Settings(), security=NoSecurity())

    @app.get("/{anything:path}")  # a catch-all route does not swallow the probes
    async def catch_all(anything: str) -> dict[str, str]:
        return {"caught": anything}

    with TestClient(app) as client:
        assert client.get("/health/liveness").json() == {"status": "ok"}
        assert client.head("/health/readiness").status_code == 200
        refused = client.post("/health/liveness")
        assert client.get("/other").json() == {"caught": "other"}
    assert refused.status_code == 405
    assert refused.headers["content-type"] == "application/problem+json"
    assert set(refused.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert refused.headers["x-trace-id"] == refused.json()["trace_id"]


def test_readiness_200_when_every_dependency_answers() -> None:
    response = client_with(Counting("database"), Counting("cache")).get("/health/readiness")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "cache"}
    assert all(check["status"] == "ok" for check in body["checks"].values())
    assert response.headers["cache-control"] == "no-store"


def test_readiness_503_names_the_failing_dependency_and_leaks_nothing(lines: Lines) -> None:
    response = client_with(Counting("database", fail=True), Counting("cache")).get(
        "/health/readiness"
    )
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"] == {
        **body["checks"]["database"],
        "status": "fail",
        "error": "unavailable",
    }
    assert body["checks"]["cache"]["status"] == "ok"
    assert "hunter2" not in response.text
    assert "db.internal" not in response.text
    (warning,) = [line for line in lines.app() if line["msg"] == "dependency check failed"]
    assert warning["dependency"] == "database"
    assert "hunter2" not in lines.text()


def test_a_hung_pinger_times_out_inside_a_probe_budget_and_checks_run_concurrently() -> None:
    client = client_with(Counting("hung", delay=30), Counting("slow", delay=0.2))
    started = time.monotonic()
    response = client.get("/health/readiness")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["checks"]["hung"]["error"] == "timeout"
    assert response.json()["checks"]["slow"]["status"] == "ok"
    assert elapsed < 1.0  # Kubernetes' default probe timeoutSeconds


async def test_results_are_cached_so_a_probe_burst_pings_once() -> None:
    pinger = Counting("database")
    checker = Checker([pinger], timeout=0.5, cache_seconds=5)
    reports = await asyncio.gather(*(checker.check() for _ in range(20)))
    assert all(report.ok for report in reports)
    assert pinger.calls == 1


async def test_draining_turns_readiness_503_without_pinging() -> None:
    pinger = Counting("database")
    checker = Checker([pinger])
    checker.start_draining()
    report = await checker.check()
    assert not report.ok
    assert report.as_dict()["status"] == "draining"
    assert pinger.calls == 0


def test_pinger_names_are_unique() -> None:
    checker = Checker([Counting("database")])
    with pytest.raises(ValueError, match="database"):
        checker.add(Counting("database"))


@pytest.mark.integration
@pytest.mark.parametrize("database", ["postgres_url", "mariadb_url", "sqlite"])
async def test_sql_pinger_against_real_databases(
    database: str, request: pytest.FixtureRequest, tmp_path: object
) -> None:
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/ping.db"
        if database == "sqlite"
        else request.getfixturevalue(database)
    )
    engine = create_async_engine(url)
    try:
        report = await Checker([SQLPinger(engine)]).check()
        assert report.ok, report
    finally:
        await engine.dispose()


@pytest.mark.integration
@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres:secret-pw@127.0.0.1:{port}/test",
        "mysql+asyncmy://root:secret-pw@127.0.0.1:{port}/test",
    ],
)
async def test_sql_pinger_reports_a_closed_port(url: str) -> None:
    engine = create_async_engine(url.format(port=closed_port()))
    try:
        report = await Checker([SQLPinger(engine)], timeout=0.8).check()
    finally:
        await engine.dispose()
    assert not report.ok
    assert report.as_dict()["checks"]["database"]["status"] == "fail"
    assert "secret-pw" not in str(report.as_dict())


@pytest.mark.integration
async def test_redis_pinger_up_and_down(redis_url: str) -> None:
    up = aioredis.from_url(redis_url)
    down = aioredis.from_url(f"redis://127.0.0.1:{closed_port()}/0")
    try:
        report = await Checker([RedisPinger(up, "redis"), RedisPinger(down, "sessions")]).check()
    finally:
        await up.aclose()
        await down.aclose()
    checks = report.as_dict()["checks"]
    assert checks["redis"]["status"] == "ok"
    assert checks["sessions"]["status"] == "fail"
    assert not report.ok


@pytest.mark.process
async def test_http_pinger_follows_another_services_readiness(spawn: object) -> None:
    other = spawn("tests.apps.hello:app")  # type: ignore[operator]
    ok = await Checker([HTTPPinger(f"{other.url}/health/readiness", "hello")]).check()
    gone = await Checker(
        [HTTPPinger(f"http://127.0.0.1:{closed_port()}/health/readiness", "gone")]
    ).check()
    missing = await Checker([HTTPPinger(f"{other.url}/nothing", "wrong-path")]).check()
    assert ok.ok
    assert not gone.ok
    assert not missing.ok


async def test_a_failing_non_critical_dependency_is_reported_without_failing_readiness() -> None:
    checker = Checker([Counting("database")])
    checker.add(Counting("members", fail=True), critical=False)
    report = await checker.check()
    assert report.ok
    body = report.as_dict()
    assert body["status"] == "degraded"
    assert body["checks"]["members"] == {
        **body["checks"]["members"],
        "status": "fail",
        "critical": False,
    }


class Stalled:
    """A dependency that accepts and then says nothing; closing to it takes a while too."""

    def __init__(self, name: str = "database", unwind: float = 2.0) -> None:
        self.name = name
        self.unwind = unwind
        self.started = 0
        self.stalled = True

    async def ping(self) -> None:
        self.started += 1
        try:
            if self.stalled:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(self.unwind)  # the connection's close, to a silent server
            raise


async def test_a_stalled_dependency_answers_within_the_timeout_not_its_cleanup() -> None:
    stalled = Stalled()
    checker = Checker([stalled], timeout=0.2, cache_seconds=0)
    began = time.monotonic()
    report = await checker.check()
    assert time.monotonic() - began < 0.5  # not 0.2 s + the 2 s cleanup
    assert (report.ok, report.checks[0].error) == (False, "timeout")
    began = time.monotonic()
    again = await checker.check()  # the first ping is still unwinding: not started again
    assert time.monotonic() - began < 0.1
    assert again.checks[0].error == "timeout"
    assert stalled.started == 1


async def test_a_dependency_that_recovers_is_ready_once_its_last_ping_unwound() -> None:
    stalled = Stalled(unwind=0.1)
    checker = Checker([stalled], timeout=0.1, cache_seconds=0)
    assert not (await checker.check()).ok
    stalled.stalled = False
    await asyncio.sleep(0.2)  # the abandoned ping finishes its cleanup
    assert (await checker.check()).ok
