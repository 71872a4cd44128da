"""Time sources for the network simulator: the real wall clock and a manual one for tests."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """What NetSim needs from a clock: the current time and a way to wait for a later one."""

    def now_ns(self) -> int:
        """Current time in ns."""

    def sleep_until(self, t_ns: int) -> None:
        """Return once the time is at least `t_ns` (at once when it already is)."""


class RealClock:
    """Wall-clock time (`time.time_ns`), comparable across processes on one machine."""

    def now_ns(self) -> int:
        """Nanoseconds since the epoch."""
        return time.time_ns()

    def sleep_until(self, t_ns: int) -> None:
        """Sleep until the wall clock reaches `t_ns`."""
        while True:
            remaining_ns = t_ns - time.time_ns()
            if remaining_ns <= 0:
                return
            time.sleep(remaining_ns / 1e9)


class FakeClock:
    """Manually driven time for deterministic tests; `sleep_until` jumps forward instead of waiting.

    start_ns: initial time. Thread-safe. `slept_ns` totals the time skipped by sleep_until.
    """

    def __init__(self, start_ns: int = 0) -> None:
        self._now_ns = int(start_ns)
        self.slept_ns = 0
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        """The current fake time in ns."""
        with self._lock:
            return self._now_ns

    def now_s(self) -> float:
        """The current fake time in seconds."""
        return self.now_ns() / 1e9

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` (>= 0). Raises ValueError on a negative step."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards ({seconds} s)")
        with self._lock:
            self._now_ns += round(seconds * 1e9)

    def sleep_until(self, t_ns: int) -> None:
        """Jump to `t_ns` when it lies in the future; otherwise do nothing."""
        with self._lock:
            if t_ns > self._now_ns:
                self.slept_ns += t_ns - self._now_ns
                self._now_ns = t_ns
