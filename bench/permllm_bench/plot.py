"""The bench's plot: decode seconds per token against RTT (the in-process sweep), with the floor beside it
and the three-process sessions as points."""

from __future__ import annotations

from permllm_bench.config import MODEL_LABEL
from permllm_bench.report import mbit_label


def write_plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sw = summary["sweep"]
    pts = [q for q in sw["points"] if q["mbit_s"] is not None]
    base = next((q for q in sw["points"] if q["mbit_s"] is None), None)
    x = [q["rtt_ms"] for q in pts]
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    ax.plot(x, [q["decode_s_per_token"] for q in pts], "o-", color="C0", label="measured (in-process, netsim)")
    ax.plot(
        x,
        [q["floor_s_per_token"] for q in pts],
        "s--",
        color="C1",
        label="floor = no-delay + flights x RTT/2 + bytes/bandwidth",
    )
    if base:
        ax.axhline(base["decode_s_per_token"], color="grey", lw=0.8, ls=":", label="no delay (in-process)")
    labelled = False
    for p in summary.get("profiles") or []:
        if p["name"] != "none" and p.get("decode_s_per_token") is not None and p["rtt_ms"] > 0:
            ax.plot(
                [p["rtt_ms"]],
                [p["decode_s_per_token"]],
                "^",
                color="C2",
                ms=8,
                label=None if labelled else "three-process session (ZeroMQ, netsim profile)",
            )
            labelled = True
            left = bool(x) and p["rtt_ms"] <= min(x)
            ax.annotate(
                f"{p['name']} ({mbit_label(p)})",
                (p["rtt_ms"], p["decode_s_per_token"]),
                textcoords="offset points",
                xytext=(8, -14) if left else (-8, 4),
                ha="left" if left else "right",
                fontsize=8,
                color="C2",
            )
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("round-trip time (ms), log scale")
    ax.set_ylabel("decode seconds per token (median)")
    sc = summary.get("scenario", {})
    ax.set_title(
        f"{sc.get('model', MODEL_LABEL)} private decode latency vs RTT\n"
        f"sweep: in-process owner+user over netsim ({sw['mbit_s']:g} Mbit/s), "
        f"{sw['tokens_per_point']} step(s) per point, {sw['prompt_tokens']}-token prompt",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
