"""A small random Llama-style model (seeded) for fast end-to-end protocol tests."""

from __future__ import annotations

import torch

from permllm.model.weights import DecoderConfig, DecoderLayerWeights, DecoderWeights


def tiny_decoder(
    seed: int = 0,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int = 48,
    vocab: int = 97,
) -> DecoderWeights:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    config = DecoderConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        vocab_size=vocab,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    layer_list = [
        DecoderLayerWeights(
            attn_norm=1 + 0.1 * rand(hidden),
            wq=rand(hidden, heads * head_dim, scale=hidden**-0.5),
            wk=rand(hidden, kv_heads * head_dim, scale=hidden**-0.5),
            wv=rand(hidden, kv_heads * head_dim, scale=hidden**-0.5),
            wo=rand(heads * head_dim, hidden, scale=(heads * head_dim) ** -0.5),
            mlp_norm=1 + 0.1 * rand(hidden),
            w_gate=rand(hidden, intermediate, scale=hidden**-0.5),
            w_up=rand(hidden, intermediate, scale=hidden**-0.5),
            w_down=rand(intermediate, hidden, scale=intermediate**-0.5),
        )
        for _ in range(layers)
    ]
    embed = rand(vocab, hidden)
    return DecoderWeights(
        config=config, embed=embed, layers=layer_list, final_norm=1 + 0.1 * rand(hidden), lm_head=embed.T
    )
