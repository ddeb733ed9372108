"""The overload rows of ``make bench``: a route driven at 1x, 2x and 3x its capacity.

``python -m bench.overload serve VARIANT PORT`` serves ``GET /work``, a handler that
works on the CPU for about 1 ms, waits 2 ms (as on a database), and works 1 ms more:

- ``fastapi``: bare FastAPI on uvicorn;
- ``kiban``: the full chassis (context, access log, span, metrics), no shedding;
- ``kiban-shed``: the same with adaptive shedding on (``HTTP_SHED_LOOP_LAG=0.015``).

``python -m bench.overload drive URL RATE SECONDS`` sends requests **open loop**, at a
fixed rate whatever the answers (as users arrive), each with a client's patience of
``PATIENCE`` seconds, and prints one JSON line: the 2xx answered within that patience
per second (goodput), the 503s, the failures, and the p50/p99 of the 2xx latencies,
counted from when each request was due (so a driver running late is not hidden).

A closed-loop driver (wrk) slows down as the server does and cannot show overload:
the queue it builds is bounded by its connections. Open loop, an unprotected server's
queue and latency grow for as long as the overload lasts.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: How long a client waits for an answer before it gives up (and the request is lost).
PATIENCE = 2.0


def _burn(seconds: float) -> None:
    """Work on the CPU for about ``seconds`` (of this thread's CPU time)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(range(200))


def app(variant: str) -> Any:
    from fastapi import FastAPI

    application = FastAPI()
    if variant != "fastapi":
        import kiban
        from kiban.security import NoSecurity

        settings = kiban.Settings(
            service_name="bench-overload",
            log_level="warning",
            http_shed_loop_lag=0.015 if variant == "kiban-shed" else 0.0,
            http_drain_seconds=0,
        )
        kiban.Service(application, settings, security=NoSecurity())

    @application.get("/work")
    async def work() -> dict[str, bool]:
        _burn(0.001)
        await asyncio.sleep(0.002)
        _burn(0.001)
        return {"done": True}

    return application


def serve(variant: str, port: int) -> int:
    from bench.serve import on_kiban, on_uvicorn

    application = app(variant)
    if variant == "fastapi":
        on_uvicorn(application, port)
        return 0
    return on_kiban(application, port)


class Connections:
    """Keep-alive HTTP/1.1 connections to one server, opened as the load needs them.

    Raw streams, not an HTTP client library: at a few thousand requests a second a
    Python client's own cost would be what is measured.
    """

    def __init__(self, host: str, port: int, path: str, headers: str = "") -> None:
        self.host, self.port = host, port
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> int:
        """One request; its status. A connection that fails or is given up on is closed."""
        reader, writer = (
            self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        )
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status


async def drive(url: str, rate: float, seconds: float) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    connections = Connections(host, int(port), "/work")
    latencies: list[float] = []
    outcome = {"shed": 0, "late": 0, "failed": 0}
    began = time.perf_counter() + 0.2

    async def one(due: float) -> None:
        await asyncio.sleep(due - time.perf_counter())
        try:
            status = await asyncio.wait_for(connections.get(), PATIENCE)
        except TimeoutError:
            outcome["late"] += 1
            return
        except (OSError, asyncio.IncompleteReadError, ValueError):
            outcome["failed"] += 1
            return
        took = time.perf_counter() - due
        if status == 503:
            outcome["shed"] += 1
        elif status != 200:
            outcome["failed"] += 1
        elif took > PATIENCE:
            outcome["late"] += 1
        else:
            latencies.append(took)

    count = int(rate * seconds)
    await asyncio.gather(*(one(began + index / rate) for index in range(count)))
    for _, writer in connections.idle:
        writer.close()
    latencies.sort()
    return {
        "rate": rate,
        "sent": count,
        "goodput": len(latencies) / seconds,
        **outcome,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
    }


async def capacity(url: str, seconds: float, concurrency: int = 32) -> float:
    """2xx per second with ``concurrency`` requests always in flight (closed loop)."""
    host, port = url.removeprefix("http://").split(":")
    connections = Connections(host, int(port), "/work")
    done = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            if await connections.get() == 200:
                done += 1

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - began)


