"""`permllm bench`: token-latency benchmarks under simulated networks.

What it measures (SmolLM2-135M-Instruct, or the checkpoint of --model; a fixed chat prompt of about 48
tokens, greedy decoding):

  sessions    owner, user and helper as three processes over ZeroMQ (parties.launcher's commands, CURVE
              on), one session per network profile (none, lan, wan, wan-slow): time to first token,
              decode seconds per token (median, p90), online bytes per token per direction, flights
              (per token, and per layer for a decode step and for the prefill), offline and preparation
              cost, peak RSS of each party
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
    permllm bench --model /tmp/smollm2-360m --quick --skip sweep,scaling   (a bigger shape: bench/SCALE.md)

The command reaches `permllm` through the entry-point group "permllm.commands" (`COMMAND`). Everything
heavy is imported lazily: the options, the formulas and the formatting are cheap.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

from permllm_bench.config import SCALING_WINDOW, SCHEMA, add_arguments, config_from_args
from permllm_bench.cost_model import bfv_token_bytes, complete_summary, curve_cost, permllm_cost
from permllm_bench.model_choice import decoder_source, describe_model, shape_of
from permllm_bench.report import format_table, results_markdown
from permllm_bench.sessions import loadavg, machine_info, run_session, say


class BenchCommand:
    """The `permllm bench` subcommand as `parties.cli` discovers it: help, options, run."""

    name = "bench"
    help = "token-latency benchmarks under simulated networks"
    description = "Runs the benchmark scenarios and prints the table (see bench/RESULTS.md)."

    def add_arguments(self, parser) -> None:
        add_arguments(parser)

    def run(self, args) -> int:
        return run_bench(args)


COMMAND = BenchCommand()


def main(argv=None) -> int:
    """`python -m permllm_bench.cli ...`: the same command without the `permllm` front end."""
    from permllm_bench.standalone import run_standalone

    return run_standalone(COMMAND, "permllm bench", argv)


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
    about = describe_model(cfg.model)
    summary: dict = {
        "schema": SCHEMA,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "quick": cfg.quick,
        "machine": {**machine_info(), "loadavg_start": loadavg()},
        "scenario": {
            "model": about["label"],
            "model_spec": cfg.model,
            "parameters": about["parameters"],
            "synthetic": about["synthetic"],
            "prompt": cfg.prompt,
            "max_new_tokens": cfg.max_new_tokens,
            "greedy": True,
        },
        "model": about["shape"],
        "profiles": [],
    }
    from parties.models import load_tokenizer
    from permllm.model.prompts import chat_token_ids

    tokenizer = load_tokenizer(cfg.model)
    prompt_ids = chat_token_ids(tokenizer, cfg.prompt)
    summary["scenario"]["prompt_tokens"] = len(prompt_ids)
    from parties.progress import progress_bar

    stages = len(cfg.parts) + (len(cfg.profiles) - 1 if "sessions" in cfg.parts else 0)
    overall = progress_bar(stages, "permllm bench", unit="stage")
    try:
        if "sessions" in cfg.parts:
            for spec in cfg.profiles:
                say(f"three-process session under '{spec}' ({cfg.max_new_tokens} tokens)")
                s = run_session(
                    spec,
                    cfg.prompt,
                    cfg.max_new_tokens,
                    timeout=cfg.session_timeout,
                    insecure=cfg.insecure,
                    model=cfg.model,
                )
                s["name"] = spec
                summary["profiles"].append(s)
                overall.update(1)
        if "curve" in cfg.parts:
            state = "on" if cfg.insecure else "off"
            say(f"the 'none' session again with CURVE {state} ({cfg.max_new_tokens} tokens)")
            other = run_session(
                "none",
                cfg.prompt,
                cfg.max_new_tokens,
                timeout=cfg.session_timeout,
                insecure=not cfg.insecure,
                model=cfg.model,
            )
            other["name"] = "none"
            none = summary["profiles"][0]
            summary["curve"] = curve_cost(other, none) if cfg.insecure else curve_cost(none, other)
            overall.update(1)
        import torch

        torch.set_num_threads(1)  # the parties run one compute thread each, as in the demo
        need_model = any(p in cfg.parts for p in ("plaintext", "breakdown", "scaling", "sweep"))
        if need_model:
            from permllm.model.loading import decoder_weights_from_hf, load_hf_decoder

            say("loading the model in this process (plaintext baseline and in-process runs)")
            hf_model, _ = load_hf_decoder(decoder_source(cfg.model), tokenizer=False)
            if "plaintext" in cfg.parts:
                say("plaintext transformers generate")
                eos = tokenizer.eos_token_id
                from permllm_bench.plaintext import plaintext_seconds_per_token

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
            from parties.session import prepare_model
            from permllm_bench.analysis import breakdown_from_run, scaling_rows
            from permllm_bench.inprocess_runs import prompt_of_length, run_generation, run_sweep

            say("in-process preparation (masked weights), reused by the in-process runs")
            prepared = prepare_model(weights)
            del weights
            arch = prepared.arch
            summary["model"] = shape_of(arch)
            if "breakdown" in cfg.parts:
                say("breakdown of a decode step by layer part (in-process, no delay)")
                run = run_generation(
                    prepared, prompt_ids, cfg.breakdown_tokens, parts=True, desc="breakdown (in-process)"
                )
                summary["breakdown"] = breakdown_from_run(run, arch.layers, len(prompt_ids))
                overall.update(1)
            if "scaling" in cfg.parts:
                say("scaling with prompt length and generated position (in-process, no delay)")
                rows = []
                first, *others = cfg.scaling_prompts
                longest = max(cfg.scaling_positions)
                run = run_generation(
                    prepared,
                    prompt_of_length(tokenizer, first),
                    longest + SCALING_WINDOW,
                    desc=f"scaling prompt {first} (in-process)",
                )
                rows += scaling_rows(run, first, cfg.scaling_positions)
                for n in others:
                    run = run_generation(
                        prepared,
                        prompt_of_length(tokenizer, n),
                        1 + SCALING_WINDOW,
                        desc=f"scaling prompt {n} (in-process)",
                    )
                    rows += scaling_rows(run, n, [1])
                summary["scaling"] = {
                    "mode": "in-process owner+user threads, no delay; median of "
                    f"{SCALING_WINDOW} steps from each position",
                    "rows": rows,
                }
                overall.update(1)
            if "sweep" in cfg.parts:
                say(f"RTT sweep {cfg.sweep_rtt_ms} ms (in-process, netsim-wrapped in-memory channels)")
                summary["sweep"] = run_sweep(
                    prepared, prompt_of_length(tokenizer, 16), cfg.sweep_rtt_ms, cfg.sweep_mbit_s, cfg.sweep_tokens
                )
                overall.update(1)
            summary["inprocess_prepare_s"] = prepared.prepare_s
            del prepared
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
    summary["machine"]["loadavg_end"] = loadavg()
    summary["wall_s"] = time.perf_counter() - t_start
    print(format_table(summary))
    print(f"\n(bench wall time {summary['wall_s']:.0f} s)")
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(summary, indent=2))
        say(f"wrote {cfg.json_path}")
    if cfg.plot_path:
        from permllm_bench.plot import write_plot

        Path(cfg.plot_path).parent.mkdir(parents=True, exist_ok=True)
        write_plot(summary, cfg.plot_path)
        say(f"wrote {cfg.plot_path}")
    if cfg.markdown_path:
        Path(cfg.markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.markdown_path).write_text(results_markdown(summary, cfg.markdown_path, cfg.plot_path, cfg.json_path))
        say(f"wrote {cfg.markdown_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
