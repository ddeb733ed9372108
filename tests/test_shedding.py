"""Adaptive shedding on a clock and a loop lag the tests control."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

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


@given(
    st.lists(
        st.one_of(
            st.floats(0.0001, 2.0).map(lambda seconds: ("done", seconds)),
            st.floats(0.0, 1.5).map(lambda step: ("wait", step)),
            st.just(("ask", 0.0)),
        ),
        max_size=200,
    )
)
def test_the_capacity_summed_once_a_bucket_is_the_windows_max_pass_times_min_mean(
    steps: list[tuple[str, float]],
) -> None:
    """The past buckets are summed up once per bucket; asked at any moment, between any
    completions, the capacity is what the whole window says (go-zero's formula)."""
    clock = Clock()
    shedder = Shedder(clock=clock, window=1.0, bucket=0.1)
    completed: list[tuple[float, float]] = []  # (when, seconds)
    for kind, value in steps:
        if kind == "done":
            shedder.done(value)
            completed.append((clock.now, value))
        elif kind == "wait":
            clock.now += value
        index = int(clock.now / 0.1 + 1e-9)
        buckets: dict[int, list[float]] = {}
        for when, seconds in completed:
            key = int(when / 0.1 + 1e-9)
            if key > index - 10:
                bucket = buckets.setdefault(key, [0, 0.0])
                bucket[0] += 1
                bucket[1] += seconds
        passed = max((count for count, _ in buckets.values()), default=0)
        least = min((total / count for count, total in buckets.values()), default=0.0)
        assert shedder.capacity() == pytest.approx(max(1.0, passed * least / 0.1))


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
        # Saturated is not dead: readiness stays 200, degraded, and says why.
        ready = await client.get("/health/readiness")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        load = ready.json()["checks"]["load"]
        assert load["status"] == "fail"
        assert load["critical"] is False
        assert re.fullmatch(r"[1-9]\d* requests refused in the last 5 s", load["error"])
        release.set()
        statuses = sorted([(await done).status_code for done in held])
        assert statuses.count(200) >= 1
        metrics = (await client.get("/metrics")).text
        counted = r'^kiban_shed_total\{[^}]*reason="overload"[^}]*\} [1-9]\d*\.0$'
        assert re.search(counted, metrics, re.M)


def test_a_busy_cpu_sheds_past_capacity_as_a_late_loop_does() -> None:
    clock, cpu = Clock(), [0.5]
    shedder = Shedder(lag_threshold=0, cpu_threshold=0.9, clock=clock, cpu=lambda: cpu[0])
    for _ in range(10):
        shedder.done(0.1)  # capacity: about one in flight
    assert not shedder.should_shed(inflight=50)  # CPU to spare: everything is served
    cpu[0] = 0.95
    assert shedder.should_shed(inflight=50)
    assert not shedder.should_shed(inflight=1)  # within capacity: always served
    cpu[0] = 0.2
    clock.now += 1.0
    assert not shedder.should_shed(inflight=50)


def test_cpu_usage_is_of_one_core_or_the_quota_and_smoothed() -> None:
    from kiban._cpu import CpuUsage

    clock, spent = Clock(), [0.0]
    usage = CpuUsage(cores=4.0, smoothing=0.5, clock=clock, cpu_time=lambda: spent[0])
    assert usage.cores == 1.0  # one thread runs Python at a time: one core is all it can use
    clock.now += 1.0
    spent[0] += 1.0  # a whole core for a second
    assert usage.sample() == 0.5  # averaged with the idle past
    clock.now += 1.0
    spent[0] += 1.0
    assert usage.sample() == 0.75
    half = CpuUsage(cores=0.5, smoothing=0.0, clock=clock, cpu_time=lambda: spent[0])
    clock.now += 1.0
    spent[0] += 0.5  # all of a half-core quota
    assert half.sample() == 1.0


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
        ({"cpu.max": "garbage"}, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_or_v1(
    tmp_path: Path, files: dict[str, str], cores: float | None
) -> None:
    from kiban._cpu import quota

    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    assert quota(tmp_path) == cores


def test_cpu_usage_reads_a_busy_process_as_busy() -> None:
    import time

    from kiban._cpu import CpuUsage

    usage = CpuUsage(cores=1.0, smoothing=0.0)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass  # burn the CPU
    assert usage.sample() > 0.5


async def test_the_loops_lag_is_seen_before_its_late_timer_runs() -> None:
    """The shedder reads the lag as of now: a loop held past the probe's due time is
    late by at least that much, before the probe's timer can run and say so."""
    import time

    service = kiban.Service(FastAPI(), kiban.Settings(), security=NoSecurity())
    telemetry = service.telemetry
    watcher = asyncio.ensure_future(telemetry.watch_loop(interval=0.05))
    try:
        await asyncio.sleep(0.12)  # the probe has run: an idle loop is on time
        assert telemetry.current_lag() < 0.05
        time.sleep(0.3)  # noqa: ASYNC251  # a handler holds the loop: the probe cannot run
        assert telemetry.current_lag() >= 0.2
        assert telemetry.loop_lag < 0.05  # the last measurement does not know yet
        await asyncio.sleep(0.01)
        assert telemetry.loop_lag >= 0.2  # the probe, late, measured it too
    finally:
        watcher.cancel()


async def test_a_held_loop_is_seen_within_20_ms_of_the_last_probe() -> None:
    """The shedder is blind to a surge until the probe is due, and what it admits
    meanwhile sets the admitted requests' tail: the probe runs every 20 ms."""
    import time

    service = kiban.Service(FastAPI(), kiban.Settings(), security=NoSecurity())
    telemetry = service.telemetry
    watcher = asyncio.ensure_future(telemetry.watch_loop())
    try:
        await asyncio.sleep(0.05)
        due = telemetry._lag_due
        for _ in range(100_000):  # to just after a probe: the next is a period away
            if telemetry._lag_due != due:
                break
            await asyncio.sleep(0)
        else:
            pytest.fail("the probe did not run")
        time.sleep(0.03)  # noqa: ASYNC251  # a surge holds the loop for 30 ms
        assert telemetry.current_lag() >= 0.005
    finally:
        watcher.cancel()
