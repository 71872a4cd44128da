"""Llama-style decoder weights as each party holds them for the secure protocols.

The owner folds what must stay hidden from the user into the linear layers (the RMSNorm gains
multiply the rows of the next layer's weight; the attention's 1/sqrt(head_dim) scales W_q), encodes
every weight in fixed point, and masks it: W~ = W - U with U from the seed it shares with the helper.
The user receives W~ once (preparation); the helper regenerates U; only the owner holds W.

Linear layers, by name (x @ W orientation, W of shape (d_in, d_out)):
    L{i}.qkv      hidden -> heads*hd + 2*kv_heads*hd   diag(g_attn) [W_q / sqrt(hd) | W_k | W_v]
    L{i}.o        heads*hd -> hidden
    L{i}.gate_up  hidden -> 2*intermediate              diag(g_mlp) [gate_0, up_0, gate_1, up_1, ...]
    L{i}.down     intermediate -> hidden
    embed         vocab -> hidden   (one-hot input at scale 0, so encoded at LINEAR_BITS)
    lm_head       hidden -> vocab   diag(g_final) W_head
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from permllm.fixed import LINEAR_BITS, WEIGHT_BITS, encode
from permllm.prg import Prg
from protocols.linear import LinearWeight


@dataclass(frozen=True)
class DecoderArch:
    """The public architecture both parties and the helper agree on (sent in the handshake)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float

    @staticmethod
    def from_config(config) -> DecoderArch:
        return DecoderArch(
            hidden=int(config.hidden_size),
            layers=int(config.num_layers),
            heads=int(config.num_heads),
            kv_heads=int(config.num_kv_heads),
            head_dim=int(config.head_dim),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            rms_eps=float(config.rms_norm_eps),
            rope_theta=float(config.rope_theta),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def linear_shapes(arch: DecoderArch) -> dict[str, tuple[int, int, int]]:
    """name -> (d_in, d_out, bits) for every linear layer of the secure decoder."""
    qkv_out = (arch.heads + 2 * arch.kv_heads) * arch.head_dim
    shapes = {"embed": (arch.vocab, arch.hidden, LINEAR_BITS), "lm_head": (arch.hidden, arch.vocab, WEIGHT_BITS)}
    for i in range(arch.layers):
        shapes[f"L{i}.qkv"] = (arch.hidden, qkv_out, WEIGHT_BITS)
        shapes[f"L{i}.o"] = (arch.heads * arch.head_dim, arch.hidden, WEIGHT_BITS)
        shapes[f"L{i}.gate_up"] = (arch.hidden, 2 * arch.intermediate, WEIGHT_BITS)
        shapes[f"L{i}.down"] = (arch.intermediate, arch.hidden, WEIGHT_BITS)
    return shapes


def weight_mask(seed: bytes, name: str, d_in: int, d_out: int) -> torch.Tensor:
    """The mask U of a linear weight, from the seed the owner shares with the helper."""
    return Prg(seed, f"weight/{name}").int64((d_in, d_out))


INT32_LIMIT = 2**31
"""An encoded weight is held as int32 when every entry has magnitude below this."""


def packed(encoded: torch.Tensor) -> torch.Tensor:
    """An encoded weight as the owner holds it: int32 where every entry fits (half the memory; the
    ring products widen it exactly, `permllm.ring_matmul`), otherwise the int64 itself. Contiguous:
    a transposed view (the tied lm_head) makes the products ~9x slower.

    SmolLM2-135M at WEIGHT_BITS = 16: every layer's weight and the lm_head fit in 20 bits; the
    embedding at LINEAR_BITS = 32 needs 34 (|w| <= 1.97) and stays int64."""
    if encoded.numel() and int(encoded.abs().max()) < INT32_LIMIT:
        return encoded.to(torch.int32).contiguous()
    return encoded.contiguous()


def folded_float_weights(weights) -> dict[str, torch.Tensor]:
    """The owner's float64 weights with norm gains and the attention scale folded in (name -> W)."""
    arch = DecoderArch.from_config(weights.config)
    folded = {"embed": weights.embed, "lm_head": weights.final_norm[:, None] * weights.lm_head}
    scale = 1.0 / math.sqrt(arch.head_dim)
    for i, layer in enumerate(weights.layers):
        qkv = torch.cat([layer.wq * scale, layer.wk, layer.wv], dim=1)
        folded[f"L{i}.qkv"] = layer.attn_norm[:, None] * qkv
        folded[f"L{i}.o"] = layer.wo
        gate_up = torch.stack([layer.w_gate, layer.w_up], dim=2).reshape(arch.hidden, 2 * arch.intermediate)
        folded[f"L{i}.gate_up"] = layer.mlp_norm[:, None] * gate_up
        folded[f"L{i}.down"] = layer.w_down
    return folded


def owner_weights(weights, seed: bytes, progress=None) -> dict[str, LinearWeight]:
    """The owner's LinearWeights (local = W encoded and `packed`, mask = U). `progress(n)` is called per weight."""
    arch = DecoderArch.from_config(weights.config)
    shapes = linear_shapes(arch)
    out = {}
    for name, w in folded_float_weights(weights).items():
        d_in, d_out, bits = shapes[name]
        if tuple(w.shape) != (d_in, d_out):
            raise ValueError(f"{name}: weight has shape {tuple(w.shape)}, expected {(d_in, d_out)}")
        out[name] = LinearWeight(
            name, bits, d_in, d_out, local=packed(encode(w, bits)), mask=weight_mask(seed, name, d_in, d_out)
        )
        if progress:
            progress(1)
    return out


def received_weight(name: str, shapes: dict, masked: torch.Tensor) -> LinearWeight:
    """A LinearWeight holding the masked W~ received for `name`, checked against `shapes` (`linear_shapes`)."""
    d_in, d_out, bits = shapes[name]
    if tuple(masked.shape) != (d_in, d_out):
        raise ValueError(f"{name}: received masked weight of shape {tuple(masked.shape)}, expected {(d_in, d_out)}")
    return LinearWeight(name, bits, d_in, d_out, local=masked.contiguous())


def shape_only_weights(shapes: dict) -> dict[str, LinearWeight]:
    """Shape-only LinearWeights for the helper's dry run (it gets U through weight_mask)."""
    return {name: LinearWeight(name, bits, d_in, d_out) for name, (d_in, d_out, bits) in shapes.items()}


def user_weight(name: str, arch: DecoderArch, masked: torch.Tensor) -> LinearWeight:
    """The user's LinearWeight from the masked W~ it received."""
    return received_weight(name, linear_shapes(arch), masked)


def helper_weights(arch: DecoderArch) -> dict[str, LinearWeight]:
    """Shape-only LinearWeights for the helper's dry run (it gets U through weight_mask)."""
    return shape_only_weights(linear_shapes(arch))
