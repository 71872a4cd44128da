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


def steps(values: list[float]) -> list[float]:
    """Differences between consecutive values (per-token figures from cumulative marks)."""
    return [b - a for a, b in zip(values, values[1:])]


def median(values) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(values, q: float) -> float | None:
    """The nearest-rank q-quantile (0 <= q <= 1) of the values that are not None (None when there are none)."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    return present[min(len(present) - 1, max(0, round(q * (len(present) - 1))))]


def median_step(values: list[float]) -> float | None:
    """Median of the differences between consecutive values (None with fewer than two)."""
    return median(steps(values))


def percentile_step(values: list[float], q: float) -> float | None:
    """q-quantile of the differences between consecutive values (None with fewer than two)."""
    return percentile(steps(values), q)
