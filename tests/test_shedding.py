"""Adaptive shedding on a clock and a loop lag the tests control."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

import kiban
from kiban._shedding import Shedder
from kiban.security import NoSecurity


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def loaded(shedder: Shedder, clock: Clock, per_bucket: int, seconds: float) -> None:
    """A second of traffic: ``per_bucket`` requests of ``seconds`` every 0.1 s."""
    for _ in range(10):
        for _ in range(per_bucket):
            shedder.done(seconds)
        clock.now += 0.1


def test_capacity_is_max_throughput_times_min_latency() -> None:
    clock = Clock()
    shedder = Shedder(clock=clock)
    loaded(shedder, clock, per_bucket=50, seconds=0.02)  # 500/s at 20 ms: ~10 in flight
    assert 9 <= shedder.capacity() <= 11


def test_nothing_is_shed_while_the_loop_keeps_up_however_many_are_in_flight() -> None:
    clock = Clock()
    shedder = Shedder(clock=clock, lag=lambda: 0.01)
    loaded(shedder, clock, per_bucket=50, seconds=0.02)
    assert not shedder.should_shed(inflight=1000)


def test_a_late_loop_sheds_past_capacity_only_and_cools_off() -> None:
    clock = Clock()
    lag = [0.5]
    shedder = Shedder(clock=clock, lag=lambda: lag[0], cool_off=1.0)
    loaded(shedder, clock, per_bucket=50, seconds=0.02)
    assert not shedder.should_shed(inflight=5)  # within what it has carried
    assert shedder.should_shed(inflight=50)
    lag[0] = 0.0  # the loop catches up for an instant...
    clock.now += 0.5
    assert shedder.should_shed(inflight=50)  # ...still hot: recently shedding
    clock.now += 1.0
    assert not shedder.should_shed(inflight=50)  # cooled off


async def test_the_chassis_answers_503_when_overloaded_past_capacity() -> None:
    app = FastAPI()
    service = kiban.Service(
        app, kiban.Settings(http_shed_loop_lag=0.1, http_handler_timeout=0), security=NoSecurity()
    )
    release = asyncio.Event()

    @app.get("/work")
    async def work() -> dict[str, bool]:
        await release.wait()
        return {"done": True}

    @app.get("/quick")
    async def quick() -> dict[str, bool]:
        return {"done": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(20):  # shows a capacity of about one request in flight
            assert (await client.get("/quick")).status_code == 200
        service.telemetry.loop_lag = 0.5  # the loop runs late
        held = [asyncio.ensure_future(client.get("/work")) for _ in range(3)]
        await asyncio.sleep(0.05)
        shed = await client.get("/quick")
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert (await client.get("/health/liveness")).status_code == 200  # probes pass
        release.set()
        statuses = sorted([(await done).status_code for done in held])
        assert statuses.count(200) >= 1
