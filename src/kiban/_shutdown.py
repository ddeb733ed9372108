"""What SIGTERM and SIGINT do, and the shutdown's outer bound, whichever server runs.

``Shutdown`` is the one policy both servers (uvicorn, granian) follow: the first signal
drains, a second stops now, a third exits at once. Past the drain, the in-flight
requests' time and the cleanups' time, plus a margin, a watchdog ends the process
whatever a dependency is doing, so it never waits for a SIGKILL; it exits with
``EXIT_ABANDONED``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from kiban import _log as log
from kiban._config import Settings

if TYPE_CHECKING:
    from kiban._app import Service

__all__ = ["EXIT_ABANDONED", "MARGIN", "Shutdown", "Watchdog", "shutdown_bound"]

#: Time past the phases' bounds before the watchdog ends the process.
MARGIN = 2.0

#: The exit status of a shutdown that had to abandon something (requests or cleanups).
EXIT_ABANDONED = 3
#: Seconds an exit that cannot wait gives the log lines still buffered.
EXIT_FLUSH = 0.5


class Watchdog:
    """Ends the process if the shutdown outlasts ``bound`` seconds, whatever hangs.

    A thread's timer, not the event loop's: a loop held by a hung call cannot run it.
    """

    def __init__(self, service: Service, bound: float) -> None:
        self.service = service
        self.bound = bound
        self._timer = threading.Timer(bound, self._overdue)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _overdue(self) -> None:
        """The shutdown took longer than all its bounds: end the process now."""
        log.error(
            "shutdown exceeded its bound, exiting",
            bound_s=round(self.bound, 3),
            abandoned=self.service.abandoned or None,
        )
        log.sink.flush(timeout=EXIT_FLUSH)  # the bound is past: a stalled stdout waits little
        os._exit(EXIT_ABANDONED)


def shutdown_bound(settings: Settings) -> float:
    """Drain + in-flight + cleanups + a margin: the longest a shutdown may take."""
    return (
        settings.http_drain_seconds
        + settings.http_shutdown_timeout
        + settings.shutdown_cleanup_timeout
        + MARGIN
    )


def _exit_now() -> NoReturn:
    log.sink.flush(timeout=EXIT_FLUSH)
    os._exit(EXIT_ABANDONED)


class Shutdown:
    """The signals' effect, the same on every server; runs on the service's event loop.

    A signal that comes while the service is still starting stops the start-up
    (``Service.interrupt_start``): nothing is served yet, so there is nothing to drain.
    Otherwise the first signal turns readiness 503 (the load balancer takes the instance out),
    starts the watchdog and keeps serving for ``HTTP_DRAIN_SECONDS``, then calls
    ``stop`` (the server closes its listener and finishes what is in flight). A second
    signal calls ``stop`` at once: the operator does not want the rest of the drain. A
    third exits at once with ``EXIT_ABANDONED``, the logs flushed: whatever still runs
    is abandoned.

    ``later(seconds, callback)`` schedules on the loop (``loop.call_later``), and
    ``exit`` ends the process: both are given in tests, which run the policy on a
    controlled clock.
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        stop: Callable[[], None],
        later: Callable[[float, Callable[[], None]], Any] | None = None,
        exit: Callable[[], None] = _exit_now,
        watchdog: Callable[[Service, float], Watchdog] = Watchdog,
    ) -> None:
        self.service = service
        self.settings = settings
        self._stop = stop
        self._later = later
        self._exit = exit
        self._watchdog = watchdog
        self.signals = 0
        self.stopped = False
        self.watchdog: Watchdog | None = None

    def signal(self) -> None:
        """One SIGTERM or SIGINT (called on the loop, not in the signal handler)."""
        self.signals += 1
        if self.signals == 1 and self.service.interrupt_start():
            # Not serving yet: nothing to drain, and a start-up waiting on a dependency
            # that does not answer would otherwise hold the exit until the watchdog's bound.
            log.info("shutdown requested during start-up: start-up stopped")
            self.start_watchdog()
            self.stop()
        elif self.signals == 1:
            self.service.health.start_draining()
            self.start_watchdog()
            drain = self.settings.http_drain_seconds
            log.info("shutdown requested, draining", drain_s=drain)
            later = self._later or asyncio.get_running_loop().call_later
            later(drain, self.stop)
        elif self.signals == 2:
            log.info("second signal: the rest of the drain is skipped")
            self.stop()
        else:
            log.warning("third signal: exiting now", exit_status=EXIT_ABANDONED)
            self._exit()

    def start_watchdog(self) -> None:
        """Bound the shutdown from now (also when it begins without a signal)."""
        if self.watchdog is None:
            self.watchdog = self._watchdog(self.service, shutdown_bound(self.settings))

    def stop(self) -> None:
        """End the drain: the server stops taking connections (once)."""
        if not self.stopped:
            self.stopped = True
            self._stop()

    def disarm(self) -> None:
        """The shutdown is over: the watchdog has nothing left to guard."""
        if self.watchdog is not None:
            self.watchdog.cancel()
