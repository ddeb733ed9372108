"""The signals' policy, the same on uvicorn and granian, on a controlled clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import kiban
from kiban._shutdown import MARGIN, Shutdown
from kiban.security import NoSecurity


class Clock:
    """``loop.call_later`` on a clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def later(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timers.append((self.now + seconds, callback))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [timer for timer in self.timers if timer[0] <= self.now]
        self.timers = [timer for timer in self.timers if timer[0] > self.now]
        for _, callback in sorted(due, key=lambda timer: timer[0]):
            callback()


class Watchdog:
    def __init__(self, service: Any, bound: float) -> None:
        self.bound = bound
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def policy(**settings: Any) -> tuple[Shutdown, Clock, list[str], kiban.Service]:
    from fastapi import FastAPI

    service = kiban.Service(FastAPI(), kiban.Settings(**settings), security=NoSecurity())
    clock = Clock()
    events: list[str] = []
    shutdown = Shutdown(
        service,
        service.settings,
        stop=lambda: events.append(f"stop at {clock.now}"),
        later=clock.later,
        exit=lambda: events.append(f"exit at {clock.now}"),
        watchdog=Watchdog,  # type: ignore[arg-type]
    )
    return shutdown, clock, events, service


def test_the_first_signal_drains_then_stops() -> None:
    shutdown, clock, events, service = policy(
        http_drain_seconds=5, http_shutdown_timeout=10, shutdown_cleanup_timeout=3
    )
    assert not service.health.draining
    shutdown.signal()
    assert service.health.draining  # readiness 503 at once
    assert shutdown.watchdog is not None
    assert shutdown.watchdog.bound == 5 + 10 + 3 + MARGIN
    clock.advance(4.9)
    assert events == []  # still serving through the drain
    clock.advance(0.1)
    assert events == ["stop at 5.0"]


def test_a_second_signal_skips_the_rest_of_the_drain() -> None:
    shutdown, clock, events, _ = policy(http_drain_seconds=30)
    shutdown.signal()
    clock.advance(2)
    shutdown.signal()
    assert events == ["stop at 2.0"]
    clock.advance(60)
    assert events == ["stop at 2.0"]  # the drain's own stop comes to nothing


def test_a_third_signal_exits_at_once() -> None:
    shutdown, _clock, events, _ = policy(http_drain_seconds=30)
    for _ in range(3):
        shutdown.signal()
    assert events == ["stop at 0.0", "exit at 0.0"]


def test_the_watchdog_is_started_once_and_disarmed_at_the_end() -> None:
    shutdown, clock, _events, _ = policy(http_drain_seconds=1)
    shutdown.start_watchdog()  # a shutdown without a signal (the lifespan failed)
    first = shutdown.watchdog
    shutdown.signal()
    assert shutdown.watchdog is first
    clock.advance(1)
    shutdown.disarm()
    assert first is not None
    assert first.cancelled  # type: ignore[attr-defined]


def test_a_signal_during_start_up_stops_it_without_a_drain() -> None:
    """Nothing is served yet: the start-up is cancelled where it waits, and stop comes at once."""
    shutdown, _, events, service = policy(http_drain_seconds=30)
    waiting = asyncio.Event()

    async def hangs() -> None:
        waiting.set()
        await asyncio.Event().wait()  # a database that never answers

    service.on_startup(hangs)

    async def scenario() -> None:
        starting = asyncio.ensure_future(service.startup())
        await waiting.wait()
        shutdown.signal()
        with pytest.raises(asyncio.CancelledError):
            await starting

    asyncio.run(scenario())
    assert events == ["stop at 0.0"]
    assert service.interrupted
    assert not service.health.draining  # no drain: it never served
    assert shutdown.watchdog is not None  # the exit is bounded all the same


def test_a_signal_after_start_up_drains() -> None:
    shutdown, clock, events, service = policy(http_drain_seconds=5)

    async def scenario() -> None:
        await service.startup()
        service.started()
        shutdown.signal()

    asyncio.run(scenario())
    assert not service.interrupted
    assert service.health.draining
    clock.advance(5)
    assert events == ["stop at 5.0"]
