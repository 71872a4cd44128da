"""The model-size table (bench/RESULTS.md's "Model size" section, notes in bench/SCALE.md): one row per
`permllm bench --json` summary (one model each), with the three-process figures that grow with the model.

    python -m permllm_bench.scale 135m.json 360m.json [--pending "SmolLM2-1.7B shape=why"]
    python -m permllm_bench.scale bench/results/scale-*.json --update bench/RESULTS.md

A row: the model (the bench's label), its parameters, decode s/token under 'none' and 'wan' (the median of
the session's decode steps), online bytes per generated token (both directions, the 'none' session),
preparation bytes (W - U sent to the user), the offline (helper) bytes of the session, the time to first
token under 'none', the peak RSS of owner / user / helper (the largest over the sessions) and plaintext
transformers s/token of the same checkpoint. A pending row names a model and why it has no figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from permllm_bench.tables import fmt_bytes, fmt_s

COLUMNS = (
    "model",
    "parameters",
    "decode s/token none",
    "decode s/token wan",
    "online bytes/token",
    "preparation bytes",
    "offline bytes (session)",
    "first token (none)",
    "peak RSS owner / user / helper",
    "plaintext s/token",
)


def _profile(summary: dict, name: str) -> dict:
    return next((p for p in summary.get("profiles") or [] if p.get("name") == name), {})


def scale_row(summary: dict) -> list[str]:
    """The table's cells for one bench summary ('-' where the run has no such figure)."""
    none, wan = _profile(summary, "none"), _profile(summary, "wan")
    sessions = summary.get("profiles") or []
    peaks = {
        role: max(((p.get("peak_rss_mb") or {}).get(role) or 0 for p in sessions), default=0)
        for role in ("owner", "user", "helper")
    }
    rss = " / ".join(f"{peaks[r] / 1000:.1f} GB" for r in ("owner", "user", "helper")) if sessions else "-"
    params = (summary.get("scenario") or {}).get("parameters")
    label = (summary.get("scenario") or {}).get("model", "?").split(", ")[0]
    return [
        label,
        f"{params / 1e6:.0f}M" if params else "-",
        fmt_s(none.get("decode_s_per_token")),
        fmt_s(wan.get("decode_s_per_token")),
        fmt_bytes(none.get("online_bytes_per_token")),
        fmt_bytes(none.get("prepare_bytes")),
        fmt_bytes(none.get("offline_bytes")),
        fmt_s(none.get("ttft_s")),
        rss,
        fmt_s((summary.get("plaintext") or {}).get("s_per_token")),
    ]


def scale_markdown(summaries: list[dict], pending: list[tuple[str, str]] = ()) -> str:
    """A markdown table: a row per summary, then a row per (model, reason) not yet run."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(scale_row(s)) + " |" for s in summaries]
    for model, why in pending:
        first = f"{model}: not yet run" + (f" ({why})" if why else "")
        lines.append("| " + " | ".join([first, *["-"] * (len(COLUMNS) - 1)]) + " |")
    return "\n".join(lines)


SECTION_START, SECTION_END = "<!-- model-size -->", "<!-- /model-size -->"


def scale_section(summaries: list[dict], pending: list[tuple[str, str]] = (), notes: str = "SCALE.md") -> str:
    """The results page's "Model size" section, between markers that `update_section` finds again."""
    ordered = sorted(summaries, key=lambda s: (s.get("scenario") or {}).get("parameters") or 0)
    return "\n".join(
        [
            SECTION_START,
            "## Model size",
            "",
            "`permllm bench --model PATH --quick --profiles none,wan` per model, three processes over ZeroMQ "
            f"with CURVE; the bigger shapes are seeded random-weight checkpoints. How, and what else was "
            f"measured: [{Path(notes).name}]({notes}).",
            "",
            scale_markdown(ordered, pending),
            SECTION_END,
        ]
    )


def update_section(page: str, section: str) -> str:
    """`page` with its model-size section replaced by `section` (appended when it has none)."""
    start, end = page.find(SECTION_START), page.find(SECTION_END)
    if start < 0 or end < start:
        return page.rstrip("\n") + "\n\n" + section + "\n"
    return page[:start] + section + page[end + len(SECTION_END) :]


def read_summaries(paths) -> list[dict]:
    """The JSON summaries at `paths` (OSError or ValueError for one that cannot be read)."""
    summaries = []
    for path in paths:
        with open(path) as f:
            summaries.append(json.load(f))
    return summaries


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m permllm_bench.scale", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("summaries", nargs="+", metavar="JSON", help="`permllm bench --json` files, one per model")
    parser.add_argument(
        "--pending", action="append", default=[], metavar="MODEL=WHY", help="a model not yet run, and why"
    )
    parser.add_argument(
        "--update", default=None, metavar="PAGE", help="rewrite the model-size section of this page (bench/RESULTS.md)"
    )
    args = parser.parse_args(argv)
    try:
        summaries = read_summaries(args.summaries)
        page = None if args.update is None else Path(args.update).read_text()
    except (OSError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    pending = [tuple(item.split("=", 1)) if "=" in item else (item, "") for item in args.pending]
    if page is None:
        print(scale_markdown(summaries, pending))
    else:
        Path(args.update).write_text(update_section(page, scale_section(summaries, pending)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
