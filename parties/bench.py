"""`permllm bench`: token-latency benchmarks under simulated networks.

What it measures (SmolLM2-135M-Instruct, a fixed chat prompt of about 48 tokens, greedy decoding):

  sessions    owner, user and helper as three processes over ZeroMQ (parties.launcher's commands, CURVE
              on), one session per network profile (none, lan, wan, wan-slow): time to first token,
              decode seconds per token (median, p90), online bytes per token per direction, flights,
              offline and preparation cost, peak RSS of each party
  curve       the 'none' session again with the other security setting (CURVE off, or on with
              --insecure): what CURVE adds to set-up, preparation and per-token latency (full run only)
  floor       per profile: no-delay latency + flights x RTT/2 + bytes / bandwidth, and measured / floor
  plaintext   transformers' greedy generate of the same prompt on the same machine (s per token)
  breakdown   one decode step by layer part (SecureDecoder.step_hooks), owner and user in-process
  scaling     decode cost against prompt length and generated position (in-process, no delay)
  sweep       decode s per token against RTT with the floor beside it (in-process, netsim-wrapped
              in-memory channels, a few tokens per point; the profile is switched between tokens)
  permllm     PermLLM's published protocol cost for the same model shape, beside ours

    permllm bench --json bench/results/latest.json --plot bench/results/latency_vs_rtt.png --markdown bench/RESULTS.md

Everything heavy is imported lazily: `add_arguments`, the formulas and the formatting are cheap.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from permllm.errors import ConfigError

SCHEMA = 1
MODEL = "smollm2"
MODEL_LABEL = "SmolLM2-135M-Instruct"
# 49 tokens with SmolLM2's chat template (30 of them are the template's default system prompt)
SCENARIO_PROMPT = "Explain in two short sentences why the sky is blue during the day but often red at sunset."
PROFILE_NAMES = ("none", "lan", "wan", "wan-slow")
PARTS = ("sessions", "curve", "plaintext", "breakdown", "scaling", "sweep")
CURVE_FIGURES = ("ttft_s", "decode_s_per_token", "prepare_s", "offline_s", "wall_s")
BREAKDOWN_ORDER = (
    "embedding",
    "norm",
    "qkv",
    "scores",
    "softmax",
    "weighted_values",
    "out_proj",
    "mlp",
    "final_norm",
    "lm_head",
    "selection",
)
LAYER_PARTS = ("norm", "qkv", "scores", "softmax", "weighted_values", "out_proj", "mlp")
OUTSIDE_PARTS = ("embedding", "final_norm", "lm_head", "selection")
PART_LABELS = {
    "embedding": "embedding",
    "norm": "RMSNorms (2 per layer)",
    "qkv": "QKV projection + rescale",
    "scores": "attention scores QK^T",
    "softmax": "softmax",
    "weighted_values": "weighted values + rescale",
    "out_proj": "output projection",
    "mlp": "MLP (gate/up, SwiGLU, down)",
    "final_norm": "final RMSNorm",
    "lm_head": "lm_head",
    "selection": "selection (rest of the token)",
}
RATIO_LIMIT = 1.25
PROFILE_KEYS = (
    "name",
    "rtt_ms",
    "mbit_s",
    "ttft_s",
    "decode_s_per_token",
    "decode_s_per_token_p90",
    "floor_s_per_token",
    "ratio",
    "flights_per_token",
    "flights_per_layer",
    "online_bytes_per_token",
    "online_bytes_per_token_up",
    "online_bytes_per_token_down",
    "offline_s",
    "offline_bytes",
    "offline_s_per_token",
    "offline_bytes_per_token",
    "prepare_s",
    "prepare_bytes",
    "peak_rss_mb",
)

FULL = SimpleNamespace(
    max_new_tokens=32,
    sweep_rtt="0.2,1,5,10,20,50",
    sweep_tokens=4,
    scaling_prompts="16,64,256",
    scaling_positions="1,32,128",
    breakdown_tokens=8,
    skip=(),
)
QUICK = SimpleNamespace(
    max_new_tokens=4,
    sweep_rtt="0.2,1,5,10,20,50",
    sweep_tokens=1,
    scaling_prompts="16,64",
    scaling_positions="1,8",
    breakdown_tokens=4,
    skip=("curve",),
)
SCALING_WINDOW = 3  # decode steps per scaling figure (median over positions k, k+1, k+2)


# ================================================================================== arguments
def add_arguments(parser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the reduced set: {QUICK.max_new_tokens} generated tokens, {QUICK.sweep_tokens} token(s) "
        f"per sweep point, prompts {QUICK.scaling_prompts.replace(',', '/')}, positions "
        f"{QUICK.scaling_positions.replace(',', '/')}, no CURVE comparison "
        "(under 10 minutes on 2 cores)",
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, metavar="PATH", help="write every figure as JSON here"
    )
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="write a PNG of decode s/token against RTT (with the floor) here"
    )
    parser.add_argument(
        "--markdown",
        dest="markdown_path",
        default=None,
        metavar="PATH",
        help="write the results page (date, machine, command, the table, the plot) here, e.g. bench/RESULTS.md",
    )
    parser.add_argument(
        "--profiles",
        default=",".join(PROFILE_NAMES),
        help="comma-separated network profiles for the three-process sessions: names "
        "(none, lan, wan, wan-slow) or RTT_ms:Mbit_s; 'none' is always run "
        f"(it is the floor's no-delay term). Default {','.join(PROFILE_NAMES)}",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"generated tokens per session (default {FULL.max_new_tokens}, quick {QUICK.max_new_tokens}; at least 3)",
    )
    parser.add_argument("--prompt", default=None, help="the chat prompt (default: a fixed ~48-token one)")
    parser.add_argument(
        "--sweep-rtt",
        default=None,
        metavar="MS,MS,...",
        help=f"RTTs of the in-process sweep in ms (default {FULL.sweep_rtt})",
    )
    parser.add_argument(
        "--sweep-mbit", type=float, default=1000.0, help="bandwidth of the sweep in Mbit/s (default 1000)"
    )
    parser.add_argument(
        "--sweep-tokens",
        type=int,
        default=None,
        help=f"decode steps per sweep point (default {FULL.sweep_tokens}, quick {QUICK.sweep_tokens})",
    )
    parser.add_argument(
        "--scaling-prompts",
        default=None,
        metavar="N,N,...",
        help=f"prompt lengths of the scaling runs (default {FULL.scaling_prompts}, quick {QUICK.scaling_prompts})",
    )
    parser.add_argument(
        "--scaling-positions",
        default=None,
        metavar="K,K,...",
        help=f"generated positions of the scaling runs (default {FULL.scaling_positions}, "
        f"quick {QUICK.scaling_positions})",
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="PART,...",
        help=f"parts to leave out: {', '.join(PARTS)} (skipping sessions skips curve too)",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=1800.0,
        help="wall-clock limit of one three-process session in seconds (default 1800)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="run the sessions without CURVE encryption (default: encrypted, as the demo)",
    )


@dataclass
class BenchConfig:
    """Validated settings of one `permllm bench` run."""

    quick: bool = False
    profiles: list = field(default_factory=lambda: list(PROFILE_NAMES))
    max_new_tokens: int = FULL.max_new_tokens
    prompt: str = SCENARIO_PROMPT
    sweep_rtt_ms: list = field(default_factory=lambda: [0.2, 1.0, 5.0, 10.0, 20.0, 50.0])
    sweep_mbit_s: float = 1000.0
    sweep_tokens: int = FULL.sweep_tokens
    scaling_prompts: list = field(default_factory=lambda: [16, 64, 256])
    scaling_positions: list = field(default_factory=lambda: [1, 32, 128])
    breakdown_tokens: int = FULL.breakdown_tokens
    parts: tuple = PARTS
    json_path: str | None = None
    plot_path: str | None = None
    markdown_path: str | None = None
    session_timeout: float = 1800.0
    insecure: bool = False


def _number_list(text: str, flag: str, kind, minimum, maximum) -> list:
    if text is None or not str(text).strip():
        raise ConfigError(f"{flag}: give a comma-separated list of numbers")
    out = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = kind(item)
        except ValueError:
            raise ConfigError(f"{flag}: {item!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            raise ConfigError(f"{flag}: {item} is outside [{minimum:g}, {maximum:g}]")
        out.append(value)
    if len(set(out)) != len(out):
        raise ConfigError(f"{flag}: repeated value in {text!r}")
    return out


def _profile_spec(item: str) -> str:
    """A profile as parse_profile takes it; 'RTT:Mbit' is accepted for 'RTT,Mbit' (commas separate profiles)."""
    from netsim import parse_profile

    spec = item.strip().lower().replace(":", ",")
    try:
        parse_profile(spec)
    except ValueError as exc:
        raise ConfigError(f"--profiles: {exc} (write RTT_ms:Mbit_s inside the comma-separated list)") from None
    return spec


def _output_path(path: str | None, flag: str, suffix: str | None = None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not path.strip() or p.is_dir():
        raise ConfigError(f"{flag}: {path!r} is a folder, not a file")
    if suffix and p.suffix.lower() != suffix:
        raise ConfigError(f"{flag}: {path!r} should end in {suffix}")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag}: {str(parent)!r} is not a folder")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag}: cannot write into {str(parent)!r}")
    return str(p)


def config_from_args(args) -> BenchConfig:
    """Check every argument before any work; ConfigError names the first bad one."""
    preset = QUICK if getattr(args, "quick", False) else FULL
    skip = [s.strip() for s in (getattr(args, "skip", "") or "").split(",") if s.strip()]
    for s in skip:
        if s not in PARTS:
            raise ConfigError(f"--skip: unknown part {s!r}; choose from {', '.join(PARTS)}")
    skip += list(preset.skip)
    if "sessions" in skip:
        skip.append("curve")  # it compares against the 'none' session
    parts = tuple(p for p in PARTS if p not in skip)
    if not parts:
        raise ConfigError("--skip leaves nothing to run")

    profiles = []
    for item in str(getattr(args, "profiles", ",".join(PROFILE_NAMES)) or "").split(","):
        if item.strip():
            spec = _profile_spec(item)
            if spec in profiles:
                raise ConfigError(f"--profiles: {item.strip()!r} is listed twice")
            profiles.append(spec)
    if not profiles:
        raise ConfigError("--profiles: give at least one profile")
    if "none" not in profiles:
        profiles.insert(0, "none")  # the floor's no-delay term
    else:
        profiles.remove("none")
        profiles.insert(0, "none")

    max_new = getattr(args, "max_new_tokens", None)
    max_new = preset.max_new_tokens if max_new is None else max_new
    if not 3 <= max_new <= 512:
        raise ConfigError(f"--max-new-tokens must be between 3 and 512 (two decode steps at least), got {max_new}")
    prompt = getattr(args, "prompt", None)
    prompt = SCENARIO_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise ConfigError("--prompt is empty")

    sweep_rtt = _number_list(getattr(args, "sweep_rtt", None) or preset.sweep_rtt, "--sweep-rtt", float, 0.0, 1000.0)
    sweep_mbit = getattr(args, "sweep_mbit", 1000.0)
    sweep_mbit = 1000.0 if sweep_mbit is None else float(sweep_mbit)
    if not (math.isfinite(sweep_mbit) and sweep_mbit > 0):
        raise ConfigError(f"--sweep-mbit must be a positive number, got {sweep_mbit}")
    sweep_tokens = getattr(args, "sweep_tokens", None)
    sweep_tokens = preset.sweep_tokens if sweep_tokens is None else sweep_tokens
    if not 1 <= sweep_tokens <= 64:
        raise ConfigError(f"--sweep-tokens must be between 1 and 64, got {sweep_tokens}")
    prompts = _number_list(
        getattr(args, "scaling_prompts", None) or preset.scaling_prompts, "--scaling-prompts", int, 1, 1024
    )
    positions = _number_list(
        getattr(args, "scaling_positions", None) or preset.scaling_positions, "--scaling-positions", int, 1, 1024
    )
    timeout = float(getattr(args, "session_timeout", 1800.0) or 0)
    if not timeout > 0:
        raise ConfigError("--session-timeout must be positive")
    plot = _output_path(getattr(args, "plot", None), "--plot", ".png")
    if plot is not None:
        if "sweep" not in parts:
            raise ConfigError("--plot draws the RTT sweep: do not --skip sweep")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from None
    return BenchConfig(
        quick=bool(getattr(args, "quick", False)),
        profiles=profiles,
        max_new_tokens=max_new,
        prompt=prompt,
        sweep_rtt_ms=sorted(sweep_rtt),
        sweep_mbit_s=sweep_mbit,
        sweep_tokens=sweep_tokens,
        scaling_prompts=sorted(prompts),
        scaling_positions=sorted(positions),
        breakdown_tokens=preset.breakdown_tokens,
        parts=parts,
        json_path=_output_path(getattr(args, "json_path", None), "--json", ".json"),
        plot_path=plot,
        markdown_path=_output_path(getattr(args, "markdown_path", None), "--markdown", ".md"),
        session_timeout=timeout,
        insecure=bool(getattr(args, "insecure", False)),
    )


# ================================================================================== formulas
def profile_figures(spec: str) -> dict:
    """name, rtt_ms and mbit_s (None for unlimited bandwidth) of a profile spec."""
    from netsim import parse_profile

    p = parse_profile(spec)
    mbit = None if math.isinf(p.bandwidth_bps) else p.bandwidth_bps / 1e6
    return {"name": spec, "rtt_ms": p.rtt_s * 1e3, "mbit_s": mbit}


def floor_seconds(no_delay_s: float, flights: float, rtt_ms: float, nbytes: float, mbit_s: float | None) -> float:
    """The latency floor of one token: compute (the no-delay latency) plus every flight's one-way delay
    plus every byte (both directions, serialized) at the link's bandwidth (None: unlimited)."""
    if no_delay_s is None or flights is None or nbytes is None:
        raise ValueError("floor needs the no-delay latency, the flights and the bytes")
    if no_delay_s < 0 or flights < 0 or rtt_ms < 0 or nbytes < 0 or (mbit_s is not None and mbit_s <= 0):
        raise ValueError("floor: negative latency, flights, RTT or bytes, or non-positive bandwidth")
    transmit = 0.0 if mbit_s is None or math.isinf(mbit_s) else nbytes * 8 / (mbit_s * 1e6)
    return no_delay_s + flights * rtt_ms / 1e3 / 2 + transmit


