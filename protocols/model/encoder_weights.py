"""BERT-style encoder weights as each party holds them for the secure protocols.

BERT is post-LayerNorm: h = LN(x + sublayer(x)), LN(y) = g * (y - mean) / sqrt(var + eps) + b. The
user only ever computes the bare normalisation y^ = (y - mean) / sqrt(var + eps) on permuted values
(`protocols.functions.layer_normalize`); the owner folds g and b into whatever consumes the LN output.
That output feeds both the next sublayer and the residual branch, so the consumer is one linear layer
with concatenated columns, [diag(g) | diag(g) @ W_next] with bias [b | b @ W_next + b_next]: one call
on the dealt LN output (0 flights) yields the residual value and the next projection together.
Biases are float64 on the owner's LinearWeight and added by the owner at the output scale; the user's
and the helper's LinearWeights have none. Like the decoder, every weight is encoded in fixed point and
masked: W~ = W - U with U from the seed the owner shares with the helper (`weight_mask`).

Linear layers, by name (x @ W orientation, W of shape (d_in, d_out)); (g, b) of L{i}.qkv is the LN
before layer i (the embedding LN for i = 0, the output LN of layer i-1 otherwise):
    embed        vocab -> hidden              word embedding (one-hot input at scale 0, so encoded at
                                              LINEAR_BITS); owner "bias": the (max_positions, hidden)
                                              table pos[p] + type[0], added per position by the owner
    L{i}.qkv     hidden -> 4*hidden           [diag(g) | diag(g) [W_q / sqrt(hd) | W_k | W_v]]
                                              bias [b | b [W_q / sqrt(hd) | W_k | W_v] + [b_q / sqrt(hd) | b_k | b_v]]
    L{i}.o       hidden -> hidden             W_o, bias b_o
    L{i}.ffn_in  hidden -> hidden + inter     [diag(g_attn) | diag(g_attn) W_in], bias [b_attn | b_attn W_in + b_in]
    L{i}.ffn_out inter -> hidden              W_out, bias b_out
    pool         hidden -> hidden             diag(g_out) of the last layer, bias b_out LN of the last layer
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from permllm.fixed import LINEAR_BITS, WEIGHT_BITS, encode
from protocols.linear import LinearWeight
from protocols.model.decoder_weights import masked_weight, packed, received_weight, shape_only_weights, weight_mask

__all__ = [
    "EncoderArch",
    "folded_float_weights",
    "helper_weights",
    "linear_shapes",
    "masked_weight",
    "owner_weights",
    "user_weight",
    "weight_mask",
]


@dataclass(frozen=True)
class EncoderArch:
    """The public architecture both parties and the helper agree on (sent in the handshake).

    normalize: the user L2-normalises the pooled embedding (sentence-transformers' Normalize module).
    """

    hidden: int
    layers: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    layer_norm_eps: float
    normalize: bool = True

    @staticmethod
    def from_config(config) -> EncoderArch:
        return EncoderArch(
            hidden=int(config.hidden_size),
            layers=int(config.num_layers),
            heads=int(config.num_heads),
            head_dim=int(config.head_dim),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            max_positions=int(config.max_position_embeddings),
            layer_norm_eps=float(config.layer_norm_eps),
            normalize=bool(getattr(config, "normalize", True)),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def linear_shapes(arch: EncoderArch) -> dict[str, tuple[int, int, int]]:
    """name -> (d_in, d_out, bits) for every linear layer of the secure encoder."""
    d = arch.hidden
    if arch.heads * arch.head_dim != d:
        raise ValueError(f"heads * head_dim = {arch.heads * arch.head_dim} must equal hidden = {d}")
    shapes = {"embed": (arch.vocab, d, LINEAR_BITS)}
    for i in range(arch.layers):
        shapes[f"L{i}.qkv"] = (d, 4 * d, WEIGHT_BITS)
        shapes[f"L{i}.o"] = (d, d, WEIGHT_BITS)
        shapes[f"L{i}.ffn_in"] = (d, d + arch.intermediate, WEIGHT_BITS)
        shapes[f"L{i}.ffn_out"] = (arch.intermediate, d, WEIGHT_BITS)
    shapes["pool"] = (d, d, WEIGHT_BITS)
    return shapes


def _after_norm(gain: torch.Tensor, bias: torch.Tensor, w_next: torch.Tensor, b_next: torch.Tensor):
    """[diag(g) | diag(g) W_next] and [b | b W_next + b_next]: the residual and the next projection."""
    w = torch.cat([torch.diag(gain), gain[:, None] * w_next], dim=1)
    b = torch.cat([bias, bias @ w_next + b_next])
    return w, b


def folded_float_weights(weights) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The owner's float64 weights with LayerNorm gains/biases and the attention scale folded in:
    name -> (W, bias). The "embed" bias is the per-position table pos[p] + type[0] (max_positions, hidden)."""
    arch = EncoderArch.from_config(weights.config)
    scale = 1.0 / math.sqrt(arch.head_dim)
    folded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {
        "embed": (weights.word_embed, weights.pos_embed + weights.type_embed[0][None, :]),
    }
    gain, bias = weights.embed_ln_weight, weights.embed_ln_bias
    for i, layer in enumerate(weights.layers):
        w_qkv = torch.cat([layer.wq * scale, layer.wk, layer.wv], dim=1)
        b_qkv = torch.cat([layer.bq * scale, layer.bk, layer.bv])
        folded[f"L{i}.qkv"] = _after_norm(gain, bias, w_qkv, b_qkv)
        folded[f"L{i}.o"] = (layer.wo, layer.bo)
        folded[f"L{i}.ffn_in"] = _after_norm(layer.attn_ln_weight, layer.attn_ln_bias, layer.w_in, layer.b_in)
        folded[f"L{i}.ffn_out"] = (layer.w_out, layer.b_out)
        gain, bias = layer.out_ln_weight, layer.out_ln_bias
    folded["pool"] = (torch.diag(gain), bias.clone())
    return folded


def owner_weights(weights, progress=None, *, release: bool = False) -> dict[str, LinearWeight]:
    """The owner's LinearWeights (local = W encoded and `packed`, bias float64; no mask: `masked_weight`
    derives W - U for the preparation). `progress(n)` is called per weight. release: accepted for the
    decoder's signature; the encoder (22M parameters) is folded at once and its floats freed by the caller."""
    arch = EncoderArch.from_config(weights.config)
    shapes = linear_shapes(arch)
    out = {}
    for name, (w, bias) in folded_float_weights(weights).items():
        d_in, d_out, bits = shapes[name]
        if tuple(w.shape) != (d_in, d_out):
            raise ValueError(f"{name}: weight has shape {tuple(w.shape)}, expected {(d_in, d_out)}")
        expected_bias = (arch.max_positions, d_out) if name == "embed" else (d_out,)
        if bias is not None and tuple(bias.shape) != expected_bias:
            raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected {expected_bias}")
        out[name] = LinearWeight(
            name,
            bits,
            d_in,
            d_out,
            local=packed(encode(w, bits)),
            bias=None if bias is None else bias.to(torch.float64).contiguous(),
        )
        if progress:
            progress(1)
    return out


def user_weight(name: str, arch: EncoderArch, masked: torch.Tensor) -> LinearWeight:
    """The user's LinearWeight from the masked W~ it received (no bias: biases stay with the owner)."""
    return received_weight(name, linear_shapes(arch), masked)


def helper_weights(arch: EncoderArch) -> dict[str, LinearWeight]:
    """Shape-only LinearWeights for the helper's dry run (it gets U through weight_mask)."""
    return shape_only_weights(linear_shapes(arch))
