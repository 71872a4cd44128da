"""The secure BERT-style encoder (all-MiniLM-L6-v2): private sentence embeddings.

Each party builds a `SecureEncoder` from the public architecture and its own view of the linear
weights (`encoder_weights`), then calls `embed(ctx, token_ids, count)` once per sentence. The owner
passes token_ids=None (it never sees them); the helper's dry run passes a `DealerContext` and deals
the material the same calls will consume. One sentence at a time, without padding: attention is
bidirectional over exactly its n tokens, so every softmax row has length n and nothing is masked.

Embedding, n tokens (messages in sequence):
    word embedding (one-hot lookup) + owner-side pos[0..n-1] + type[0]   1
    LayerNorm (permuted, without g and b)                                3
One post-LN layer (the input is the previous LN's dealt output x^, at ACT_BITS):
    residual | QKV linear (input dealt, g and b folded in)               0
    rescale Q, K, V                                                      1   (trunc by 16 bits)
    scores Q K^T (appending Beaver, H groups)                            1
    softmax (permuted rows, H*n rows of n)                               3
    weights @ V (appending Beaver)                                       1
    rescale                                                              1
    output projection (+ b_o)                                            1
    residual add; LayerNorm (permuted)                                   3
    residual | FFN-in linear (input dealt, g and b folded in)            0
    GeLU (permuted, whole-tensor shuffle)                                3
    FFN-out linear (input dealt, + b_out)                                0
    residual add; LayerNorm (permuted)                                   3
                                                                        17
The critical path is 12 flights per layer: the same 17 messages as a decoder layer, in a rotated
order, and again five of them leave the user right after its previous message (its share is already
known to it) and so travel on the same one-way hop: the mask message of the softmax, of the output
projection, of both LayerNorms and of the GeLU. The netsim flight clock measures this depth directly.
Per sentence outside the layers: embedding 1 + embedding LayerNorm 2 (its first message shares the
hop of the one-hot message), pooling 0 (the last LN's g and b folded into a linear on its dealt
output, rows summed locally: exact in the ring), reveal of the pooled sum to the user 1:
4 + 12 * layers flights per sentence (28 for 2 layers, 76 for MiniLM's 6).
Bytes (payload, 8 per ring element, plus one frame header per message; d hidden, H heads, I inter):
    n*vocab + 3 n d + layers * (21 n d + 5 H n^2 + 3 n I) + d elements
The user divides the revealed sum by n (division is not exact in the ring) and L2-normalises it.
"""

from __future__ import annotations

import numpy as np
import torch

from permllm.fixed import ACT_BITS, decode, encode
from permllm.sharing import Shared
from protocols.basic import reveal_to
from protocols.beaver import GrowingOperand, product
from protocols.context import Role
from protocols.functions import GELU, SOFTMAX, layer_normalize
from protocols.linear import LinearWeight, linear, lookup
from protocols.model.encoder_weights import EncoderArch
from protocols.model.step_hooks import StepHooks
from protocols.permute import permuted_apply
from protocols.trunc import trunc


