"""The number formats of the printed summaries (the demo's here, the bench's reports on top): None is "-"."""

from __future__ import annotations


def fmt_bytes(n) -> str:
    """A byte count in decimal units: "512 B", "7.89 MB" (GB and up as GB)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def fmt_num(x, digits: int = 1) -> str:
    """A count or a mean of counts: whole numbers without decimals, others with `digits` of them."""
    if x is None:
        return "-"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.{digits}f}"


def fmt_s(x, *, ms_below: float = 0.0) -> str:
    """Seconds as "2.854 s", or as "12.3 ms" when |x| < ms_below."""
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if abs(x) < ms_below else f"{x:.3f} s"
