"""The bench's reports: the terminal table of a completed summary and the results page (bench/RESULTS.md)."""

from __future__ import annotations

import os
from pathlib import Path

from permllm_bench.analysis import PART_LABELS
from permllm_bench.config import MODEL_LABEL
from permllm_bench.cost_model import CURVE_FIGURES, RATIO_LIMIT
from permllm_bench.tables import fmt_bytes, fmt_num, fmt_ratio, fmt_s, fmt_signed_s, grid

# the model-size notes (bench/SCALE.md) and the summaries of its runs (bench/results/scale-*.json), whose
# table the results page carries when they are there
SCALE_PAGE = Path(__file__).resolve().parent.parent / "SCALE.md"
SCALE_RUNS = Path(__file__).resolve().parent.parent / "results"


def mbit_label(p) -> str:
    return "unlimited" if p.get("mbit_s") is None else f"{p['mbit_s']:g} Mbit/s"


def format_table(summary: dict) -> str:
    """The terminal report of a (completed) bench summary."""
    blocks = []
    sc = summary.get("scenario", {})
    m = summary.get("machine", {})
    blocks.append(
        f"permllm bench ({'quick' if summary.get('quick') else 'full'}): {sc.get('model', MODEL_LABEL)}, "
        f"{sc.get('prompt_tokens', '?')}-token chat prompt, {sc.get('max_new_tokens', '?')} generated "
        f"tokens, greedy; {m.get('cores', '?')} cores ({m.get('cpu_model', '?')}), load average "
        f"{m.get('loadavg_start', '?')} -> {m.get('loadavg_end', '?')}"
    )
    profiles = summary.get("profiles") or []
    plain = summary.get("plaintext") or {}
    if profiles:
        header = ["three processes over ZeroMQ"] + [p["name"] for p in profiles]

        def row(label, fn):
            return [label] + [fn(p) for p in profiles]

        rows = [
            row("RTT / bandwidth", lambda p: f"{p['rtt_ms']:g} ms / {mbit_label(p)}"),
            row("time to first token", lambda p: fmt_s(p.get("ttft_s"))),
            row("decode s/token (median)", lambda p: fmt_s(p.get("decode_s_per_token"))),
            row("decode s/token (p90)", lambda p: fmt_s(p.get("decode_s_per_token_p90"))),
            row("floor s/token", lambda p: fmt_s(p.get("floor_s_per_token"))),
            row("measured / floor", lambda p: fmt_ratio(p.get("ratio"))),
            row("flights per token", lambda p: fmt_num(p.get("flights_per_token"))),
            row("flights per layer (decode)", lambda p: fmt_num(p.get("flights_per_layer"))),
            row("flights per layer (prefill)", lambda p: fmt_num(p.get("prefill_flights_per_layer"))),
            row("online bytes/token (total)", lambda p: fmt_bytes(p.get("online_bytes_per_token"))),
            row("  user -> owner", lambda p: fmt_bytes(p.get("online_bytes_per_token_up"))),
            row("  owner -> user", lambda p: fmt_bytes(p.get("online_bytes_per_token_down"))),
            row(
                "prefill flights / bytes",
                lambda p: f"{fmt_num(p.get('prefill_flights'))} / {fmt_bytes(p.get('prefill_bytes'))}",
            ),
            row(
                "offline s / bytes (session)",
                lambda p: f"{fmt_s(p.get('offline_s'))} / {fmt_bytes(p.get('offline_bytes'))}",
            ),
            row(
                "offline per generated token (incl. prefill)",
                lambda p: f"{fmt_s(p.get('offline_s_per_token'))} / {fmt_bytes(p.get('offline_bytes_per_token'))}",
            ),
            row(
                "preparation (W-U at user) s / bytes",
                lambda p: f"{fmt_s(p.get('prepare_s'))} / {fmt_bytes(p.get('prepare_bytes'))}",
            ),
            row("model load (owner)", lambda p: fmt_s(p.get("model_load_s"))),
            row(
                "peak RSS owner/user/helper MB",
                lambda p: "/".join(
                    f"{(p.get('peak_rss_mb') or {}).get(r, 0):.0f}" for r in ("owner", "user", "helper")
                ),
            ),
            row("session wall time", lambda p: fmt_s(p.get("wall_s"))),
            row(
                "load average before -> after",
                lambda p: (
                    f"{p.get('loadavg_before', '?').split('/')[0]} -> {p.get('loadavg_after', '?').split('/')[0]}"
                ),
            ),
            row("plaintext transformers s/token", lambda p: fmt_s(plain.get("s_per_token"))),
        ]
        blocks.append(grid(header, rows))
        blocks.append(
            "floor = no-delay decode latency (the 'none' session) + flights x RTT/2 + online bytes "
            "(both directions) / bandwidth; '!' marks measured > 1.25 x floor"
        )
        bad = [p["name"] for p in profiles if p.get("ratio") is not None and p["ratio"] > RATIO_LIMIT]
        if bad:
            blocks.append(f"NOTE: {', '.join(bad)} above 1.25 x floor; see the breakdown and bench/RESULTS.md")
    cv = summary.get("curve")
    if cv:
        labels = {
            "ttft_s": "time to first token",
            "decode_s_per_token": "decode s/token (median)",
            "prepare_s": "preparation (W-U at user)",
            "offline_s": "offline (helper's material)",
            "wall_s": "session wall time",
        }
        rows = [
            [labels[k], fmt_s(cv["encrypted"].get(k)), fmt_s(cv["plain"].get(k)), fmt_signed_s(cv["added"].get(k))]
            for k in CURVE_FIGURES
        ]
        blocks.append(
            grid(
                ["CURVE", "on", "off", "added by CURVE"],
                rows,
                title=f"cost of CURVE encryption (three processes, profile {cv.get('profile')}); "
                f"same tokens with and without: {cv.get('same_tokens')}",
            )
        )
    if plain:
        blocks.append(
            f"plaintext: transformers greedy generate, same prompt, {plain.get('threads')} thread(s): "
            f"{fmt_s(plain.get('s_per_token'))} per token, first token {fmt_s(plain.get('ttft_s'))}; "
            f"same tokens as the private run: {plain.get('matches_private', '-')}"
        )
    bd = summary.get("breakdown")
    if bd and bd.get("parts"):
        total = bd.get("step_s") or 0
        rows = [
            [
                PART_LABELS.get(r["part"], r["part"]),
                fmt_s(r["seconds"]),
                f"{100 * r['seconds'] / total:.0f}%" if total else "-",
                fmt_num(r["flights"]),
                fmt_bytes(r["bytes_user_to_owner"]),
                fmt_bytes(r["bytes_owner_to_user"]),
            ]
            for r in bd["parts"]
        ]
        rows.append(
            [
                "total (one decode step)",
                fmt_s(total),
                "100%",
                fmt_num(bd.get("flights")),
                fmt_bytes(bd.get("bytes_user_to_owner")),
                fmt_bytes(bd.get("bytes_owner_to_user")),
            ]
        )
        blocks.append(
            grid(
                ["part", "seconds", "share", "flights", "user->owner", "owner->user"],
                rows,
                title=f"breakdown of one decode step ({bd.get('mode')}; user's view, median of "
                f"{bd.get('steps')} steps at cache length ~{bd.get('cache_length')}):",
            )
        )
        off = bd.get("offline_per_token") or {}
        if off:
            blocks.append(
                f"offline (helper's dealing) per decode token: {fmt_s(off.get('seconds'))}, "
                f"{fmt_bytes(off.get('bytes'))} of material"
            )
    sca = summary.get("scaling")
    if sca and sca.get("rows"):
        rows = [
            [
                fmt_num(r["prompt_tokens"]),
                fmt_num(r["position"]),
                fmt_num(r["cache_length"]),
                fmt_s(r["decode_s_per_token"]),
                fmt_num(r["flights"]),
                fmt_bytes(r["bytes"]),
                fmt_bytes(r.get("offline_bytes")),
            ]
            for r in sca["rows"]
        ]
        blocks.append(
            grid(
                ["prompt", "position", "cache", "decode s/token", "flights", "online bytes", "offline bytes"],
                rows,
                title=f"scaling with the KV cache ({sca.get('mode')}):",
            )
        )
    sw = summary.get("sweep")
    if sw and sw.get("points"):
        rows = [
            [
                f"{q['rtt_ms']:g}" if q["mbit_s"] is not None else "none",
                fmt_s(q["decode_s_per_token"]),
                fmt_s(q.get("floor_s_per_token")),
                fmt_ratio(q.get("ratio")),
                fmt_num(q["flights"]),
                fmt_bytes(q["bytes"]),
            ]
            for q in sw["points"]
        ]
        blocks.append(
            grid(
                ["RTT ms", "decode s/token", "floor", "ratio", "flights", "bytes"],
                rows,
                title=f"RTT sweep ({sw.get('mode')}):",
            )
        )
    pl = summary.get("permllm")
    if pl:
        ours = pl.get("ours", {})
        rows = [
            ["flights per layer", fmt_num(pl["flights_per_layer"]), fmt_num(ours.get("flights_per_layer"))],
            ["flights per token", fmt_num(pl["flights_per_token"]), fmt_num(ours.get("flights_per_token"))],
            ["online bytes per token", fmt_bytes(pl["bytes_per_token"]), fmt_bytes(ours.get("bytes_per_token"))],
            ["share encoding", f"float32 ({pl['bytes_per_element']} B)", "Z_2^64 (8 B)"],
        ]
        blocks.append(
            grid(
                ["per generated token", "PermLLM (published protocol)", "permllm (measured)"],
                rows,
                title=f"PermLLM's protocol for the same shape (cache length {pl['cache_len']}, BFV "
                f"{fmt_bytes(pl['he_bytes'])} included):",
            )
        )
    return "\n\n".join(blocks)


