"""Print every benchmark's `extra_info` figures (MB/s, ns per element, speed-ups) after the run, so a
person can compare them without --benchmark-json."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    rows = [(b.fullname.split("::")[-1], b.extra_info) for b in benchmarks if b.extra_info]
    if not rows:
        return
    terminalreporter.section("benchmark figures (extra_info)")
    for name, info in rows:
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        terminalreporter.write_line(f"{name}: {figures}")
