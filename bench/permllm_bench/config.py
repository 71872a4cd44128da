"""The settings of `permllm bench`: the scenario, the full and quick presets, the command-line options and
their checks (every argument is checked before any work; ConfigError names the first bad one)."""

from __future__ import annotations

import math
import os
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


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default=MODEL,
        metavar="SPEC",
        help=f"the model every part runs: {MODEL} (the bundled {MODEL_LABEL}, default) or the path of a "
        "Llama-style checkpoint (a .gguf file, or a folder with config.json and the tokenizer, e.g. from "
        "`permllm make-checkpoint`)",
    )
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

    model: str = MODEL
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
    from permllm_bench.model_choice import check_bench_model

    model = check_bench_model(getattr(args, "model", MODEL))
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
        model=model,
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
