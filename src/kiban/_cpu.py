"""How busy this process's CPU is, as a share of what it may use (the shedder's signal).

go-zero sheds on CPU usage above 90%, read from the cgroup so a container's quota
counts, not the machine's cores. A Python service is bounded tighter than its quota:
one thread runs Python at a time, so the CPU it can put to work is at most one core,
or the quota when that is smaller (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us`` in v1). Usage is the process's CPU time over wall time against
that, smoothed (an exponential moving average over a few seconds, go-zero's) so one
busy instant does not read as overload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["CpuUsage", "quota"]


def quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores, or None when there is none (or no cgroup)."""
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit = (root / "cpu/cpu.cfs_quota_us").read_text().strip()  # v1
        period = (root / "cpu/cpu.cfs_period_us").read_text().strip()
        return None if int(limit) <= 0 else int(limit) / int(period)
    except (OSError, ValueError):
        return None


class CpuUsage:
    """The process's CPU usage, 0 to 1, of the CPU it can use; ``sample()`` updates it."""

    def __init__(
        self,
        cores: float | None = None,
        smoothing: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] = time.process_time,
    ) -> None:
        limit = quota() if cores is None else cores
        #: The cores this process can keep busy: one, or the quota when it is less.
        self.cores = min(1.0, limit) if limit else 1.0
        self.smoothing = smoothing
        self.clock = clock
        self.cpu_time = cpu_time
        self.usage = 0.0
        self._at = clock()
        self._cpu = cpu_time()

    def sample(self) -> float:
        """Fold the usage since the last sample into the average; the average."""
        now, cpu = self.clock(), self.cpu_time()
        elapsed = now - self._at
        if elapsed > 0:
            current = min(1.0, (cpu - self._cpu) / (elapsed * self.cores))
            self.usage = self.usage * self.smoothing + current * (1 - self.smoothing)
            self._at, self._cpu = now, cpu
        return self.usage
