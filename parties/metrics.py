"""Measurements each party reports: phase timings, traffic and peak memory."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import contextmanager


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Phases:
    """Wall-clock seconds per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def median_step(values: list[float]) -> float | None:
    """Median of the differences between consecutive values (None with fewer than two)."""
    steps = [b - a for a, b in zip(values, values[1:])]
    return statistics.median(steps) if steps else None


def percentile_step(values: list[float], q: float) -> float | None:
    steps = sorted(b - a for a, b in zip(values, values[1:]))
    if not steps:
        return None
    index = min(len(steps) - 1, max(0, round(q * (len(steps) - 1))))
    return steps[index]