def ratio(measured: float | None, floor: float | None) -> float | None:
    if measured is None or floor is None or floor <= 0:
        return None
    return measured / floor


PERMLLM_FORMULA = (
    "elements per layer = 15*h + 4*I + 5*H*L  [linear inputs QKV, out, MLP-in, MLP-out: 3h + I; "
    "appending Beaver QK^T, both send masked q and new k row: 4h; softmax 3 flights of H*L; "
    "appending Beaver scores.V, both send masked weights and new v row: 2(H*L + h); two LayerNorms 2*3h; "
    "GeLU 3*I]; per token outside the layers: masked one-hot embedding V, first LayerNorm 3h, lm_head h, "
    "permuted reveal of the logits 2V, plus the BFV ciphertexts; bytes = 4 * elements (float32 shares) + BFV; "
    "flights = 18 per layer + 1 (embedding) + 3 (first LayerNorm) + 1 (lm_head) + 2 (reveal) + 2 (BFV)"
)


def permllm_cost(
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    vocab: int,
    cache_len: int,
    *,
    bytes_per_element: int = 4,
    he_bytes: int = 0,
) -> dict:
    """PermLLM's online cost of one generated token for a model shape (see PERMLLM_FORMULA).

    cache_len: the KV cache length L after appending the new position. he_bytes: the BFV query and
    answer of the token choice (same scheme as ours; pass our measured size, 0 to leave it out)."""
    for name, v in (
        ("hidden", hidden),
        ("layers", layers),
        ("heads", heads),
        ("intermediate", intermediate),
        ("vocab", vocab),
        ("cache_len", cache_len),
        ("bytes_per_element", bytes_per_element),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    h, i, H, L = hidden, intermediate, heads, cache_len
    per_layer = 15 * h + 4 * i + 5 * H * L
    outside = vocab + 3 * h + h + 2 * vocab
    elements = layers * per_layer + outside
    flights_outside = 1 + 3 + 1 + 2 + 2
    return {
        "flights_per_layer": 18,
        "flights_per_token": 18 * layers + flights_outside,
        "elements_per_layer": per_layer,
        "elements_outside_layers": outside,
        "bytes_per_token": bytes_per_element * elements + he_bytes,
        "he_bytes": he_bytes,
        "cache_len": L,
        "bytes_per_element": bytes_per_element,
        "formula": PERMLLM_FORMULA,
    }


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _p90(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(0.9 * (len(values) - 1))))]


