"""The slow-dependency row of ``make bench``: PostgreSQL made 2 s slow under load.

The members service runs with its database (the machine's PostgreSQL) behind a TCP
proxy on loopback, ``HTTP_HANDLER_TIMEOUT=1``, and is driven open loop (as in
``bench.overload``) on ``GET /members/{id}`` in three phases:

1. **healthy**: answers are 200 in milliseconds;
2. **slow**: the proxy holds every chunk 2 s each way: every request must end at its
   deadline (a 504 within about a second, never a request held for the 4 s a query
   takes, nor for the pool's 30 s checkout), and readiness must turn 503;
3. **recovered**: the delay removed: the time to the first 200 and to readiness 200
   again, without a restart (budget: one readiness check interval, about a second,
   after the last slow query has unwound).

``python -m bench.slowdb`` prints the table; ``bench.run`` adds it to results.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.overload import PATIENCE, Connections

ROOT = Path(__file__).resolve().parent.parent
RATE = 40.0
SECONDS = 6.0
DELAY = 2.0
DEADLINE = 1.0
DATABASE = "kiban_bench_slowdb"


async def _phase(url: str, headers: str, rate: float, seconds: float) -> dict[str, Any]:
    """Drive ``rate`` requests a second for ``seconds``; statuses and answer times."""
    host, port = url.removeprefix("http://").split(":")
    connections = Connections(host, int(port), "/members/1", headers)
    took: list[float] = []
    statuses: dict[str, int] = {}
    began = time.perf_counter() + 0.1

    async def one(due: float) -> None:
        await asyncio.sleep(due - time.perf_counter())
        try:
            status = str(await asyncio.wait_for(connections.get(), PATIENCE * 5))
        except TimeoutError:
            status = "no answer"
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status = "failed"
        took.append(time.perf_counter() - due)
        statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one(began + index / rate) for index in range(int(rate * seconds))))
    for _, writer in connections.idle:
        writer.close()
    took.sort()
    return {
        "statuses": statuses,
        "p50_ms": statistics.median(took) * 1000,
        "p99_ms": took[int(len(took) * 0.99)] * 1000,
        "max_ms": took[-1] * 1000,
    }


async def fresh_database(name: str) -> None:
    """A database of the bench's own, made anew: the suite's ``test`` holds other schemas."""
    import asyncpg

    connection = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await connection.execute(f"CREATE DATABASE {name}")
    finally:
        await connection.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/readiness", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def run(workdir: Path) -> tuple[list[str], bool]:
    """The table's rows, and whether the slow-dependency budget held."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import free_port, token
    from tests.proxy import Proxy

    asyncio.run(fresh_database(DATABASE))
    proxy = Proxy(("127.0.0.1", 5432))
    proxy.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "slowdb.log").open("ab")
    service = subprocess.Popen(
        [sys.executable, "-m", "kiban", "run", "services.members.app:create_app"],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{DATABASE}",
            "HTTP_HANDLER_TIMEOUT": str(DEADLINE),
            "RATE_LIMIT": "1000000/second",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "warning",
            "HTTP_DRAIN_SECONDS": "0",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit(f"members did not start: see {workdir}/slowdb.log")
            time.sleep(0.2)
        httpx.post(f"{url}/members", json={"email": "slow@example.com", "name": "Slow"})
        headers = f"Authorization: Bearer {token('jwt', 'bench', 'members:read')}\r\n"
        healthy = asyncio.run(_phase(url, headers, RATE, SECONDS))
        proxy.delay = DELAY
        slow = asyncio.run(_phase(url, headers, RATE, SECONDS))
        ready_when_slow = _ready(url)
        proxy.delay = 0.0
        removed = time.monotonic()
        first_ok = ready_again = None
        while time.monotonic() - removed < 30 and (first_ok is None or ready_again is None):
            if first_ok is None:
                answer = httpx.get(
                    f"{url}/members/1",
                    headers={"authorization": headers.split(": ", 1)[1].strip()},
                    timeout=5,
                )
                if answer.status_code == 200:
                    first_ok = time.monotonic() - removed
            if ready_again is None and _ready(url):
                ready_again = time.monotonic() - removed
            time.sleep(0.05)
        recovered = asyncio.run(_phase(url, headers, RATE, SECONDS))
    finally:
        service.terminate()
        service.wait(timeout=30)
        proxy.cut()

    def row(name: str, phase: dict[str, Any]) -> str:
        answers = sorted(phase["statuses"].items())
        statuses = ", ".join(f"{count} x {status}" for status, count in answers)
        return (
            f"| {name} | {statuses} | {phase['p50_ms']:.0f} | {phase['p99_ms']:.0f} | "
            f"{phase['max_ms']:.0f} |"
        )

    rows = [
        "| phase | answers | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- |",
        row("healthy", healthy),
        row(f"database {DELAY:.0f} s slow", slow),
        row("delay removed", recovered),
        "",
        f"Readiness while slow: {'200 (not held)' if ready_when_slow else '503'}. After the "
        f"delay was removed: first 200 in {_seconds(first_ok)}, readiness 200 in "
        f"{_seconds(ready_again)}.",
    ]
    held = (
        slow["max_ms"] <= (DEADLINE + 0.5) * 1000
        and not ready_when_slow
        and first_ok is not None
        and ready_again is not None
        and ready_again <= DEADLINE + DELAY * 2 + 1.5
        and set(recovered["statuses"]) == {"200"}
    )
    return rows, held


def _seconds(value: float | None) -> str:
    return "never (30 s)" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    import tempfile

    table, ok = run(Path(tempfile.mkdtemp()))
    print("\n".join(table))
    print("budget held" if ok else "budget NOT held")
