"""Token-latency scenarios of `permllm bench` as pytest-benchmark cases (slow; never run in CI).

Run:  pytest bench/test_bench_scenarios.py --benchmark-only -s
      (add --benchmark-json=out.json to keep the `extra_info` figures of each case)

Scenario: SmolLM2-135M-Instruct, the fixed ~48-token chat prompt of permllm_bench.config, greedy decoding.
  test_session_under_profile   owner, user and helper as three processes over ZeroMQ under netsim
                               (one session per profile; the timed value is the whole session, the
                               per-token figures and the floor are in extra_info)
  test_plaintext_transformers  the same prompt through transformers' generate
  test_decode_step_breakdown   one decode step by layer part, in-process
  test_decode_scaling          decode cost against the KV cache length, in-process
  test_rtt_sweep               decode s/token against RTT with the floor, in-process over netsim
Each case runs once (pedantic, one round): a session costs ~40 s of set-up before its first token.
"""

from __future__ import annotations

import os

import pytest

from permllm_bench import analysis, config, cost_model, inprocess_runs, plaintext, sessions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENS = int(os.environ.get("PERMLLM_BENCH_TOKENS", "8"))
_no_delay: dict[str, float] = {}


def _once(benchmark, fn, *args, **kwargs):
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=1, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="module")
def tokenizer():
    from parties.models import load_tokenizer

    return load_tokenizer(config.MODEL)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from permllm.model.prompts import chat_token_ids

    return chat_token_ids(tokenizer, config.SCENARIO_PROMPT)


@pytest.fixture(scope="module")
def hf_model():
    import torch

    from permllm.model.loading import find_smollm2_gguf, load_hf_decoder

    torch.set_num_threads(1)
    model, _ = load_hf_decoder(find_smollm2_gguf())
    return model


@pytest.fixture(scope="module")
def prepared(hf_model):
    from parties.session import prepare_model
    from permllm.model.loading import decoder_weights_from_hf

    return prepare_model(decoder_weights_from_hf(hf_model))


def _record(benchmark, figures: dict, keys) -> None:
    for key in keys:
        value = figures.get(key)
        if isinstance(value, (int, float, str, bool)) or value is None:
            benchmark.extra_info[key] = value


@pytest.mark.parametrize("profile", config.PROFILE_NAMES)
def test_session_under_profile(benchmark, profile):
    benchmark.group = "three-process session"
    s = _once(benchmark, sessions.run_session, profile, config.SCENARIO_PROMPT, TOKENS)
    s["name"] = profile
    if profile == "none":
        _no_delay["s"] = s["decode_s_per_token"]
    if "s" in _no_delay:
        s["floor_s_per_token"] = cost_model.floor_seconds(
            _no_delay["s"], s["flights_per_token"], s["rtt_ms"], s["online_bytes_per_token"], s["mbit_s"]
        )
        s["ratio"] = cost_model.ratio(s["decode_s_per_token"], s["floor_s_per_token"])
    _record(benchmark, s, (*cost_model.PROFILE_KEYS, "generated_tokens"))
    for role, mb in s["peak_rss_mb"].items():
        benchmark.extra_info[f"peak_rss_mb_{role}"] = mb
    assert s["generated_tokens"] == TOKENS
    assert s["flights_per_token"] == 304  # decode: 10 flights per layer + 4


def test_plaintext_transformers(benchmark, hf_model, prompt_ids, tokenizer):
    benchmark.group = "plaintext"
    plain = _once(
        benchmark, plaintext.plaintext_seconds_per_token, hf_model, prompt_ids, TOKENS, tokenizer.eos_token_id
    )
    _record(benchmark, plain, ("s_per_token", "s_per_token_p90", "ttft_s", "tokens", "threads"))
    assert plain["tokens"] == TOKENS


def test_decode_step_breakdown(benchmark, prepared, prompt_ids):
    benchmark.group = "in-process"
    run = _once(benchmark, inprocess_runs.run_generation, prepared, prompt_ids, 4, parts=True, desc="breakdown")
    bd = analysis.breakdown_from_run(run, prepared.arch.layers, len(prompt_ids))
    for part in bd["parts"]:
        benchmark.extra_info[f"{part['part']}_s"] = part["seconds"]
        benchmark.extra_info[f"{part['part']}_flights"] = part["flights"]
        benchmark.extra_info[f"{part['part']}_bytes"] = part["bytes_user_to_owner"] + part["bytes_owner_to_user"]
    benchmark.extra_info["step_s"] = bd["step_s"]
    assert bd["flights"] == 304 and bd["flights_per_layer"] == 10


def test_decode_scaling(benchmark, prepared, tokenizer):
    benchmark.group = "in-process"

    def scaling():
        rows = analysis.scaling_rows(
            inprocess_runs.run_generation(
                prepared, inprocess_runs.prompt_of_length(tokenizer, 16), 32 + config.SCALING_WINDOW, desc="scaling 16"
            ),
            16,
            [1, 32],
        )
        rows += analysis.scaling_rows(
            inprocess_runs.run_generation(
                prepared, inprocess_runs.prompt_of_length(tokenizer, 64), 1 + config.SCALING_WINDOW, desc="scaling 64"
            ),
            64,
            [1],
        )
        return rows

    rows = _once(benchmark, scaling)
    for r in rows:
        key = f"prompt{r['prompt_tokens']}_pos{r['position']}"
        benchmark.extra_info[f"{key}_s"] = r["decode_s_per_token"]
        benchmark.extra_info[f"{key}_bytes"] = r["bytes"]
    # the KV cache grows the per-token traffic (softmax and the weights @ V operand are cache-sized)
    by_cache = sorted(rows, key=lambda r: r["cache_length"])
    assert by_cache[-1]["bytes"] > by_cache[0]["bytes"]


def test_rtt_sweep(benchmark, prepared, tokenizer):
    benchmark.group = "in-process"
    sweep = _once(
        benchmark,
        inprocess_runs.run_sweep,
        prepared,
        inprocess_runs.prompt_of_length(tokenizer, 16),
        [0.2, 1.0, 5.0, 10.0, 20.0, 50.0],
        1000.0,
        2,
    )
    summary = cost_model.complete_summary({"profiles": [], "sweep": sweep})
    for q in summary["sweep"]["points"]:
        name = "none" if q["mbit_s"] is None else f"{q['rtt_ms']:g}ms"
        benchmark.extra_info[f"{name}_s"] = q["decode_s_per_token"]
        benchmark.extra_info[f"{name}_ratio"] = q["ratio"]
    assert all(q["flights"] == 304 for q in sweep["points"])
