"""A small random BERT-style encoder (seeded) for fast end-to-end protocol tests."""

from __future__ import annotations

from permllm.model.weights import EncoderConfig, EncoderLayerWeights, EncoderWeights
from tests.tiny_model import seeded_randn


def tiny_encoder(
    seed: int = 0,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 48,
    vocab: int = 50,
    max_positions: int = 64,
) -> EncoderWeights:
    """Random weights scaled like a trained BERT (unit-variance activations, gains near 1, small biases)."""
    rand = seeded_randn(seed)

    def gain():
        return 1 + 0.1 * rand(hidden)

    config = EncoderConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=intermediate,
        layer_norm_eps=1e-12,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        type_vocab_size=2,
    )
    layer_list = [
        EncoderLayerWeights(
            wq=rand(hidden, hidden, scale=hidden**-0.5),
            bq=rand(hidden, scale=0.1),
            wk=rand(hidden, hidden, scale=hidden**-0.5),
            bk=rand(hidden, scale=0.1),
            wv=rand(hidden, hidden, scale=hidden**-0.5),
            bv=rand(hidden, scale=0.1),
            wo=rand(hidden, hidden, scale=hidden**-0.5),
            bo=rand(hidden, scale=0.1),
            attn_ln_weight=gain(),
            attn_ln_bias=rand(hidden, scale=0.1),
            w_in=rand(hidden, intermediate, scale=hidden**-0.5),
            b_in=rand(intermediate, scale=0.1),
            w_out=rand(intermediate, hidden, scale=intermediate**-0.5),
            b_out=rand(hidden, scale=0.1),
            out_ln_weight=gain(),
            out_ln_bias=rand(hidden, scale=0.1),
        )
        for _ in range(layers)
    ]
    return EncoderWeights(
        config=config,
        word_embed=rand(vocab, hidden),
        pos_embed=rand(max_positions, hidden, scale=0.3),
        type_embed=rand(2, hidden, scale=0.3),
        embed_ln_weight=gain(),
        embed_ln_bias=rand(hidden, scale=0.1),
        layers=layer_list,
    )
