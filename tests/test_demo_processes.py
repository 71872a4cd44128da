"""The README's demo as real OS processes: owner, user and helper over ZeroMQ on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from permllm.transport.frames import header_length

pytestmark = [pytest.mark.processes, pytest.mark.model]

SMOLLM2_LAYERS, SMOLLM2_VOCAB, SMOLLM2_HIDDEN = 30, 49152, 576


def _demo_processes_alive() -> list[str]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "permllm-demo-" in cmdline:
                alive.append(cmdline)
    return alive


def _run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`permllm demo ARGS` as a child process, offline (HF_HUB_OFFLINE=1), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "parties.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def _masked_weight_bytes() -> int:
    from protocols.model.decoder_weights import MASK_CHUNK_ELEMENTS, DecoderArch, linear_shapes
    from tests.tiny_model import decoder_config

    smollm2 = decoder_config(
        layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152, rope_theta=1e5
    )
    arch = DecoderArch.from_config(smollm2)
    total = 0
    for name, (d_in, d_out, _) in linear_shapes(arch).items():  # one message per row block of <= 8 MB
        blocks = -(-d_in // max(1, MASK_CHUNK_ELEMENTS // d_out))
        total += blocks * header_length(len(f"w.{name}"), 2) + 8 * d_in * d_out
    return total


@pytest.mark.timeout(1200)  # the demo itself may take its 900 s
def test_demo_runs_three_processes_and_answers_like_the_plaintext_model(tmp_path):
    out = tmp_path / "demo.json"
    proc = _run_demo("--network", "lan", "--max-new-tokens", "6", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    # plaintext greedy decoding of the same model answers "The capital of France is Paris."
    assert summary["text"].startswith("The capital of France is")
    assert summary["text"] in proc.stdout
    assert summary["generated_tokens"] == len(summary["token_ids"]) == 6
    assert summary["prompt_tokens"] == 37
    # per decode token: 10 flights per layer (the second norm folded into SwiGLU) + 1 (embedding)
    # + 3 (selection, the final norm folded into it)
    assert summary["flights_per_token"] == 10 * SMOLLM2_LAYERS + 4
    assert summary["prepare_bytes"] == _masked_weight_bytes()
    for key in ("ttft_s", "decode_s_per_token", "online_bytes_per_token", "offline_s", "offline_bytes", "prepare_s"):
        assert summary[key] is not None and summary[key] > 0, key
    assert set(summary["peak_rss_mb"]) == {"owner", "user", "helper"}
    assert "summary" in proc.stdout and "flights per token" in proc.stdout
    assert _demo_processes_alive() == []


def test_ctrl_c_stops_the_demo_and_every_party(tmp_path):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "parties.cli", "demo", "--network", "none", "--max-new-tokens", "4", "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        start_new_session=True,
        # as at a terminal: a suite started in the background (`cmd &` in a script) inherits SIGINT ignored,
        # and Python then never raises KeyboardInterrupt in the demo
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_demo_processes_alive()) < 3:
        time.sleep(0.2)
    assert len(_demo_processes_alive()) >= 3, "the three parties never started"
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err
    time.sleep(0.5)
    assert _demo_processes_alive() == []


def test_minilm_demo_gives_the_plaintext_sentence_embedding(tmp_path):
    import numpy as np

    from permllm.model.loading import load_model
    from permllm.model.prompts import MINILM_SENTENCES
    from permllm.model.reference import encoder_embed

    out = tmp_path / "minilm.json"
    proc = _run_demo("--model", "minilm", "--network", "none", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    weights, tokenizer = load_model("minilm")
    ids = tokenizer(MINILM_SENTENCES[0], truncation=True)["input_ids"]
    want = encoder_embed(weights, ids).numpy()
    got = np.asarray(summary["embedding"])
    assert summary["prompt_tokens"] == len(ids)
    cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine >= 0.999  # the bound; fixed-point error alone is far below it
    assert summary["online_flights"] == 4 + 12 * 6  # see protocols/model/secure_encoder.py
    assert _demo_processes_alive() == []


def test_demo_runs_any_llama_checkpoint_on_disk(tmp_path):
    """`--model PATH`: a Llama-style checkpoint the code has never seen (a tiny random LlamaForCausalLM,
    untied head, another rope theta, saved as a plain transformers folder with SmolLM2's tokenizer)
    runs through the same three processes; the private answer equals transformers' greedy generate."""
    import torch
    from transformers import AutoTokenizer

    from permllm.model.loading import SMOLLM2_GGUF, find_smollm2_gguf
    from permllm.model.prompts import chat_token_ids
    from tests.tiny_model import tiny_hf_llama

    model = tiny_hf_llama(3, hidden=64, intermediate=96, max_position_embeddings=512)
    with torch.no_grad():  # larger logit gaps than the 0.02-std init, so no greedy step is a near tie
        model.lm_head.weight.mul_(40)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(
        str(find_smollm2_gguf().parent), gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    tokenizer.save_pretrained(folder)
    prompt, budget = "Name three colours.", 6
    ids = chat_token_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, len(ids) :].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    assert min(margins) > 0.05, margins  # the precondition for an exact comparison (fixed-point error ~1e-3)

    summary = tmp_path / "out.json"
    model_args = ["--model", str(folder), "--network", "none", "--prompt", prompt, "--max-new-tokens", str(budget)]
    proc = _run_demo(*model_args, "--json", str(summary), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(summary.read_text())
    assert result["token_ids"] == expected
    assert result["prompt_tokens"] == len(ids) and result["generated_tokens"] == len(expected)
    # 2 layers: the same per-layer protocol as SmolLM2 (10 flights per layer in decode, 4 outside)
    assert result["flights_per_token"] == 2 * 10 + 4
    assert _demo_processes_alive() == []


def test_demo_names_a_model_that_is_not_there(tmp_path):
    proc = _run_demo("--model", str(tmp_path / "nothing"), timeout=60)
    assert proc.returncode == 2 and "unknown model" in proc.stderr and "config.json" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
