"""The shutdown's outer bound, whichever server runs the service.

Past the drain, the in-flight requests' time and the cleanups' time, plus a margin, a
watchdog ends the process whatever a dependency is doing, so it never waits for a
SIGKILL; it exits with ``EXIT_ABANDONED``.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from kiban import _log as log
from kiban._config import Settings

if TYPE_CHECKING:
    from kiban._app import Service

__all__ = ["EXIT_ABANDONED", "MARGIN", "Watchdog", "shutdown_bound"]

#: Time past the phases' bounds before the watchdog ends the process.
MARGIN = 2.0

#: The exit status of a shutdown that had to abandon something (requests or cleanups).
EXIT_ABANDONED = 3


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
        log.sink.flush()
        os._exit(EXIT_ABANDONED)


def shutdown_bound(settings: Settings) -> float:
    """Drain + in-flight + cleanups + a margin: the longest a shutdown may take."""
    return (
        settings.http_drain_seconds
        + settings.http_shutdown_timeout
        + settings.shutdown_cleanup_timeout
        + MARGIN
    )