def results_markdown(summary: dict, path: str, plot_path: str | None, json_path: str | None) -> str:
    """The results page of a run: what was measured, where, with which command, the table and the plot."""
    m, sc = summary.get("machine", {}), summary.get("scenario", {})
    here = Path(path).resolve().parent

    def link(p):
        return os.path.relpath(Path(p).resolve(), here)

    lines = [
        "# permllm token-latency benchmarks",
        "",
        f"Measured {summary.get('date', '?')} on {m.get('cores', '?')} cores ({m.get('cpu_model', '?')}), "
        f"Python {m.get('python', '?')}, torch {m.get('torch', '?')}, {m.get('platform', '?')}; load average "
        f"{m.get('loadavg_start', '?')} at the start, {m.get('loadavg_end', '?')} at the end; "
        f"{'quick' if summary.get('quick') else 'full'} run, {summary.get('wall_s', 0) / 60:.0f} minutes in all.",
        "",
        f"Scenario: {sc.get('model', MODEL_LABEL)}, a {sc.get('prompt_tokens', '?')}-token chat prompt "
        f'("{sc.get("prompt", "")}"), {sc.get("max_new_tokens", "?")} generated tokens, greedy; owner, user and '
        "helper as three processes over ZeroMQ (CURVE on unless the command says --insecure) under netsim.",
        "",
        "Regenerate (this page, the JSON and the plot):",
        "",
        "```bash",
        summary.get("command", "permllm bench"),
        "```",
        "",
        "Every figure is measured: bytes are serialized frames counted by the channels, flights the depth "
        "of the critical path carried in every frame, times wall-clock on this machine. The floor of a "
        "profile is the no-delay decode latency plus flights x RTT/2 plus the online bytes over the "
        f"bandwidth; the engine's target is measured / floor <= {RATIO_LIMIT}.",
        "",
    ]
    profiles = [p for p in summary.get("profiles") or [] if p.get("ratio") is not None]
    if profiles:
        within = [p["name"] for p in profiles if p["ratio"] <= RATIO_LIMIT]
        above = [f"{p['name']} ({p['ratio']:.2f})" for p in profiles if p["ratio"] > RATIO_LIMIT]
        lines += [
            f"Within {RATIO_LIMIT} x floor: {', '.join(within) or 'none'}."
            + (f" Above: {', '.join(above)}; the breakdown below shows where the time goes." if above else ""),
            "",
        ]
    if plot_path:
        lines += [f"![decode seconds per token against RTT, with the floor]({link(plot_path)})", ""]
    if json_path:
        lines += [f"Every figure, as JSON: [{os.path.basename(json_path)}]({link(json_path)}).", ""]
    lines += ["```text", format_table(summary), "```", ""]
    runs = sorted(SCALE_RUNS.glob("scale-*.json"))
    if runs and SCALE_PAGE.is_file():
        from permllm_bench.scale import read_summaries, scale_section

        lines += [scale_section(read_summaries(runs), notes=link(SCALE_PAGE)), ""]
    return "\n".join(lines)