def complete_summary(summary: dict) -> dict:
    """Add the derived figures (floors, ratios, flights per layer, per-token offline, PermLLM) in place."""
    profiles = summary.get("profiles") or []
    none = next((p for p in profiles if p["name"] == "none"), None)
    no_delay = none.get("decode_s_per_token") if none else None
    layers = summary.get("model", {}).get("layers")
    outside = (summary.get("breakdown") or {}).get("outside_flights")
    if outside is None:
        outside = summary.get("model", {}).get("outside_flights_default")
    for p in profiles:
        p["floor_s_per_token"] = None
        if (
            no_delay is not None
            and p.get("flights_per_token") is not None
            and p.get("online_bytes_per_token") is not None
        ):
            p["floor_s_per_token"] = floor_seconds(
                no_delay, p["flights_per_token"], p["rtt_ms"], p["online_bytes_per_token"], p["mbit_s"]
            )
        p["ratio"] = ratio(p.get("decode_s_per_token"), p["floor_s_per_token"])
        p["within_limit"] = None if p["ratio"] is None else p["ratio"] <= RATIO_LIMIT
        fpt = p.get("flights_per_token")
        p["flights_per_layer"] = (
            (fpt - outside) / layers if fpt is not None and layers and outside is not None else None
        )
        gen = p.get("generated_tokens") or 0
        p["offline_s_per_token"] = p["offline_s"] / gen if gen and p.get("offline_s") is not None else None
        p["offline_bytes_per_token"] = p["offline_bytes"] / gen if gen and p.get("offline_bytes") is not None else None
    sweep = summary.get("sweep")
    if sweep and sweep.get("points"):
        base = next((q for q in sweep["points"] if q["rtt_ms"] == 0 and q["mbit_s"] is None), None)
        for q in sweep["points"]:
            q["floor_s_per_token"] = None
            if base and base.get("decode_s_per_token") is not None and q.get("flights") is not None:
                q["floor_s_per_token"] = floor_seconds(
                    base["decode_s_per_token"], q["flights"], q["rtt_ms"], q["bytes"], q["mbit_s"]
                )
            q["ratio"] = ratio(q.get("decode_s_per_token"), q["floor_s_per_token"])
    return summary