VARIANTS = ("fastapi", "kiban", "kiban-shed")
LOADS = (1, 2, 3)


def run(workdir: Path, seconds: float = 6.0) -> tuple[list[str], list[tuple[str, bool]]]:
    """The table's rows and the budget's checks, servers on core 0 and the driver on 1."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "PYTHONPATH": str(root), "LOG_FORMAT": "json"}

    def python(*args: str) -> list[str]:
        return [sys.executable, "-m", "bench.overload", *args]

    def driver(*args: str) -> str:
        return subprocess.run(
            ["taskset", "-c", "1", *python(*args)],
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    @contextmanager
    def serving(variant: str) -> Iterator[str]:
        port = _free_port()
        with (workdir / f"overload-{variant}.log").open("ab") as log:
            server = subprocess.Popen(
                ["taskset", "-c", "0", *python("serve", variant, str(port))],
                cwd=root,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            time.sleep(3)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in VARIANTS:
        with serving(variant) as url:
            results[variant] = {"capacity": {"goodput": float(driver("capacity", url, "3"))}}
    # Every variant is driven at the same rates: multiples of kiban's capacity.
    ceiling = results["kiban"]["capacity"]["goodput"]
    for variant in VARIANTS:
        with serving(variant) as url:
            driver("capacity", url, "1")  # warm-up
            time.sleep(1)
            results[variant]["unloaded"] = json.loads(
                driver("drive", url, str(ceiling / 4), str(seconds))
            )
            for load in LOADS:
                time.sleep(3)  # what a previous load left queued drains
                results[variant][f"{load}x"] = json.loads(
                    driver("drive", url, str(ceiling * load), str(seconds))
                )

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    rows = []
    for variant in VARIANTS:
        for phase in ("unloaded", *(f"{load}x" for load in LOADS)):
            result = results[variant][phase]
            rows.append(
                f"| {variant} | {phase} ({result['rate']:.0f}/s) | {result['goodput']:.0f} | "
                f"{result['goodput'] / ceiling * 100:.0f}% | {result['shed']} | "
                f"{result['late'] + result['failed']} | {cell(result['p50_ms'])} | "
                f"{cell(result['p99_ms'])} |"
            )
    protected = results["kiban-shed"]
    at_three = protected["3x"]
    unloaded_p99 = protected["unloaded"]["p99_ms"] or float("inf")
    checks = [
        (
            f"overload: kiban with shedding keeps >= 90% of capacity as goodput at 3x "
            f"({at_three['goodput'] / ceiling * 100:.0f}%)",
            at_three["goodput"] >= 0.9 * ceiling,
        ),
        (
            f"overload: admitted p99 at 3x <= 5x unloaded "
            f"({(at_three['p99_ms'] or float('inf')) / unloaded_p99:.1f}x)",
            (at_three["p99_ms"] or float("inf")) <= 5 * unloaded_p99,
        ),
    ]
    table = [
        f"Capacity (closed loop, 32 in flight): {ceiling:.0f}/s in kiban, "
        f"{results['fastapi']['capacity']['goodput']:.0f}/s on bare FastAPI.",
        "",
        "| server | offered | goodput/s | of capacity | 503 | lost | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    return table, checks


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    command = sys.argv[1]
    if command == "serve":
        os.environ.setdefault("LOG_FORMAT", "json")
        return serve(sys.argv[2], int(sys.argv[3]))
    import uvloop

    if command == "run":
        import tempfile

        table, checks = run(Path(tempfile.mkdtemp()))
        print("\n".join(table))
        for text, ok in checks:
            print(f"{'held' if ok else 'NOT held'}: {text}")
        return 0
    if command == "capacity":
        print(uvloop.run(capacity(sys.argv[2], float(sys.argv[3]))))
        return 0
    result = uvloop.run(drive(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
