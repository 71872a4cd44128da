"""`permllm make-checkpoint`: synthetic Llama checkpoints with real shapes and seeded random weights
(bench/permllm_bench/checkpoints.py). The real shapes are checked through their configs only; the folder a
build writes is checked with a tiny shape of SmolLM2's vocabulary."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from permllm.errors import ConfigError
from permllm.model.hf_mapping import decoder_config_from_hf
from permllm_bench import checkpoints
from permllm_bench.checkpoints import SHAPES, Shape, build_checkpoint, llama_config

TINY = Shape("tiny", "Tiny", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, rope_theta=5000.0)


class _Tokenizer:
    """Stands in for the bundled tokenizer: its length, special ids and save_pretrained."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __len__(self):
        return 49152

    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize(
    "name, params",
    # SmolLM2-135M / 360M / 1.7B: 134,515,008 / 361,821,120 / 1,711,376,384 parameters (tied head)
    [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120), ("smollm2-1.7b", 1_711_376_384)],
)
def test_shapes_are_smollm2s_configurations(name, params):
    shape = SHAPES[name]
    assert shape.parameters() == params
    cfg = decoder_config_from_hf(llama_config(shape, seed=5))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        shape.hidden,
        shape.layers,
        shape.heads,
        shape.kv_heads,
    )
    assert cfg.head_dim == 64 and cfg.intermediate_size == shape.intermediate and cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
    assert cfg.rope_theta == (130000.0 if name == "smollm2-1.7b" else 100000.0)


def test_the_360m_and_1_7b_shapes():
    s = SHAPES["smollm2-360m"]
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate) == (960, 32, 15, 5, 2560)
    s = SHAPES["smollm2-1.7b"]
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate) == (2048, 24, 32, 32, 8192)


def test_a_build_loads_as_a_tied_llama_with_seeded_weights(tmp_path):
    from permllm.model.loading import decoder_weights_from_hf, load_hf_decoder

    done = build_checkpoint(TINY, 7, tmp_path / "a", tokenizer=_Tokenizer())
    build_checkpoint(TINY, 7, tmp_path / "b", tokenizer=_Tokenizer())
    build_checkpoint(TINY, 8, tmp_path / "c", tokenizer=_Tokenizer())
    assert done["parameters"] == TINY.parameters() and done["bytes"] == 2 * TINY.parameters()
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + TINY.layers  # embedding + norm, then one per layer
    assert "lm_head.weight" not in index["weight_map"]
    model, _ = load_hf_decoder(tmp_path / "a", tokenizer=False)
    assert model.config.synthetic == {"shape": "tiny", "label": "Tiny", "seed": 7, "init_std": 0.02}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    weights = decoder_weights_from_hf(model)
    assert weights.config.hidden_size == 32 and weights.config.num_kv_heads == 2
    # std 0.02 draws (bfloat16), gains of one
    assert abs(float(weights.embed.std()) - 0.02) < 1e-3
    assert abs(float(weights.layers[1].w_up.std()) - 0.02) < 2e-3
    assert torch.equal(weights.layers[0].attn_norm, torch.ones(32, dtype=weights.layers[0].attn_norm.dtype))
    # the same seed gives the same tensors, another seed others
    same, _ = load_hf_decoder(tmp_path / "b", tokenizer=False)
    other, _ = load_hf_decoder(tmp_path / "c", tokenizer=False)
    a, b, c = (m.state_dict()["model.layers.1.mlp.down_proj.weight"] for m in (model, same, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_builds_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown shape"):
        build_checkpoint("gpt-5", 0, tmp_path / "x", tokenizer=_Tokenizer())
    with pytest.raises(ConfigError, match="dtype"):
        build_checkpoint(TINY, 0, tmp_path / "x", dtype="int8", tokenizer=_Tokenizer())
    with pytest.raises(ConfigError, match="seed"):
        build_checkpoint(TINY, -1, tmp_path / "x", tokenizer=_Tokenizer())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        build_checkpoint(TINY, 0, tmp_path / "full", tokenizer=_Tokenizer())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        build_checkpoint(TINY, 0, tmp_path / "file", tokenizer=_Tokenizer())

    class Small(_Tokenizer):
        def __len__(self):
            return 97

    with pytest.raises(ConfigError, match="97 tokens"):
        build_checkpoint(TINY, 0, tmp_path / "y", tokenizer=Small())


def test_the_command_builds_the_named_shape(tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(checkpoints, "build_checkpoint", lambda *a, **k: built.append((a, k)) or _done(a[0]))
    parser = argparse.ArgumentParser()
    checkpoints.COMMAND.add_arguments(parser)
    args = parser.parse_args(["--shape", "smollm2-360m", "--seed", "3", "--out", str(tmp_path / "m")])
    assert checkpoints.COMMAND.run(args) == 0
    assert built == [(("smollm2-360m", 3, str(tmp_path / "m")), {"dtype": "bfloat16", "force": False})]
    assert "SmolLM2-360M shape (362M parameters, 32 layers, hidden 960), seed 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--shape", "smollm2-7b", "--out", "x"])


def _done(name):
    return {"shape": name, "parameters": SHAPES[name].parameters(), "bytes": 1, "seconds": 0.0, "out": "m"}


def test_module_entry_reports_errors(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert checkpoints.main(["--shape", "smollm2-135m", "--out", str(tmp_path)]) == 2
    assert "permllm make-checkpoint: error:" in capsys.readouterr().err


@pytest.mark.model
def test_the_bundled_tokenizer_is_saved_with_the_checkpoint(tmp_path, smollm2_gguf):
    from parties.models import load_tokenizer

    build_checkpoint(TINY, 0, tmp_path / "m")
    tok = load_tokenizer(str(tmp_path / "m"))
    assert len(tok) == 49152 and tok.eos_token_id == 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
