"""Plain-text tables and the number formats of the harnesses' reports."""

from __future__ import annotations

from permllm_bench.cost_model import RATIO_LIMIT


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return "-"


def fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if abs(x) < 0.1 else f"{x:.3f} s"


def fmt_signed_s(x) -> str:
    if x is None:
        return "-"
    return ("-" if x < 0 else "+") + fmt_s(abs(x))


def fmt_num(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.{digits}f}"


def fmt_ratio(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" + (" !" if x > RATIO_LIMIT else "")


def grid(header: list[str], rows: list[list[str]], title: str | None = None, *, left: tuple[int, ...] = (0,)) -> str:
    """A table: a header line, a rule and one line per row, columns two spaces apart. Columns whose index
    is in `left` are left-aligned, the others right-aligned (numbers). title, when given, goes on top."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [] if title is None else [title]
    out += [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out)