class SecureEncoder(StepHooks):
    """One party's encoder: its weights and the public architecture. Stateless across sentences
    (each `embed` starts fresh attention operands), so one instance embeds any number of sentences."""

    def __init__(self, arch: EncoderArch, weights: dict[str, LinearWeight], max_tokens: int):
        if not 0 < max_tokens <= arch.max_positions:
            raise ValueError(f"max_tokens must be in [1, {arch.max_positions}], got {max_tokens}")
        self.arch = arch
        self.weights = weights
        self.max_tokens = max_tokens
        self._norm = layer_normalize(arch.layer_norm_eps)
        self.step_hooks = []

    def embed(
        self, ctx, token_ids: list[int] | None, count: int, *, normalize: bool | None = None
    ) -> np.ndarray | None:
        """The sentence embedding of `count` tokens (with [CLS] ... [SEP] already added).

        The user passes the token ids and gets the embedding (float64, (hidden,)): mean-pooled over
        the tokens and, if `normalize` (default: arch.normalize), L2-normalised. The owner passes
        None and gets None; so does the helper's dry run."""
        if not 0 < count <= self.max_tokens:
            raise ValueError(f"{count} tokens; this encoder was prepared for 1 to {self.max_tokens}")
        a = self.arch
        keys = [GrowingOperand(f"L{i}.k", transpose=True) for i in range(a.layers)]
        values = [GrowingOperand(f"L{i}.v", transpose=False) for i in range(a.layers)]
        h = self._mark("embedding", ctx, lambda: self._embed(ctx, token_ids, count))
        x = self._mark("norm", ctx, lambda: self._layer_norm(ctx, h, count, "emb.n"))
        for i in range(a.layers):
            x = self._layer(ctx, i, x, count, keys[i], values[i])
        pooled = self._mark("pool", ctx, lambda: linear(ctx, x, self.weights["pool"]))
        total = pooled.map(lambda t: t.sum(dim=0, keepdim=True), shape=(1, a.hidden))
        revealed = self._mark("reveal", ctx, lambda: reveal_to(ctx, Role.USER, total, tag="embedding"))
        if revealed is None:
            return None
        mean = decode(revealed, total.bits)[0].numpy() / count
        if a.normalize if normalize is None else normalize:
            mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return mean

    def _embed(self, ctx, token_ids, count: int) -> Shared:
        """<word[t] + pos[p] + type[0]> at LINEAR_BITS: the one-hot lookup, plus the position and
        token-type rows as an owner-side term (public positions 0..n-1, secret table)."""
        weight = self.weights["embed"]
        words = lookup(ctx, token_ids, count, weight)
        if ctx.dealing:
            return words

        def positions() -> torch.Tensor:
            if weight.bias is None:
                raise ValueError("the owner's embed weight carries no position table (bias)")
            return encode(weight.bias[:count], words.bits)

        return Shared.of(words.local + ctx.owner_term(positions), words.bits)

    def _layer_norm(self, ctx, h: Shared, m: int, tag: str) -> Shared:
        """(h - mean) / sqrt(var + eps) per row, permuted; (m, hidden) dealt at ACT_BITS."""
        d = self.arch.hidden
        return permuted_apply(ctx, h.reshape(-1, 1), self._norm, [d] * m, tag=tag).reshape(m, d)

    def _layer(self, ctx, i: int, x: Shared, m: int, keys: GrowingOperand, values: GrowingOperand) -> Shared:
        d, inter = self.arch.hidden, self.arch.intermediate
        qkv = self._mark("qkv", ctx, lambda: linear(ctx, x, self.weights[f"L{i}.qkv"]))
        residual = qkv.map(lambda t: t[:, :d], shape=(m, d))
        attn = self._attention(ctx, i, qkv, m, keys, values)
        h = residual + attn
        x = self._mark("norm", ctx, lambda: self._layer_norm(ctx, h, m, f"L{i}.n1"))
        ffn = self._mark("mlp", ctx, lambda: linear(ctx, x, self.weights[f"L{i}.ffn_in"]))
        residual = ffn.map(lambda t: t[:, :d], shape=(m, d))
        pre = ffn.map(lambda t: t[:, d:].reshape(-1, 1), shape=(m * inter, 1))
        act = self._mark("mlp", ctx, lambda: permuted_apply(ctx, pre, GELU, [m * inter], tag=f"L{i}.act"))
        out = self._mark("mlp", ctx, lambda: linear(ctx, act.reshape(m, inter), self.weights[f"L{i}.ffn_out"]))
        h = residual + out
        return self._mark("norm", ctx, lambda: self._layer_norm(ctx, h, m, f"L{i}.n2"))

    def _attention(self, ctx, i: int, qkv: Shared, m: int, keys: GrowingOperand, values: GrowingOperand) -> Shared:
        a = self.arch
        d, heads, hd = a.hidden, a.heads, a.head_dim
        projected = qkv.map(lambda t: t[:, d:].contiguous(), shape=(m, 3 * d))
        qkv16 = self._mark("qkv", ctx, lambda: trunc(ctx, projected, projected.bits - ACT_BITS, holder=Role.USER))

        def head_major(start: int):
            return qkv16.map(
                lambda t: t[:, start : start + d].reshape(m, heads, hd).transpose(0, 1).contiguous(),
                shape=(heads, m, hd),
            )

        q, k, v = head_major(0), head_major(d), head_major(2 * d)
        scores = self._mark("scores", ctx, lambda: product(ctx, q, k, keys))
        probs = self._mark(
            "softmax",
            ctx,
            lambda: permuted_apply(ctx, scores.reshape(-1, 1), SOFTMAX, [m] * (heads * m), tag=f"L{i}.sm"),
        )
        mixed = self._mark("weighted_values", ctx, lambda: product(ctx, probs.reshape(heads, m, m), v, values))
        merged = mixed.map(lambda t: t.transpose(0, 1).reshape(m, d), shape=(m, d))
        merged = self._mark(
            "weighted_values", ctx, lambda: trunc(ctx, merged, merged.bits - ACT_BITS, holder=Role.OWNER)
        )
        return self._mark("out_proj", ctx, lambda: linear(ctx, merged, self.weights[f"L{i}.o"]))
