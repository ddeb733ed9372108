"""Faults and shutdown under load, on real processes: nothing accepted fails, nothing is lost."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MARIADB, POSTGRES, bearer, require
from tests.proxy import Proxy

pytestmark = pytest.mark.process

MEMBERS = "services.members.app:create_app"
READER = bearer("svc", "members:read")


def test_sigterm_under_load_loses_nothing(spawn: Any, tmp_path: Path) -> None:
    """A load balancer's view: it stops routing when readiness fails; until then every
    request it sent is answered, and every 201 is in the database afterwards."""
    database = tmp_path / "members.db"
    service = spawn(
        MEMBERS,
        DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        HTTP_DRAIN_SECONDS="1.5",
        HTTP_SHUTDOWN_TIMEOUT="10",
        RATE_LIMIT="100000/second",
        REGISTRATION_RATE_LIMIT="100000/second",
        HEALTH_CACHE_SECONDS="0",
    )
    deregistered = threading.Event()
    created: list[str] = []
    failures: list[str] = []
    readiness_seen: list[int] = []
    lock = threading.Lock()

    def balancer() -> None:
        with httpx.Client(timeout=2) as client:
            while not deregistered.is_set():
                status = client.get(f"{service.url}/health/readiness").status_code
                readiness_seen.append(status)
                if status != 200:
                    deregistered.set()
                time.sleep(0.05)

    def worker() -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(2000):  # bounded
                if deregistered.is_set():
                    return
                email = f"{uuid.uuid4().hex}@example.com"
                try:
                    response = client.post(
                        f"{service.url}/members", json={"email": email, "name": "Load"}
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(type(exc).__name__)
                    return
                with lock:
                    if response.status_code == 201:
                        created.append(email)
                    else:
                        failures.append(str(response.status_code))

    threads = [threading.Thread(target=balancer)] + [
        threading.Thread(target=worker) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    service.popen.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=30)
    assert service.popen.wait(timeout=20) == 0
    assert failures == []
    assert len(created) > 20
    assert readiness_seen[-1] == 503
    with sqlite3.connect(database) as connection:
        stored = {row[0] for row in connection.execute("SELECT email FROM members")}
    assert set(created) <= stored
    drained = [
        line for line in service.lines() if line.get("msg") == "shutdown requested, draining"
    ]
    assert drained


@pytest.mark.integration
@pytest.mark.parametrize("database", ["postgres_url", "mariadb_url"])
def test_a_database_outage_is_503_and_recovers_without_restart(
    database: str, request: pytest.FixtureRequest, spawn: Any
) -> None:
    require(POSTGRES if database == "postgres_url" else MARIADB, database)
    url: str = request.getfixturevalue(database)
    upstream = POSTGRES if database == "postgres_url" else MARIADB
    proxy = Proxy(upstream)
    proxy.start()
    proxied = url.replace(f":{upstream[1]}/", f":{proxy.port}/")
    service = spawn(MEMBERS, DATABASE_URL=proxied, HEALTH_CACHE_SECONDS="0.2", HEALTH_TIMEOUT="0.5")
    with httpx.Client(base_url=service.url, timeout=10) as client:
        member = client.post("/members", json={"email": "db@example.com", "name": "Db"})
        assert member.status_code == 201
        path = f"/members/{member.json()['id']}"
        assert client.get(path, headers=READER).status_code == 200

        proxy.cut()
        started = time.monotonic()
        readiness = client.get("/health/readiness")
        assert readiness.status_code == 503
        assert readiness.json()["checks"]["database"]["status"] == "fail"
        assert time.monotonic() - started < 1.5  # within one check, under the probe timeout
        assert client.get("/health/liveness").status_code == 200
        started = time.monotonic()
        response = client.get(path, headers=READER)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert time.monotonic() - started < 5

        proxy.restore()
        deadline = time.monotonic() + 15
        while client.get("/health/readiness").status_code != 200:
            assert time.monotonic() < deadline, "readiness never recovered"
            time.sleep(0.2)
        assert client.get(path, headers=READER).status_code == 200
    proxy.cut()
    assert [
        line for line in service.lines() if line.get("log") == "access" and line["status"] == 500
    ] == []
