"""A small random Llama-style model (seeded) for fast end-to-end protocol tests, its config, the seeded
generator of the tiny models' weights, and a tiny random transformers Llama for checkpoint tests."""

from __future__ import annotations

import torch

from permllm.model.weights import DecoderConfig, DecoderLayerWeights, DecoderWeights


def seeded_randn(seed: int):
    """rand(*shape, scale=1.0): float64 standard normal draws times scale, from a generator seeded with seed."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return rand


def decoder_config(
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int = 48,
    vocab: int = 97,
    rms_eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> DecoderConfig:
    """A Llama-style DecoderConfig with a tied head, bos 1 and eos 2 (by default the tiny decoder's)."""
    return DecoderConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        rms_norm_eps=rms_eps,
        rope_theta=rope_theta,
        vocab_size=vocab,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_decoder(seed: int = 0, **shape) -> DecoderWeights:
    """Random weights (seeded) for decoder_config(**shape): layers, hidden, heads, kv_heads, head_dim,
    intermediate, vocab."""
    rand = seeded_randn(seed)
    config = decoder_config(**shape)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer_list = [
        DecoderLayerWeights(
            attn_norm=1 + 0.1 * rand(hidden),
            wq=rand(hidden, q_dim, scale=hidden**-0.5),
            wk=rand(hidden, kv_dim, scale=hidden**-0.5),
            wv=rand(hidden, kv_dim, scale=hidden**-0.5),
            wo=rand(q_dim, hidden, scale=q_dim**-0.5),
            mlp_norm=1 + 0.1 * rand(hidden),
            w_gate=rand(hidden, intermediate, scale=hidden**-0.5),
            w_up=rand(hidden, intermediate, scale=hidden**-0.5),
            w_down=rand(intermediate, hidden, scale=intermediate**-0.5),
        )
        for _ in range(config.num_layers)
    ]
    embed = rand(config.vocab_size, hidden)
    return DecoderWeights(
        config=config, embed=embed, layers=layer_list, final_norm=1 + 0.1 * rand(hidden), lm_head=embed.T
    )


def tiny_hf_llama(seed: int, *, hidden: int, intermediate: int, **config):
    """A random transformers LlamaForCausalLM (eval mode, torch's global generator seeded with seed) that
    differs from SmolLM2 where a loader could go wrong: untied head, rope theta 5000; 2 layers, 4 heads
    (2 of them key/value), SmolLM2's vocabulary of 49152. config: further LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=False,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        **config,
    )
    return LlamaForCausalLM(cfg).eval()
