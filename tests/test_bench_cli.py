"""`permllm bench`: the pure parts (floor, PermLLM's cost, summary, table, JSON keys, argument checks).

No model runs here: every summary is fabricated. The scenarios themselves are in bench/ (pytest-benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import pytest

from parties import cli, cli_options
from permllm.errors import ConfigError
from permllm_bench import analysis, config, cost_model, inprocess_runs, plot, report, tables
from permllm_bench.cli import COMMAND


def _args(*argv):
    parser = argparse.ArgumentParser(prog="permllm bench")
    COMMAND.add_arguments(parser)
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------ floor
def test_floor_adds_compute_one_way_delays_and_transmission():
    # wan: 366 flights x 5 ms + 7.9 MB at 1 Gbit/s on top of 0.5 s of compute
    floor = cost_model.floor_seconds(0.5, 366, 10.0, 7.9e6, 1000.0)
    assert floor == pytest.approx(0.5 + 366 * 0.005 + 7.9e6 * 8 / 1e9)
    assert floor == pytest.approx(2.3932)
    # wan-slow
    assert cost_model.floor_seconds(0.5, 366, 50.0, 7.9e6, 100.0) == pytest.approx(0.5 + 9.15 + 0.632)


def test_floor_without_delay_is_the_no_delay_latency():
    assert cost_model.floor_seconds(0.7, 366, 0.0, 8e6, None) == 0.7
    assert cost_model.floor_seconds(0.7, 366, 0.0, 8e6, math.inf) == 0.7


@pytest.mark.parametrize(
    "bad",
    [
        (-1, 366, 10, 1, 1000),
        (0.5, -1, 10, 1, 1000),
        (0.5, 366, -1, 1, 1000),
        (0.5, 366, 10, -1, 1000),
        (0.5, 366, 10, 1, 0),
        (None, 366, 10, 1, 1000),
    ],
)
def test_floor_rejects_impossible_inputs(bad):
    with pytest.raises(ValueError):
        cost_model.floor_seconds(*bad)


def test_ratio():
    assert cost_model.ratio(3.0, 2.4) == pytest.approx(1.25)
    assert (
        cost_model.ratio(None, 2.0) is None and cost_model.ratio(1.0, None) is None and cost_model.ratio(1.0, 0) is None
    )


def test_profile_figures():
    assert cost_model.profile_figures("wan") == {"name": "wan", "rtt_ms": 10.0, "mbit_s": 1000.0}
    assert cost_model.profile_figures("wan-slow") == {"name": "wan-slow", "rtt_ms": 50.0, "mbit_s": 100.0}
    assert cost_model.profile_figures("none") == {"name": "none", "rtt_ms": 0.0, "mbit_s": None}
    assert cost_model.profile_figures("lan")["rtt_ms"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------ PermLLM's cost
def test_permllm_cost_for_smollm2_shape():
    h, layers, heads, inter, vocab, cache = 576, 30, 9, 1536, 49152, 50
    cost = cost_model.permllm_cost(h, layers, heads, inter, vocab, cache)
    per_layer = 15 * h + 4 * inter + 5 * heads * cache
    assert cost["elements_per_layer"] == per_layer == 8640 + 6144 + 2250
    assert cost["elements_outside_layers"] == 3 * vocab + 4 * h
    assert cost["bytes_per_token"] == 4 * (layers * per_layer + 3 * vocab + 4 * h) == 2_643_120
    assert cost["flights_per_layer"] == 18
    assert cost["flights_per_token"] == 18 * 30 + 9 == 549
    assert "15*h + 4*I + 5*H*L" in cost["formula"]


def test_permllm_cost_grows_with_the_cache_and_adds_bfv():
    a = cost_model.permllm_cost(576, 30, 9, 1536, 49152, 17)
    b = cost_model.permllm_cost(576, 30, 9, 1536, 49152, 145)
    assert b["bytes_per_token"] - a["bytes_per_token"] == 4 * 30 * 5 * 9 * (145 - 17)
    c = cost_model.permllm_cost(576, 30, 9, 1536, 49152, 17, he_bytes=1234)
    assert c["bytes_per_token"] == a["bytes_per_token"] + 1234 and c["he_bytes"] == 1234


def test_permllm_formula_matches_the_papers_chatglm_figure():
    # ChatGLM-6B (hidden 4096, 28 layers, 32 heads, MLP 16384, vocab 130528): the paper reports ~20 MB/token
    cost = cost_model.permllm_cost(4096, 28, 32, 16384, 130528, 100)
    assert 15e6 < cost["bytes_per_token"] < 22e6


@pytest.mark.parametrize("kwargs", [dict(hidden=0), dict(heads=7), dict(cache_len=0), dict(vocab=1.5)])
def test_permllm_cost_rejects_bad_shapes(kwargs):
    shape = dict(hidden=576, layers=30, heads=9, intermediate=1536, vocab=49152, cache_len=50)
    shape.update(kwargs)
    with pytest.raises(ValueError):
        cost_model.permllm_cost(**shape)


# ------------------------------------------------------------------------------ fabricated summary
def _session(name, rtt_ms, mbit_s, decode):
    return {
        "name": name,
        "network": name,
        "rtt_ms": rtt_ms,
        "mbit_s": mbit_s,
        "ttft_s": 3.0,
        "decode_s_per_token": decode,
        "decode_s_per_token_p90": decode * 1.1,
        "online_bytes_per_token": 8e6,
        "online_bytes_per_token_up": 5.7e6,
        "online_bytes_per_token_down": 2.3e6,
        "flights_per_token": 366,
        "prefill_flights": 366,
        "prefill_bytes": 2.4e8,
        "offline_s": 16.0,
        "offline_bytes": 4e8,
        "prepare_s": 15.0,
        "prepare_bytes": 1.3e9,
        "model_load_s": 20.0,
        "generated_tokens": 8,
        "peak_rss_mb": {"owner": 5400.0, "user": 2000.0, "helper": 1600.0},
        "wall_s": 60.0,
        "token_ids": [1, 2, 3],
        "text": "x",
    }


def fabricated_summary():
    return {
        "schema": config.SCHEMA,
        "date": "2025-01-01T00:00:00+00:00",
        "command": "permllm bench --quick",
        "quick": True,
        "machine": {"cores": 2, "cpu_model": "Test CPU", "loadavg_start": "1.0/1.0/1.0", "loadavg_end": "1.0/1.0/1.0"},
        "scenario": {"model": "SmolLM2-135M-Instruct", "prompt": "p", "prompt_tokens": 49, "max_new_tokens": 8},
        "model": {
            "hidden": 576,
            "layers": 30,
            "heads": 9,
            "intermediate": 1536,
            "vocab": 49152,
            "outside_flights_default": 6,
        },
        "profiles": [
            _session("none", 0.0, None, 0.6),
            _session("lan", 0.2, 10000.0, 0.65),
            _session("wan", 10.0, 1000.0, 2.6),
            _session("wan-slow", 50.0, 100.0, 14.0),
        ],
        "plaintext": {"s_per_token": 0.05, "ttft_s": 0.3, "threads": 1, "matches_private": True},
        "breakdown": {
            "mode": "in-process",
            "steps": 3,
            "cache_length": 51,
            "step_s": 0.9,
            "flights": 366,
            "bytes_user_to_owner": 5.7e6,
            "bytes_owner_to_user": 2.3e6,
            "outside_flights": 6,
            "flights_per_layer": 12.0,
            "parts": [
                {
                    "part": p,
                    "seconds": 0.9 / len(analysis.BREAKDOWN_ORDER),
                    "flights": 1,
                    "bytes_user_to_owner": 1000,
                    "bytes_owner_to_user": 500,
                }
                for p in analysis.BREAKDOWN_ORDER
            ],
            "offline_per_token": {"seconds": 0.3, "bytes": 4.9e6},
        },
        "scaling": {
            "mode": "in-process",
            "rows": [
                {
                    "prompt_tokens": 16,
                    "position": 1,
                    "cache_length": 17,
                    "decode_s_per_token": 0.8,
                    "flights": 366,
                    "bytes": 7.6e6,
                    "offline_bytes": 4.7e6,
                },
                {
                    "prompt_tokens": 16,
                    "position": 128,
                    "cache_length": 144,
                    "decode_s_per_token": 1.0,
                    "flights": 366,
                    "bytes": 8.9e6,
                    "offline_bytes": 5.5e6,
                },
            ],
        },
        "sweep": {
            "mode": "in-process",
            "mbit_s": 1000.0,
            "tokens_per_point": 2,
            "prompt_tokens": 16,
            "points": [
                {"rtt_ms": 0.0, "mbit_s": None, "decode_s_per_token": 1.0, "flights": 366, "bytes": 7.6e6},
                {"rtt_ms": 10.0, "mbit_s": 1000.0, "decode_s_per_token": 3.0, "flights": 366, "bytes": 7.6e6},
            ],
        },
    }


def test_complete_summary_adds_floors_ratios_and_per_layer_flights():
    s = cost_model.complete_summary(fabricated_summary())
    by = {p["name"]: p for p in s["profiles"]}
    assert by["none"]["floor_s_per_token"] == pytest.approx(0.6) and by["none"]["ratio"] == pytest.approx(1.0)
    wan_floor = 0.6 + 366 * 0.005 + 8e6 * 8 / 1e9
    assert by["wan"]["floor_s_per_token"] == pytest.approx(wan_floor)
    assert by["wan"]["ratio"] == pytest.approx(2.6 / wan_floor)
    assert by["wan"]["within_limit"] is True
    slow_floor = 0.6 + 366 * 0.025 + 8e6 * 8 / 1e8
    assert by["wan-slow"]["ratio"] == pytest.approx(14.0 / slow_floor) and by["wan-slow"]["within_limit"] is False
    for p in s["profiles"]:
        assert p["flights_per_layer"] == 12
        assert p["offline_bytes_per_token"] == pytest.approx(4e8 / 8)
        assert set(cost_model.PROFILE_KEYS) <= set(p)
    sweep = {q["rtt_ms"]: q for q in s["sweep"]["points"]}
    assert sweep[0.0]["ratio"] == pytest.approx(1.0)
    assert sweep[10.0]["floor_s_per_token"] == pytest.approx(1.0 + 1.83 + 7.6e6 * 8 / 1e9)


def test_complete_summary_without_breakdown_uses_the_documented_outside_flights():
    s = fabricated_summary()
    del s["breakdown"]
    cost_model.complete_summary(s)
    assert s["profiles"][0]["flights_per_layer"] == (366 - 6) / 30


def test_complete_summary_without_no_delay_run_has_no_floor():
    s = fabricated_summary()
    s["profiles"] = s["profiles"][1:]
    cost_model.complete_summary(s)
    assert all(p["floor_s_per_token"] is None and p["ratio"] is None for p in s["profiles"])


def test_summary_is_json_with_the_promised_keys():
    s = cost_model.complete_summary(fabricated_summary())
    s["permllm"] = cost_model.permllm_cost(576, 30, 9, 1536, 49152, 53)
    back = json.loads(json.dumps(s))
    for p in back["profiles"]:
        for key in (
            "name",
            "rtt_ms",
            "mbit_s",
            "ttft_s",
            "decode_s_per_token",
            "floor_s_per_token",
            "ratio",
            "flights_per_layer",
            "online_bytes_per_token",
        ):
            assert key in p
    for key in ("date", "machine", "command", "scenario", "plaintext", "breakdown", "scaling", "sweep", "permllm"):
        assert key in back


def test_table_shows_every_section_and_flags_ratios_above_the_limit():
    s = cost_model.complete_summary(fabricated_summary())
    s["permllm"] = cost_model.permllm_cost(576, 30, 9, 1536, 49152, 53, he_bytes=2_000_000)
    s["permllm"]["ours"] = {"flights_per_layer": 12, "flights_per_token": 366, "bytes_per_token": 8e6}
    table = report.format_table(s)
    for text in (
        "none",
        "lan",
        "wan",
        "wan-slow",
        "time to first token",
        "decode s/token (median)",
        "floor s/token",
        "measured / floor",
        "flights per layer",
        "user -> owner",
        "owner -> user",
        "offline per generated token",
        "preparation (W-U at user) s / bytes",
        "peak RSS",
        "plaintext transformers",
        "breakdown of one decode step",
        "softmax",
        "selection",
        "scaling with the KV cache",
        "RTT sweep",
        "PermLLM",
        "549",
        "366",
        "2 cores (Test CPU)",
    ):
        assert text in table, text
    assert "NOTE: wan-slow above 1.25 x floor" in table
    wan_line = next(line for line in table.splitlines() if line.startswith("measured / floor"))
    assert wan_line.count("!") == 1  # only wan-slow


def test_table_of_a_partial_summary():
    s = fabricated_summary()
    for key in ("breakdown", "scaling", "sweep", "plaintext"):
        del s[key]
    table = report.format_table(cost_model.complete_summary(s))
    assert "decode s/token" in table and "breakdown of one decode step" not in table


def test_curve_cost_is_the_difference_of_two_sessions_and_is_shown():
    on, off = _session("none", 0.0, None, 0.62), _session("none", 0.0, None, 0.60)
    on.update(prepare_s=18.0, wall_s=61.0)
    cost = cost_model.curve_cost(on, off)
    assert cost["added"]["decode_s_per_token"] == pytest.approx(0.02)
    assert cost["added"]["prepare_s"] == pytest.approx(3.0) and cost["added"]["ttft_s"] == 0
    assert cost["same_tokens"] is True
    off["token_ids"] = [1, 2, 4]
    assert cost_model.curve_cost(on, off)["same_tokens"] is False
    s = cost_model.complete_summary(fabricated_summary())
    s["curve"] = cost
    table = report.format_table(s)
    assert "cost of CURVE encryption" in table and "+3.000 s" in table and "+20.0 ms" in table


def test_results_page_names_date_machine_command_and_embeds_the_plot(tmp_path):
    s = cost_model.complete_summary(fabricated_summary())
    page = report.results_markdown(
        s,
        str(tmp_path / "bench" / "RESULTS.md"),
        str(tmp_path / "bench" / "results" / "p.png"),
        str(tmp_path / "bench" / "results" / "latest.json"),
    )
    assert page.startswith("# permllm token-latency benchmarks")
    assert "Measured 2025-01-01T00:00:00+00:00 on 2 cores (Test CPU)" in page
    assert "```bash\npermllm bench --quick\n```" in page
    assert "![decode seconds per token against RTT, with the floor](results/p.png)" in page
    assert "[latest.json](results/latest.json)" in page
    assert "Within 1.25 x floor: none, lan, wan. Above: wan-slow (1.35)" in page
    assert report.format_table(s) in page


def test_results_page_carries_the_model_size_table_when_runs_are_there(tmp_path, monkeypatch):
    from permllm_bench import scale

    page, runs = tmp_path / "SCALE.md", tmp_path / "results"
    runs.mkdir()
    monkeypatch.setattr(report, "SCALE_PAGE", page)
    monkeypatch.setattr(report, "SCALE_RUNS", runs)
    page.write_text("x")
    assert "Model size" not in report.results_markdown(fabricated_summary(), str(tmp_path / "RESULTS.md"), None, None)
    small, big = fabricated_summary(), fabricated_summary()
    small["scenario"].update(model="small, 1M parameters", parameters=1_000_000)
    big["scenario"].update(model="big, 9M parameters", parameters=9_000_000)
    (runs / "scale-a.json").write_text(json.dumps(big))  # sorted by size, not by file name
    (runs / "scale-b.json").write_text(json.dumps(small))
    text = report.results_markdown(fabricated_summary(), str(tmp_path / "RESULTS.md"), None, None)
    assert "## Model size" in text and "[SCALE.md](SCALE.md)" in text
    rows = [line for line in text.splitlines() if line.startswith("| small") or line.startswith("| big")]
    assert [r.split("|")[1].strip() for r in rows] == ["small", "big"]
    # the section is rewritten in place, and appended to a page without one
    old = text.replace("| big", "| stale")
    new = scale.update_section(old, scale.scale_section([small]))
    assert "stale" not in new and new.count(scale.SECTION_START) == 1 and new.startswith(old[:40])
    assert scale.update_section("# page\n", "S") == "# page\n\nS\n"


def test_scale_table_has_a_row_per_model_and_the_pending_ones(tmp_path, capsys):
    from permllm_bench import scale

    small = fabricated_summary()
    small["scenario"].update(model="SmolLM2-135M-Instruct, 135M parameters", parameters=134_515_008)
    big = fabricated_summary()
    big["scenario"].update(model="SmolLM2-360M shape, random weights (seed 0), 362M parameters", parameters=361_821_120)
    big["profiles"] = [dict(p) for p in big["profiles"] if p["name"] in ("none", "wan")]
    big["profiles"][1]["peak_rss_mb"] = {"owner": 14800.0, "user": 3800.0, "helper": 3600.0}
    del big["plaintext"]
    lines = scale.scale_markdown([small, big], [("SmolLM2-1.7B shape", "the owner needs ~29 GB")]).splitlines()
    assert len(lines) == 5 and lines[0].count("|") == len(scale.COLUMNS) + 1
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["SmolLM2-135M-Instruct", "135M", tables.fmt_s(0.6), tables.fmt_s(2.6)]
    assert cells[4:7] == [tables.fmt_bytes(8e6), tables.fmt_bytes(1.3e9), tables.fmt_bytes(4e8)]
    assert cells[8] == "5.4 GB / 2.0 GB / 1.6 GB" and cells[9] == tables.fmt_s(0.05)
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    # the largest peak over the sessions; no plaintext run: '-'
    assert cells[0] == "SmolLM2-360M shape" and cells[8] == "14.8 GB / 3.8 GB / 3.6 GB" and cells[9] == "-"
    assert lines[4].startswith("| SmolLM2-1.7B shape: not yet run (the owner needs ~29 GB) | - |")
    path = tmp_path / "s.json"
    path.write_text(json.dumps(small))
    assert scale.main([str(path), "--pending", "SmolLM2-1.7B shape=why"]) == 0
    assert "SmolLM2-1.7B shape: not yet run (why)" in capsys.readouterr().out
    assert scale.main([str(tmp_path / "missing.json")]) == 2


def test_formatters():
    assert (
        tables.fmt_bytes(7_890_000) == "7.89 MB" and tables.fmt_bytes(512) == "512 B" and tables.fmt_bytes(None) == "-"
    )
    assert tables.fmt_s(2.8541) == "2.854 s" and tables.fmt_s(0.0123) == "12.3 ms" and tables.fmt_s(None) == "-"
    assert tables.fmt_ratio(1.3) == "1.30 !" and tables.fmt_ratio(1.1) == "1.10"
    assert tables.fmt_signed_s(-0.0123) == "-12.3 ms" and tables.fmt_signed_s(2.5) == "+2.500 s"


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    s = cost_model.complete_summary(fabricated_summary())
    out = tmp_path / "p.png"
    plot.write_plot(s, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ breakdown / scaling arithmetic
class _Trace:
    def __init__(self, times, depths, marks):
        self.token_times, self.token_depths, self.token_bytes = times, depths, marks


def _recorder(forwards):
    rec = inprocess_runs.PartRecorder()
    t = 0.0
    depth = sent = recv = 0
    for parts in forwards:
        for part, seconds, flights, up, down in parts:
            rec.events.append((part, t, t + seconds, depth, depth + flights, sent, sent + up, recv, recv + down))
            t, depth, sent, recv = t + seconds, depth + flights, sent + up, recv + down
    return rec


def test_breakdown_attributes_the_rest_of_the_step_to_selection():
    layer = [
        ("norm", 0.1, 2, 10, 5),
        ("qkv", 0.05, 2, 4, 4),
        ("scores", 0.01, 0, 1, 1),
        ("softmax", 0.02, 2, 3, 1),
        ("weighted_values", 0.02, 2, 2, 2),
        ("out_proj", 0.01, 0, 1, 0),
        ("norm", 0.1, 2, 10, 5),
        ("mlp", 0.2, 2, 20, 10),
    ]
    forward = [("embedding", 0.001, 0, 8, 0)] + layer * 2 + [("norm", 0.01, 2, 1, 1), ("lm_head", 0.05, 0, 0, 0)]
    rec = _recorder([forward, forward, forward])
    f_s = sum(p[1] for p in forward)
    f_flights = sum(p[2] for p in forward)
    f_up, f_down = sum(p[3] for p in forward), sum(p[4] for p in forward)
    # each step = one forward + a selection of 0.1 s, 4 flights, 100 B up and 50 B down
    times = [0.0, f_s + 0.1, 2 * (f_s + 0.1)]
    depths = [0, f_flights + 4, 2 * (f_flights + 4)]
    marks = [(0, 0), (f_up + 100, f_down + 50), (2 * (f_up + 100), 2 * (f_down + 50))]
    run = inprocess_runs.InProcessRun(
        tokens=[1, 2, 3],
        trace=_Trace(times, depths, marks),
        user_parts=rec,
        owner_parts=rec,
        dealing=[{"seconds": 1.0, "bytes": 100, "calls": 5}] + [{"seconds": 0.3, "bytes": 10, "calls": 2}] * 2,
        deal_s=1.6,
        wall_s=2.0,
    )
    bd = analysis.breakdown_from_run(run, layers=2, prompt_tokens=10)
    parts = {p["part"]: p for p in bd["parts"]}
    assert [p["part"] for p in bd["parts"]] == list(analysis.BREAKDOWN_ORDER)
    assert parts["selection"]["seconds"] == pytest.approx(0.1)
    assert parts["selection"]["flights"] == 4
    assert parts["selection"]["bytes_user_to_owner"] == 100 and parts["selection"]["bytes_owner_to_user"] == 50
    assert parts["norm"]["flights"] == 8 and parts["final_norm"]["flights"] == 2
    assert parts["mlp"]["seconds"] == pytest.approx(0.4)
    assert bd["flights_per_layer"] == 12 and bd["outside_flights"] == 6
    assert bd["offline_per_token"] == {"seconds": 0.3, "bytes": 10, "calls": 2}
    assert sum(p["seconds"] for p in bd["parts"]) == pytest.approx(bd["step_s"])


def test_scaling_rows_take_the_window_from_each_position():
    times = [0.0, 1.0, 2.1, 3.3, 4.6, 6.0]  # steps 1.0, 1.1, 1.2, 1.3, 1.4
    run = inprocess_runs.InProcessRun(
        tokens=[0] * 6,
        trace=_Trace(times, [0, 1, 2, 3, 4, 5], [(0, 0)] * 6),
        user_parts=None,
        owner_parts=None,
        dealing=[{"seconds": 1, "bytes": b, "calls": 1} for b in range(6)],
        deal_s=0,
        wall_s=0,
    )
    rows = analysis.scaling_rows(run, 16, [1, 4, 9])
    assert [r["position"] for r in rows] == [1, 4]
    assert rows[0]["decode_s_per_token"] == pytest.approx(1.1) and rows[0]["cache_length"] == 17
    assert rows[1]["decode_s_per_token"] == pytest.approx(1.35) and rows[1]["offline_bytes"] == 4


# ------------------------------------------------------------------------------ arguments
def test_defaults_full_and_quick():
    full = config.config_from_args(_args())
    assert full.profiles == ["none", "lan", "wan", "wan-slow"] and full.max_new_tokens == 32
    assert full.scaling_prompts == [16, 64, 256] and full.scaling_positions == [1, 32, 128]
    assert full.sweep_rtt_ms == [0.2, 1.0, 5.0, 10.0, 20.0, 50.0]
    quick = config.config_from_args(_args("--quick"))
    assert quick.max_new_tokens == 4 and quick.sweep_tokens < full.sweep_tokens
    assert len(quick.scaling_prompts) < len(full.scaling_prompts)
    assert config.config_from_args(_args("--quick", "--max-new-tokens", "12")).max_new_tokens == 12


def test_profiles_always_start_with_the_no_delay_run():
    cfg = config.config_from_args(_args("--profiles", "wan, 5:200"))
    assert cfg.profiles == ["none", "wan", "5,200"]
    assert config.config_from_args(_args("--profiles", "wan,none")).profiles == ["none", "wan"]


def test_skip_and_outputs(tmp_path):
    cfg = config.config_from_args(_args("--skip", "scaling,plaintext", "--json", str(tmp_path / "a.json")))
    assert cfg.parts == ("sessions", "curve", "breakdown", "sweep") and cfg.json_path == str(tmp_path / "a.json")
    # the CURVE comparison re-runs the 'none' session: no sessions, no comparison; --quick leaves it out
    assert config.config_from_args(_args("--skip", "sessions")).parts == ("plaintext", "breakdown", "scaling", "sweep")
    assert "curve" not in config.config_from_args(_args("--quick")).parts
    assert "curve" in config.config_from_args(_args()).parts


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--profiles", "moon"], "--profiles"),
        (["--profiles", "wan,wan"], "twice"),
        (["--profiles", " , "], "at least one"),
        (["--max-new-tokens", "2"], "--max-new-tokens"),
        (["--max-new-tokens", "100000"], "--max-new-tokens"),
        (["--prompt", "   "], "empty"),
        (["--sweep-rtt", "1,-5"], "--sweep-rtt"),
        (["--sweep-rtt", "1,abc"], "not a number"),
        (["--sweep-rtt", "1,1"], "repeated"),
        (["--sweep-mbit", "0"], "--sweep-mbit"),
        (["--sweep-tokens", "0"], "--sweep-tokens"),
        (["--scaling-prompts", "16,0"], "--scaling-prompts"),
        (["--scaling-positions", "1.5"], "integer"),
        (["--skip", "everything"], "unknown part"),
        (["--skip", "sessions,plaintext,breakdown,scaling,sweep"], "nothing to run"),
        (["--plot", "out.svg"], ".png"),
        (["--plot", "out.png", "--skip", "sweep"], "sweep"),
        (["--json", "out.txt"], ".json"),
        (["--markdown", "out.txt"], ".md"),
        (["--session-timeout", "0"], "--session-timeout"),
        (["--model", "/no/such/checkpoint"], "--model"),
        (["--model", "minilm"], "encoder"),
        (["--model", " "], "--model"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        config.config_from_args(_args(*argv))


def test_output_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="folder"):
        config.config_from_args(_args("--json", str(tmp_path)))


def test_cli_reports_bad_arguments_before_any_work(capsys, monkeypatch):
    # `permllm` finds `bench` through the "permllm.commands" entry points; here the lookup is stood in for
    monkeypatch.setattr(cli_options, "plugin_commands", lambda: {"bench": COMMAND})
    start = time.perf_counter()
    assert cli.main(["bench", "--max-new-tokens", "1"]) == 2
    assert "permllm bench: error: --max-new-tokens" in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_cli_dispatches_to_the_discovered_command(monkeypatch):
    seen = []

    class Probe:
        help = description = "a stand-in command"

        def add_arguments(self, parser):
            parser.add_argument("--flag", type=int, default=0)

        def run(self, args):
            seen.append(args.flag)
            return 7

    monkeypatch.setattr(cli_options, "plugin_commands", lambda: {"probe": Probe()})
    assert cli.main(["probe", "--flag", "3"]) == 7
    assert seen == [3]


def test_bench_is_declared_as_an_entry_point():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert project["project"]["entry-points"][cli.COMMAND_GROUP] == {
        "bench": "permllm_bench.cli:COMMAND",
        "make-checkpoint": "permllm_bench.checkpoints:COMMAND",
    }


# ------------------------------------------------------------------------------ in-process runs (tiny model)
def test_inprocess_runs_draw_fresh_dealer_seeds_and_count_every_forward(monkeypatch):
    import parties.session
    from parties.session import prepare_model
    from tests.tiny_model import tiny_decoder

    dealt_with = []
    real = parties.session.deal_records

    def recording(dry_run, seeds, weight_mask=None):
        dealt_with.append(seeds)
        return real(dry_run, seeds, weight_mask)

    monkeypatch.setattr(parties.session, "deal_records", recording)
    prepared = prepare_model(tiny_decoder(seed=3), seed=bytes(16))
    first = inprocess_runs.run_generation(prepared, [1, 5, 7], 3, parts=True, desc="tiny")
    second = inprocess_runs.run_generation(prepared, [1, 5, 7], 3, desc="tiny")
    assert first.tokens == second.tokens and len(first.tokens) == 3
    # decode steps of the 2-layer model: 10 flights per layer + 4 (the folded norms; tests/test_secure_decoder.py)
    assert first.steps("depth") == second.steps("depth") == [24, 24]
    # ring shares only (the table token choice): the same bytes in every run
    assert first.steps("bytes") == second.steps("bytes")
    # a fresh pair of dealer seeds per run, never the weights' mask seed
    assert len(dealt_with) == 2 and len({s.owner for s in dealt_with} | {s.user for s in dealt_with}) == 4
    assert prepared.seed not in {s.owner for s in dealt_with}
    # one dealing entry per forward (prefill + 2 decode steps), each with material
    assert len(first.dealing) == 3 and all(d["calls"] > 0 and d["bytes"] > 0 for d in first.dealing)
    assert len(first.user_parts.forwards()) == 3 and second.user_parts is None


def test_module_entry_reports_bad_arguments(capsys):
    from permllm_bench.cli import main as bench_main

    assert bench_main(["--sweep-tokens", "0"]) == 2
    assert "permllm bench: error: --sweep-tokens" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --model (tiny checkpoints)
def test_model_defaults_to_the_bundled_one_and_takes_a_checkpoint_folder(tmp_path):
    from tests.tiny_model import tiny_hf_llama

    assert config.config_from_args(_args()).model == "smollm2"
    tiny_hf_llama(0, hidden=32, intermediate=48).config.save_pretrained(tmp_path / "tiny")
    assert config.config_from_args(_args("--model", str(tmp_path / "tiny"))).model == str(tmp_path / "tiny")


def test_the_label_and_shape_come_from_the_checkpoint(tmp_path):
    from permllm_bench.model_choice import describe_model
    from tests.tiny_model import tiny_hf_llama

    model = tiny_hf_llama(0, hidden=32, intermediate=48)
    model.config.save_pretrained(tmp_path / "tiny")
    about = describe_model(str(tmp_path / "tiny"))
    params = sum(p.numel() for p in model.parameters())  # untied head: counted apart
    assert about["parameters"] == params and about["label"] == f"tiny, {params / 1e6:.0f}M parameters"
    assert about["synthetic"] is None
    assert about["shape"] == {
        "hidden": 32,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 8,
        "intermediate": 48,
        "vocab": 49152,
        "outside_flights_default": 6,
    }
    # a `permllm make-checkpoint` folder names its shape and seed
    entry = {"shape": "smollm2-360m", "label": "SmolLM2-360M", "seed": 4, "init_std": 0.02}
    tied = tiny_hf_llama(0, hidden=32, intermediate=48, synthetic=entry).config
    tied.tie_word_embeddings = True
    tied.save_pretrained(tmp_path / "synthetic")
    about = describe_model(str(tmp_path / "synthetic"))
    assert about["synthetic"] == entry and about["parameters"] == params - 49152 * 32
    assert about["label"].startswith("SmolLM2-360M shape, random weights (seed 4), ")


def test_sessions_run_the_chosen_model(monkeypatch):
    import parties.launcher
    from permllm_bench import sessions

    seen = []

    class Stop(Exception):
        pass

    def commands(args, ports, reports):
        seen.append(args.model)
        raise Stop

    monkeypatch.setattr(parties.launcher, "role_commands", commands)
    with pytest.raises(Stop):
        sessions.run_session("none", "hi", 3, model="/models/tiny")
    with pytest.raises(Stop):
        sessions.run_session("none", "hi", 3)
    assert seen == ["/models/tiny", "smollm2"]


def test_bench_of_a_checkpoint_labels_it_and_runs_its_plaintext_reference(tmp_path, smollm2_gguf):
    """The plaintext part on a tiny checkpoint folder (SmolLM2's tokenizer): the scenario names the
    checkpoint, the shape is its config's, and the reference tokens are that model's greedy ones."""
    from transformers import AutoTokenizer

    from permllm.model.prompts import chat_token_ids
    from permllm_bench.cli import main as bench_main
    from tests.tiny_model import tiny_hf_llama

    model = tiny_hf_llama(3, hidden=64, intermediate=96, max_position_embeddings=512)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, local_files_only=True)
    tok.save_pretrained(folder)
    out = tmp_path / "bench.json"
    skip = "sessions,breakdown,scaling,sweep"
    argv = ["--model", str(folder), "--skip", skip, "--max-new-tokens", "3", "--json", str(out)]
    assert bench_main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["scenario"]["model"].startswith("tiny-llama, ")
    assert summary["scenario"]["model_spec"] == str(folder)
    assert summary["model"]["hidden"] == 64 and summary["model"]["layers"] == 2
    ids = chat_token_ids(tok, summary["scenario"]["prompt"])
    import torch

    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=2
        )
    assert summary["plaintext"]["token_ids"] == expected[0, len(ids) :].tolist()


SERVICE = """
import json, signal, sys, time
done = []
signal.signal(signal.SIGTERM, lambda *a: done.append(1))
while not done:
    time.sleep(0.02)
with open(sys.argv[1], "w") as f:
    json.dump({"service": True, "sessions": [{"role": sys.argv[2], "phases_s": {"prepare": 1.0, "online": 2.0}}]}, f)
"""
USER = """
import json, sys
with open(sys.argv[1], "w") as f:
    json.dump({"role": "user", "phases_s": {"prepare": 3.0, "offline": 4.0, "online": 5.0}}, f)
"""


def test_a_bench_session_ends_when_the_user_exits_and_stops_the_services(monkeypatch):
    """Owner and helper serve until SIGTERM: the bench stops them once the user has exited with 0 (not
    waiting for them to exit by themselves) and reads each service's one session from its report."""
    import parties.launcher
    from permllm_bench import sessions

    pools = []

    def commands(args, ports, reports):
        pools.append(args.pool_depth)
        script = {"owner": SERVICE, "helper": SERVICE, "user": USER}
        return {
            r: [sys.executable, "-c", script[r], str(reports / f"{r}.json"), r] for r in ("owner", "helper", "user")
        }

    monkeypatch.setattr(parties.launcher, "role_commands", commands)
    monkeypatch.setattr(parties.launcher, "merge_reports", lambda raw, network: {"prepare_s": 0.0, "raw": raw})
    start = time.monotonic()
    summary = sessions.run_session("none", "hi", 3, timeout=60.0)
    assert time.monotonic() - start < 30.0
    assert pools == [0]  # nothing dealt ahead in the background of a measured session
    assert summary["raw"]["owner"] == {"role": "owner", "phases_s": {"prepare": 1.0, "online": 2.0}}
    assert summary["raw"]["helper"]["role"] == "helper"
    assert summary["prepare_s"] == 3.0 and summary["owner_online_s"] == 2.0 and summary["user_online_s"] == 5.0
