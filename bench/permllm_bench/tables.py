"""Plain-text tables and the number formats of the harnesses' reports."""

from __future__ import annotations

from parties import formats
from parties.formats import fmt_bytes, fmt_num
from permllm_bench.cost_model import RATIO_LIMIT

__all__ = ["fmt_bytes", "fmt_num", "fmt_ratio", "fmt_s", "fmt_signed_s", "grid"]


def fmt_s(x) -> str:
    """Seconds, under 0.1 s in milliseconds."""
    return formats.fmt_s(x, ms_below=0.1)


def fmt_signed_s(x) -> str:
    if x is None:
        return "-"
    return ("-" if x < 0 else "+") + fmt_s(abs(x))


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