def curve_cost(encrypted: dict, plain: dict) -> dict:
    """What CURVE adds: the same session (profile, prompt, tokens) with encryption on and off."""
    added = {}
    for key in CURVE_FIGURES:
        on, off = encrypted.get(key), plain.get(key)
        added[key] = None if on is None or off is None else on - off
    return {
        "profile": encrypted.get("name"),
        "encrypted": {k: encrypted.get(k) for k in CURVE_FIGURES},
        "plain": {k: plain.get(k) for k in CURVE_FIGURES},
        "added": added,
        "same_tokens": encrypted.get("token_ids") == plain.get("token_ids"),
    }


# ================================================================================== formatting
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


def _grid(header: list[str], rows: list[list[str]], title: str | None = None) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(
        str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
        for i, (c, w) in enumerate(zip(cells, widths))
    )
    out = [] if title is None else [title]
    out += [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out)


def _mbit(p) -> str:
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
            row("RTT / bandwidth", lambda p: f"{p['rtt_ms']:g} ms / {_mbit(p)}"),
            row("time to first token", lambda p: fmt_s(p.get("ttft_s"))),
            row("decode s/token (median)", lambda p: fmt_s(p.get("decode_s_per_token"))),
            row("decode s/token (p90)", lambda p: fmt_s(p.get("decode_s_per_token_p90"))),
            row("floor s/token", lambda p: fmt_s(p.get("floor_s_per_token"))),
            row("measured / floor", lambda p: fmt_ratio(p.get("ratio"))),
            row("flights per token", lambda p: fmt_num(p.get("flights_per_token"))),
            row("flights per layer", lambda p: fmt_num(p.get("flights_per_layer"))),
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
        blocks.append(_grid(header, rows))
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
            _grid(
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
            _grid(
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
            _grid(
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
            _grid(
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
            _grid(
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
    return "\n".join(lines)


# ================================================================================== machine
def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu or platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch_version,
        "platform": platform.platform(),
    }


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _progress(total, desc, unit="it"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def _say(msg: str) -> None:
    print(f"permllm bench: {msg}", file=sys.stderr, flush=True)


# ================================================================================== three-process sessions
def run_session(
    network: str, prompt: str, max_new_tokens: int, *, timeout: float = 1800.0, insecure: bool = False, threads: int = 1
) -> dict:
    """One demo session (owner, helper, user as processes over ZeroMQ, the launcher's commands) under
    `network`; returns the launcher's merged summary plus profile figures and the session's wall time."""
    from parties.launcher import ROLES, free_ports, merge_reports, role_commands, stop_roles

    args = SimpleNamespace(
        network=network,
        timeout=300.0,
        setup_timeout=900.0,
        threads=threads,
        insecure=insecure,
        max_new_tokens=max_new_tokens,
        model=MODEL,
        prompt=prompt,
        temperature=None,
        top_k=None,
        top_p=None,
        seed=None,
        sample=False,
    )
    with tempfile.TemporaryDirectory(prefix="permllm-bench-") as tmp:
        reports = Path(tmp)
        commands = role_commands(args, free_ports(3), reports)
        for role in ("owner", "user"):
            commands[role].append("--quiet")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        processes: dict[str, subprocess.Popen] = {}
        logs = {}
        load_before = _loadavg()
        start = time.perf_counter()
        bar = _progress(None, f"session {network}", unit="s")
        failed = None
        try:
            for role in ROLES:
                logs[role] = open(reports / f"{role}.log", "wb")
                processes[role] = subprocess.Popen(commands[role], env=env, stdout=logs[role], stderr=subprocess.STDOUT)
            last = start
            while True:
                codes = {role: proc.poll() for role, proc in processes.items()}
                bad = [(r, c) for r, c in codes.items() if c not in (None, 0)]
                if bad:
                    failed = bad[0]
                    break
                if all(c == 0 for c in codes.values()):
                    break
                now = time.perf_counter()
                if now - start > timeout:
                    failed = ("session", f"timeout after {timeout:.0f} s")
                    break
                if now - last >= 1:
                    bar.update(round(now - last))
                    last += round(now - last)
                time.sleep(0.1)
        finally:
            bar.close()
            stop_roles(processes)
            for f in logs.values():
                f.close()
        wall = time.perf_counter() - start
        if failed:
            role, code = failed
            tails = []
            for r in ROLES:
                path = reports / f"{r}.log"
                if path.exists():
                    text = path.read_text(errors="replace").strip().splitlines()[-15:]
                    tails.append(f"--- {r} ---\n" + "\n".join(text))
            raise ConfigError(f"the {network!r} session failed: the {role} exited with {code}\n" + "\n".join(tails))
        raw = {role: json.loads((reports / f"{role}.json").read_text()) for role in ROLES}
    summary = merge_reports(raw, network=network)
    summary.update(profile_figures(network))
    summary["wall_s"] = wall
    summary["loadavg_before"], summary["loadavg_after"] = load_before, _loadavg()
    # the owner's "prepare" ends when its last masked weight is handed to the transport; the user's ends
    # when it holds them all (under netsim that includes the simulated transfer): report the latter
    summary["prepare_s_owner"] = summary["prepare_s"]
    summary["prepare_s"] = raw["user"]["phases_s"].get("prepare", summary["prepare_s"])
    summary["offline_wait_s_user"] = raw["user"]["phases_s"].get("offline")
    summary["owner_online_s"] = raw["owner"]["phases_s"].get("online")
    summary["user_online_s"] = raw["user"]["phases_s"].get("online")
    summary["material_left"] = raw["user"].get("material_left")
    return summary


# ================================================================================== plaintext
def plaintext_seconds_per_token(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_id=None) -> dict:
    """Greedy `generate` with transformers; s/token = median gap between consecutive token choices."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    stamp = Stamp()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=eos_id
        )  # warm-up
        start = time.perf_counter()
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos_id,
            logits_processor=LogitsProcessorList([stamp]),
        )
    steps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    return {
        "s_per_token": _median(steps),
        "s_per_token_p90": _p90(steps),
        "ttft_s": stamp.times[0] - start if stamp.times else None,
        "tokens": len(stamp.times),
        "token_ids": out[0, len(prompt_ids) :].tolist(),
        "threads": torch.get_num_threads(),
    }


# ================================================================================== in-process runs
class PartRecorder:
    """A SecureDecoder step hook: per named part, wall time, flight depth and bytes at begin and end."""

    def __init__(self):
        self.events = []  # (part, t0, t1, depth0, depth1, sent0, sent1, recv0, recv1)
        self._open = None

    def begin(self, part, ctx):
        ch = ctx.channel
        self._open = (part, time.perf_counter(), ch.clock.depth, ch.stats.bytes_sent, ch.stats.bytes_received)

    def end(self, part, ctx):
        ch = ctx.channel
        p, t0, d0, s0, r0 = self._open
        self.events.append(
            (p, t0, time.perf_counter(), d0, ch.clock.depth, s0, ch.stats.bytes_sent, r0, ch.stats.bytes_received)
        )

    def forwards(self) -> list[list[tuple]]:
        """Events split per forward call (each starts with 'embedding'); the norm right before lm_head is
        relabelled 'final_norm'."""
        out: list[list[tuple]] = []
        for i, e in enumerate(self.events):
            if e[0] == "embedding":
                out.append([])
            if e[0] == "norm" and i + 1 < len(self.events) and self.events[i + 1][0] == "lm_head":
                e = ("final_norm",) + e[1:]
            out[-1].append(e)
        return out


class DealMarks:
    """A step hook for the helper's dry run: dealing time and material bytes of every forward call."""

    def __init__(self):
        self.marks = []  # (time, owner record count) at the start of each forward
        self.dealer = None

    def begin(self, part, ctx):
        if part == "embedding":
            self.dealer = ctx.dealer
            self.marks.append((time.perf_counter(), len(ctx.dealer.owner_records)))

    def end(self, part, ctx):
        pass

    def per_forward(self, end_time: float, owner_records, user_records) -> list[dict]:
        bounds = self.marks + [(end_time, len(owner_records))]
        out = []
        for (t0, i0), (t1, i1) in zip(bounds, bounds[1:]):
            nbytes = sum(r.nbytes for r in owner_records[i0:i1]) + sum(r.nbytes for r in user_records[i0:i1])
            out.append({"seconds": t1 - t0, "bytes": nbytes, "calls": i1 - i0})
        return out


def switchable_netsim(inner, profile):
    """A netsim.NetSim whose link profile can be changed between tokens (`.switch(spec)`; the sweep)."""
    from netsim import NetSim

    class SwitchableNetSim(NetSim):
        def switch(self, spec) -> None:
            self.set_profile(spec)

    sim = SwitchableNetSim(inner, profile)
    if not hasattr(sim, "_link"):
        raise RuntimeError("netsim.NetSim changed: the sweep cannot switch its profile")
    return sim


@dataclass
class InProcessRun:
    tokens: list
    trace: object  # the user's GenerationTrace
    user_parts: PartRecorder | None
    owner_parts: PartRecorder | None
    dealing: list  # per forward: seconds, bytes, calls
    deal_s: float
    wall_s: float

    def steps(self, key: str = "time") -> list:
        t = self.trace
        if key == "time":
            marks = t.token_times
        elif key == "depth":
            marks = t.token_depths
        else:
            marks = [s + r for s, r in t.token_bytes]
        return [b - a for a, b in zip(marks, marks[1:])]


class InProcessBench:
    """One preparation (masked weights) reused by every in-process run of the benchmark.

    A real session prepares once per session; reusing it here only saves set-up time, it changes no
    per-token figure. Each run gets a fresh user seed and its own dealt material."""

    def __init__(self, weights):
        from parties.inprocess import Seeds
        from protocols.model.decoder_weights import DecoderArch, owner_weights, user_weight

        self.arch = DecoderArch.from_config(weights.config)
        self.owner_seed = Seeds.fresh().owner
        t0 = time.perf_counter()
        self.owner_w = owner_weights(weights, self.owner_seed)
        self.user_w = {name: user_weight(name, self.arch, w.local - w.mask) for name, w in self.owner_w.items()}
        self.masks = {name: w.mask for name, w in self.owner_w.items()}
        self.prepare_s = time.perf_counter() - t0

    def run(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        parts: bool = False,
        wrap_channel=None,
        on_token=None,
        desc: str = "in-process",
    ) -> InProcessRun:
        from parties.inprocess import Seeds, deal, run_pair
        from protocols.model.decoder_weights import helper_weights
        from protocols.model.generation import GenerationTrace, SamplingConfig, generate, token_chooser
        from protocols.model.secure_decoder import SecureDecoder

        arch, positions, prompt_len = self.arch, len(prompt_ids) + max_new_tokens, len(prompt_ids)
        seeds = Seeds(self.owner_seed, Seeds.fresh().user)
        marks = DealMarks()
        dry = SecureDecoder(arch, helper_weights(arch), positions)
        dry.step_hooks.append(marks)
        holder = {}

        def dry_run(ctx):
            generate(ctx, dry, prompt_len=prompt_len, max_new_tokens=max_new_tokens)
            holder["end"] = time.perf_counter()
            holder["records"] = (list(ctx.dealer.owner_records), list(ctx.dealer.user_records))

        t0 = time.perf_counter()
        owner_mat, user_mat = deal(dry_run, seeds, weight_mask=self.masks.__getitem__)
        deal_s = time.perf_counter() - t0
        dealing = marks.per_forward(holder.pop("end"), *holder.pop("records"))

        user_parts, owner_parts = (PartRecorder(), PartRecorder()) if parts else (None, None)
        owner_dec = SecureDecoder(arch, self.owner_w, positions)
        user_dec = SecureDecoder(arch, self.user_w, positions)
        if parts:
            owner_dec.step_hooks.append(owner_parts)
            user_dec.step_hooks.append(user_parts)
        trace = GenerationTrace()
        choose = token_chooser(SamplingConfig())
        bar = _progress(max_new_tokens, desc, unit="tok")

        def token_seen(token):
            bar.update(1)
            if on_token is not None:
                on_token(token)

        def owner(ctx):
            return generate(ctx, owner_dec, prompt_len=prompt_len, max_new_tokens=max_new_tokens)

        def user(ctx):
            return generate(
                ctx,
                user_dec,
                prompt_len=prompt_len,
                max_new_tokens=max_new_tokens,
                prompt_ids=list(prompt_ids),
                choose=choose,
                on_token=token_seen,
                trace=trace,
            )

        t1 = time.perf_counter()
        try:
            pair = run_pair(owner, user, owner_mat, user_mat, wrap_channel=wrap_channel, timeout=3600.0)
        finally:
            bar.close()
        return InProcessRun(
            tokens=pair.user,
            trace=trace,
            user_parts=user_parts,
            owner_parts=owner_parts,
            dealing=dealing,
            deal_s=deal_s,
            wall_s=time.perf_counter() - t1,
        )


def bfv_token_bytes(vocab: int) -> int:
    """Bytes of one BFV token query and its answer (the ciphertexts of the token choice), measured."""
    import numpy as np

    from permllm.he import IndexLookupClient, IndexLookupServer

    client = IndexLookupClient(vocab)
    server = IndexLookupServer(client.public_context())
    query = client.query(0)
    answer = server.answer(query, np.arange(vocab, dtype=np.int64))
    return sum(len(q) for q in query) + len(answer)


def breakdown_from_run(run: InProcessRun, layers: int, prompt_tokens: int) -> dict:
    """Per-part medians over the decode steps of a run with part recorders (user's view; owner's too)."""
    user_fw, owner_fw = run.user_parts.forwards(), run.owner_parts.forwards()
    times, depths, bytes_marks = run.trace.token_times, run.trace.token_depths, run.trace.token_bytes
    per_step = []
    for s in range(1, len(times)):
        if s >= len(user_fw):
            break
        step_s = times[s] - times[s - 1]
        step_f = depths[s] - depths[s - 1]
        up = bytes_marks[s][0] - bytes_marks[s - 1][0]
        down = bytes_marks[s][1] - bytes_marks[s - 1][1]
        acc = {
            p: {
                "seconds": 0.0,
                "flights": 0,
                "bytes_user_to_owner": 0,
                "bytes_owner_to_user": 0,
                "calls": 0,
                "owner_seconds": 0.0,
                "owner_flights": 0,
            }
            for p in BREAKDOWN_ORDER
        }
        for e in user_fw[s]:
            a = acc[e[0]]
            a["seconds"] += e[2] - e[1]
            a["flights"] += e[4] - e[3]
            a["bytes_user_to_owner"] += e[6] - e[5]
            a["bytes_owner_to_user"] += e[8] - e[7]
            a["calls"] += 1
        for e in owner_fw[s] if s < len(owner_fw) else []:
            acc[e[0]]["owner_seconds"] += e[2] - e[1]
            acc[e[0]]["owner_flights"] += e[4] - e[3]
        sel = acc["selection"]
        named = [acc[p] for p in BREAKDOWN_ORDER if p != "selection"]
        sel["seconds"] = step_s - sum(a["seconds"] for a in named)
        sel["flights"] = step_f - sum(a["flights"] for a in named)
        sel["bytes_user_to_owner"] = up - sum(a["bytes_user_to_owner"] for a in named)
        sel["bytes_owner_to_user"] = down - sum(a["bytes_owner_to_user"] for a in named)
        per_step.append((step_s, step_f, up, down, acc))
    if not per_step:
        raise ValueError("the breakdown run has no decode step")
    parts = []
    for p in BREAKDOWN_ORDER:
        vals = [st[4][p] for st in per_step]
        parts.append({"part": p, "label": PART_LABELS[p], **{k: _median([v[k] for v in vals]) for k in vals[0]}})
    in_layer = sum(r["flights"] for r in parts if r["part"] in LAYER_PARTS)
    outside = sum(r["flights"] for r in parts if r["part"] in OUTSIDE_PARTS)
    dealing = run.dealing[1 : len(run.trace.token_times)]
    return {
        "mode": "in-process owner+user threads, in-memory channel, no delay",
        "steps": len(per_step),
        "prompt_tokens": prompt_tokens,
        "cache_length": prompt_tokens + (len(per_step) + 1) // 2,
        "step_s": _median([st[0] for st in per_step]),
        "flights": _median([st[1] for st in per_step]),
        "bytes_user_to_owner": _median([st[2] for st in per_step]),
        "bytes_owner_to_user": _median([st[3] for st in per_step]),
        "parts": parts,
        "layer_flights": in_layer,
        "flights_per_layer": in_layer / layers,
        "outside_flights": outside,
        "offline_per_token": {
            "seconds": _median([d["seconds"] for d in dealing]),
            "bytes": _median([d["bytes"] for d in dealing]),
            "calls": _median([d["calls"] for d in dealing]),
        }
        if dealing
        else None,
        "step_seconds_all": [st[0] for st in per_step],
    }


def scaling_rows(run: InProcessRun, prompt_tokens: int, positions: list[int]) -> list[dict]:
    """Decode figures at generated positions (median over SCALING_WINDOW steps from each position)."""
    times, depths, nbytes = run.steps("time"), run.steps("depth"), run.steps("bytes")
    rows = []
    for k in positions:
        window = list(range(k - 1, min(k - 1 + SCALING_WINDOW, len(times))))
        if not window or window[0] >= len(times):
            continue
        deal = run.dealing[k] if k < len(run.dealing) else None
        rows.append(
            {
                "prompt_tokens": prompt_tokens,
                "position": k,
                "cache_length": prompt_tokens + k,
                "decode_s_per_token": _median([times[i] for i in window]),
                "steps": len(window),
                "flights": depths[k - 1],
                "bytes": nbytes[k - 1],
                "offline_bytes": deal["bytes"] if deal else None,
                "offline_s": deal["seconds"] if deal else None,
            }
        )
    return rows


def prompt_of_length(tokenizer, n: int) -> list[int]:
    """n chat-templated token ids (a long chat prompt, truncated or repeated: only the length matters here)."""
    from permllm.model.prompts import FIDELITY_PROMPTS, chat_token_ids

    text = " ".join(FIDELITY_PROMPTS[-4:])
    ids = chat_token_ids(tokenizer, text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_sweep(
    bench: InProcessBench, prompt_ids: list[int], rtts_ms: list[float], mbit_s: float, per_point: int
) -> dict:
    """One in-process session whose link profile changes every `per_point` decode steps."""
    specs = [("none", 0.0, None)] + [(f"{r:g},{mbit_s:g}", r, mbit_s) for r in rtts_ms]
    sims = []

    def wrap(channel):
        sim = switchable_netsim(channel, "none")
        sims.append(sim)
        return sim

    seen = [0]

    def on_token(_token):
        # called on the user's thread after token i is chosen, before it tells the owner to go on: no
        # frame is in flight, so both ends can switch to the next point's profile here
        point = seen[0] // per_point
        seen[0] += 1
        if point < len(specs):
            for sim in sims:
                sim.switch(specs[point][0])

    run = bench.run(
        prompt_ids, 1 + per_point * len(specs), wrap_channel=wrap, on_token=on_token, desc="RTT sweep (in-process)"
    )
    times, depths, nbytes = run.steps("time"), run.steps("depth"), run.steps("bytes")
    points = []
    for i, (spec, rtt, mbit) in enumerate(specs):
        idx = list(range(i * per_point, min((i + 1) * per_point, len(times))))
        points.append(
            {
                "spec": spec,
                "rtt_ms": rtt,
                "mbit_s": mbit,
                "decode_s_per_token": _median([times[j] for j in idx]),
                "steps_s": [times[j] for j in idx],
                "flights": _median([depths[j] for j in idx]),
                "bytes": _median([nbytes[j] for j in idx]),
            }
        )
    return {
        "mode": f"in-process owner+user threads over netsim-wrapped in-memory channels, {mbit_s:g} Mbit/s, "
        f"{per_point} decode step(s) per point, prompt {len(prompt_ids)} tokens",
        "mbit_s": mbit_s,
        "tokens_per_point": per_point,
        "prompt_tokens": len(prompt_ids),
        "points": points,
    }


# ================================================================================== plot
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
                f"{p['name']} ({_mbit(p)})",
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


# ================================================================================== driver
def _model_shape(arch) -> dict:
    return {
        "hidden": arch.hidden,
        "layers": arch.layers,
        "heads": arch.heads,
        "kv_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "intermediate": arch.intermediate,
        "vocab": arch.vocab,
        "outside_flights_default": 6,
    }


def _command_line() -> str:
    argv = sys.argv[1:]
    if not argv or argv[0] != "bench":
        argv = ["bench", *argv]
    return "permllm " + shlex.join(argv)


def run_bench(args) -> int:
    cfg = config_from_args(args)
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary: dict = {
        "schema": SCHEMA,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "quick": cfg.quick,
        "machine": {**machine_info(), "loadavg_start": _loadavg()},
        "scenario": {"model": MODEL_LABEL, "prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens, "greedy": True},
        "profiles": [],
    }
    from parties.models import load_tokenizer
    from permllm.model.prompts import chat_token_ids

    tokenizer = load_tokenizer(MODEL)
    prompt_ids = chat_token_ids(tokenizer, cfg.prompt)
    summary["scenario"]["prompt_tokens"] = len(prompt_ids)
    stages = [p for p in cfg.parts]
    overall = _progress(
        len(stages) + (len(cfg.profiles) - 1 if "sessions" in cfg.parts else 0), "permllm bench", unit="stage"
    )
    try:
        if "sessions" in cfg.parts:
            for spec in cfg.profiles:
                _say(f"three-process session under '{spec}' ({cfg.max_new_tokens} tokens)")
                s = run_session(
                    spec, cfg.prompt, cfg.max_new_tokens, timeout=cfg.session_timeout, insecure=cfg.insecure
                )
                s["name"] = spec
                summary["profiles"].append(s)
                overall.update(1)
        if "curve" in cfg.parts:
            state = "on" if cfg.insecure else "off"
            _say(f"the 'none' session again with CURVE {state} ({cfg.max_new_tokens} tokens)")
            other = run_session(
                "none", cfg.prompt, cfg.max_new_tokens, timeout=cfg.session_timeout, insecure=not cfg.insecure
            )
            other["name"] = "none"
            none = summary["profiles"][0]
            summary["curve"] = curve_cost(other, none) if cfg.insecure else curve_cost(none, other)
            overall.update(1)
        import torch

        torch.set_num_threads(1)  # the parties run one compute thread each, as in the demo
        need_model = any(p in cfg.parts for p in ("plaintext", "breakdown", "scaling", "sweep"))
        if need_model:
            from permllm.model.loading import decoder_weights_from_hf, find_smollm2_gguf, load_hf_decoder

            _say("loading the model in this process (plaintext baseline and in-process runs)")
            hf_model, _ = load_hf_decoder(find_smollm2_gguf(), tokenizer=False)
            if "plaintext" in cfg.parts:
                _say("plaintext transformers generate")
                eos = tokenizer.eos_token_id
                plain = plaintext_seconds_per_token(hf_model, prompt_ids, cfg.max_new_tokens, eos)
                private = next((p.get("token_ids") for p in summary["profiles"] if p.get("token_ids")), None)
                if private:
                    n = min(len(private), len(plain["token_ids"]))
                    plain["matches_private"] = plain["token_ids"][:n] == private[:n]
                summary["plaintext"] = plain
                overall.update(1)
            if any(p in cfg.parts for p in ("breakdown", "scaling", "sweep")):
                weights = decoder_weights_from_hf(hf_model)
            del hf_model
        if any(p in cfg.parts for p in ("breakdown", "scaling", "sweep")):
            _say("in-process preparation (masked weights), reused by the in-process runs")
            bench = InProcessBench(weights)
            del weights
            arch = bench.arch
            summary["model"] = _model_shape(arch)
            if "breakdown" in cfg.parts:
                _say("breakdown of a decode step by layer part (in-process, no delay)")
                run = bench.run(prompt_ids, cfg.breakdown_tokens, parts=True, desc="breakdown (in-process)")
                summary["breakdown"] = breakdown_from_run(run, arch.layers, len(prompt_ids))
                overall.update(1)
            if "scaling" in cfg.parts:
                _say("scaling with prompt length and generated position (in-process, no delay)")
                rows = []
                first, *others = cfg.scaling_prompts
                longest = max(cfg.scaling_positions)
                run = bench.run(
                    prompt_of_length(tokenizer, first),
                    longest + SCALING_WINDOW,
                    desc=f"scaling prompt {first} (in-process)",
                )
                rows += scaling_rows(run, first, cfg.scaling_positions)
                for n in others:
                    run = bench.run(
                        prompt_of_length(tokenizer, n), 1 + SCALING_WINDOW, desc=f"scaling prompt {n} (in-process)"
                    )
                    rows += scaling_rows(run, n, [1])
                summary["scaling"] = {
                    "mode": "in-process owner+user threads, no delay; median of "
                    f"{SCALING_WINDOW} steps from each position",
                    "rows": rows,
                }
                overall.update(1)
            if "sweep" in cfg.parts:
                _say(f"RTT sweep {cfg.sweep_rtt_ms} ms (in-process, netsim-wrapped in-memory channels)")
                summary["sweep"] = run_sweep(
                    bench, prompt_of_length(tokenizer, 16), cfg.sweep_rtt_ms, cfg.sweep_mbit_s, cfg.sweep_tokens
                )
                overall.update(1)
            summary["inprocess_prepare_s"] = bench.prepare_s
            del bench
        else:
            summary["model"] = {
                "hidden": 576,
                "layers": 30,
                "heads": 9,
                "kv_heads": 3,
                "head_dim": 64,
                "intermediate": 1536,
                "vocab": 49152,
                "outside_flights_default": 6,
            }
    finally:
        overall.close()

    complete_summary(summary)
    shape = summary["model"]
    he_bytes = bfv_token_bytes(shape["vocab"])
    ref = next((p for p in summary["profiles"] if p["name"] == "wan"), None) or (
        summary["profiles"][0] if summary["profiles"] else None
    )
    cache_len = len(prompt_ids) + max(1, cfg.max_new_tokens // 2)
    pl = permllm_cost(
        shape["hidden"],
        shape["layers"],
        shape["heads"],
        shape["intermediate"],
        shape["vocab"],
        cache_len,
        he_bytes=he_bytes,
    )
    bd = summary.get("breakdown") or {}
    pl["ours"] = {
        "flights_per_layer": (ref or {}).get("flights_per_layer") or bd.get("flights_per_layer"),
        "flights_per_token": (ref or {}).get("flights_per_token") or bd.get("flights"),
        "bytes_per_token": (ref or {}).get("online_bytes_per_token")
        or ((bd.get("bytes_user_to_owner") or 0) + (bd.get("bytes_owner_to_user") or 0))
        or None,
    }
    summary["permllm"] = pl
    summary["machine"]["loadavg_end"] = _loadavg()
    summary["wall_s"] = time.perf_counter() - t_start
    print(format_table(summary))
    print(f"\n(bench wall time {summary['wall_s']:.0f} s)")
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(summary, indent=2))
        _say(f"wrote {cfg.json_path}")
    if cfg.plot_path:
        Path(cfg.plot_path).parent.mkdir(parents=True, exist_ok=True)
        write_plot(summary, cfg.plot_path)
        _say(f"wrote {cfg.plot_path}")
    if cfg.markdown_path:
        Path(cfg.markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.markdown_path).write_text(results_markdown(summary, cfg.markdown_path, cfg.plot_path, cfg.json_path))
        _say(f"wrote {cfg.markdown_path}")
    return 0
