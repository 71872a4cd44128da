"""Float64 plaintext reference forward passes, computed directly from the extracted weights.

This is the ground truth the secure engine is compared against, stage by stage, so every block is a
small standalone function on plain float64 tensors (row-vector activations, ``x @ W`` weights):

Decoder (Llama family): ``rms_norm``, ``rope_cos_sin`` / ``rotate_half`` / ``apply_rope`` (HF
"rotate_half" convention), ``causal_attention`` (GQA), ``swiglu_mlp``, ``decoder_layer``; the stateful
``DecoderReference`` adds a KV cache, ``prefill``, ``decode`` and ``generate_greedy``.

Encoder (BERT family, post-LayerNorm): ``layer_norm``, ``gelu`` (exact erf), ``encoder_embeddings``,
``encoder_attention``, ``encoder_layer``, ``encoder_forward``, ``mean_pool``, ``encoder_embed``.

Stage tracing: ``DecoderReference.prefill/decode(..., trace=dict)`` and ``encoder_forward(..., trace=dict)``
fill the dict with the intermediate tensors under the names listed in ``DECODER_TRACE_KEYS`` /
``ENCODER_TRACE_KEYS`` (per layer, prefixed ``"layer{i}."``).
"""

from __future__ import annotations

import math

import torch

from permllm.model.weights import (
    DecoderConfig,
    DecoderLayerWeights,
    DecoderWeights,
    EncoderConfig,
    EncoderLayerWeights,
    EncoderWeights,
)

DTYPE = torch.float64

# per-layer names recorded in a decoder trace ("layer{i}.<name>"), plus "embed", "final_norm", "logits"
DECODER_TRACE_KEYS = (
    "attn_norm",  # (n, d)        RMSNorm(x) before attention
    "q",  # (n, H, D)     after RoPE
    "k",  # (n, KV, D)    after RoPE (the new cache rows)
    "v",  # (n, KV, D)
    "attn",  # (n, H*D)      attention context, before wo
    "attn_out",  # (n, d)        context @ wo
    "resid_mid",  # (n, d)        x + attn_out
    "mlp_norm",  # (n, d)
    "gate",  # (n, I)        h @ w_gate (pre-SiLU)
    "up",  # (n, I)        h @ w_up
    "act",  # (n, I)        silu(gate) * up
    "mlp_out",  # (n, d)        act @ w_down
    "resid_out",  # (n, d)        resid_mid + mlp_out (next layer's input)
)
# per-layer names recorded in an encoder trace, plus "embed" (post embedding LayerNorm)
ENCODER_TRACE_KEYS = ("attn", "attn_out", "attn_ln", "inter", "act", "mlp_out", "out_ln")


def _as_ids(ids) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    return t.reshape(-1) if t.dim() == 0 else t


# ==============================================================================================
# Decoder blocks
# ==============================================================================================


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * gain over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * gain


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n, head_dim) for absolute ``positions`` (HF layout: frequencies repeated twice).

    inv_freq[j] = theta^(-2j/D), j < D/2; angle[p, j] = p * inv_freq[j]; cos = cos(cat(angle, angle)).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=DTYPE) / head_dim))
    angles = positions.to(DTYPE)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (n, heads, D); cos/sin: (n, D). Returns x * cos + rotate_half(x) * sin."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax (max-subtracted); -inf entries get probability 0."""
    m = scores.amax(dim=dim, keepdim=True)
    e = torch.exp(scores - m)
    return e / e.sum(dim=dim, keepdim=True)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor
) -> torch.Tensor:
    """Grouped-query causal attention.

    q: (n, H, D); k, v: (m, KV, D); query head h uses KV head h // (H / KV). Query i attends to keys j with
    k_positions[j] <= q_positions[i]. Scores are scaled by 1/sqrt(D). Returns the context (n, H*D).
    """
    n, H, D = q.shape
    m, kv_heads, _ = k.shape
    group = H // kv_heads
    # query head h = kv * group + g; stack each KV head's group of query heads: (KV, group*n, D)
    q_g = q.reshape(n, kv_heads, group, D).permute(1, 2, 0, 3).reshape(kv_heads, group * n, D)
    scores = torch.bmm(q_g, k.permute(1, 2, 0)) / math.sqrt(D)  # (KV, group*n, m)
    scores = scores.reshape(kv_heads, group, n, m)
    allowed = k_positions[None, :] <= q_positions[:, None]  # (n, m)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = softmax(scores, dim=-1).reshape(kv_heads, group * n, m)
    ctx = torch.bmm(probs, v.permute(1, 0, 2))  # (KV, group*n, D)
    return ctx.reshape(kv_heads, group, n, D).permute(2, 0, 1, 3).reshape(n, H * D)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def swiglu_mlp(
    h: torch.Tensor, layer: DecoderLayerWeights, trace: dict | None = None, prefix: str = ""
) -> torch.Tensor:
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down."""
    gate = h @ layer.w_gate
    up = h @ layer.w_up
    act = silu(gate) * up
    out = act @ layer.w_down
    if trace is not None:
        trace.update({prefix + "gate": gate, prefix + "up": up, prefix + "act": act, prefix + "mlp_out": out})
    return out


def decoder_layer(
    x: torch.Tensor,
    layer: DecoderLayerWeights,
    config: DecoderConfig,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    past_positions: torch.Tensor | None = None,
    trace: dict | None = None,
    prefix: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-norm Llama block on x: (n, d) at absolute ``positions``.

    ``past_k``/``past_v`` (m, KV, D) are cached keys (already rotated) / values at ``past_positions``.
    Returns (x_out (n, d), k_all (m+n, KV, D), v_all (m+n, KV, D)).
    """
    c = config
    n = x.shape[0]
    h = rms_norm(x, layer.attn_norm, c.rms_norm_eps)
    q = apply_rope((h @ layer.wq).reshape(n, c.num_heads, c.head_dim), cos, sin)
    k = apply_rope((h @ layer.wk).reshape(n, c.num_kv_heads, c.head_dim), cos, sin)
    v = (h @ layer.wv).reshape(n, c.num_kv_heads, c.head_dim)
    if past_k is not None:
        k_all, v_all = torch.cat([past_k, k]), torch.cat([past_v, v])
        k_pos = torch.cat([past_positions, positions])
    else:
        k_all, v_all, k_pos = k, v, positions
    ctx = causal_attention(q, k_all, v_all, positions, k_pos)
    attn_out = ctx @ layer.wo
    x_mid = x + attn_out
    h2 = rms_norm(x_mid, layer.mlp_norm, c.rms_norm_eps)
    x_out = x_mid + swiglu_mlp(h2, layer, trace, prefix)
    if trace is not None:
        trace.update(
            {
                prefix + "attn_norm": h,
                prefix + "q": q,
                prefix + "k": k,
                prefix + "v": v,
                prefix + "attn": ctx,
                prefix + "attn_out": attn_out,
                prefix + "resid_mid": x_mid,
                prefix + "mlp_norm": h2,
                prefix + "resid_out": x_out,
            }
        )
    return x_out, k_all, v_all


class DecoderReference:
    """Stateful float64 decoder with a KV cache.

    ``prefill(ids)`` resets the cache and returns logits (n, vocab); ``extend(ids)`` appends a chunk after the
    cached positions; ``decode(id)`` appends one token and returns its logits (vocab,).
    """

    def __init__(self, weights: DecoderWeights):
        self.weights = weights
        self.config = weights.config
        self.reset()

    def reset(self) -> None:
        self.k_cache: list[torch.Tensor | None] = [None] * self.config.num_layers
        self.v_cache: list[torch.Tensor | None] = [None] * self.config.num_layers
        self.length = 0  # tokens in the cache = next absolute position

    @torch.no_grad()
    def extend(self, ids, trace: dict | None = None) -> torch.Tensor:
        """Run tokens ``ids`` at positions length .. length+n-1 against the cache; returns logits (n, vocab)."""
        w, c = self.weights, self.config
        ids = _as_ids(ids)
        n = ids.shape[0]
        if n == 0:
            raise ValueError("extend() needs at least one token")
        positions = torch.arange(self.length, self.length + n)
        past_positions = torch.arange(0, self.length)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        x = w.embed[ids]
        if trace is not None:
            trace["embed"] = x
        for i, layer in enumerate(w.layers):
            x, self.k_cache[i], self.v_cache[i] = decoder_layer(
                x,
                layer,
                c,
                positions,
                cos,
                sin,
                self.k_cache[i],
                self.v_cache[i],
                past_positions,
                trace=trace,
                prefix=f"layer{i}.",
            )
        self.length += n
        h = rms_norm(x, w.final_norm, c.rms_norm_eps)
        logits = h @ w.lm_head
        if trace is not None:
            trace["final_norm"] = h
            trace["logits"] = logits
        return logits

    def prefill(self, ids, trace: dict | None = None) -> torch.Tensor:
        """Fresh cache, then logits (n, vocab) for the prompt ``ids``."""
        self.reset()
        return self.extend(ids, trace)

    def decode(self, token_id: int, trace: dict | None = None) -> torch.Tensor:
        """Append one token at position ``length``; returns its logits (vocab,)."""
        return self.extend([int(token_id)], trace)[0]

    def generate_greedy(self, ids, n: int, stop_at_eos: bool = True) -> list[int]:
        """Greedy (argmax) continuation of ``ids`` by up to ``n`` new tokens.

        Stops after emitting the config's eos token when ``stop_at_eos`` (the eos is included, as HF does).
        """
        out: list[int] = []
        if n <= 0:
            return out
        logits = self.prefill(ids)[-1]
        eos = self.config.eos_token_id
        while True:
            tok = int(torch.argmax(logits))
            out.append(tok)
            if len(out) >= n or (stop_at_eos and eos is not None and tok == eos):
                return out
            logits = self.decode(tok)


# ==============================================================================================
# Encoder blocks (BERT, post-LayerNorm)
# ==============================================================================================


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (biased variance)."""
    mu = x.mean(dim=-1, keepdim=True)
    var = (x - mu).pow(2).mean(dim=-1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GeLU: 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def encoder_embeddings(
    weights: EncoderWeights, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """LayerNorm(word[ids] + pos[0..n-1] + type[token_type_ids]) for ids (b, n) -> (b, n, d)."""
    c = weights.config
    b, n = ids.shape
    if n > c.max_position_embeddings:
        raise ValueError(f"sequence of {n} tokens exceeds max_position_embeddings={c.max_position_embeddings}")
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(ids)
    x = weights.word_embed[ids] + weights.pos_embed[:n][None] + weights.type_embed[token_type_ids]
    return layer_norm(x, weights.embed_ln_weight, weights.embed_ln_bias, c.layer_norm_eps)


def encoder_attention(
    x: torch.Tensor, layer: EncoderLayerWeights, config: EncoderConfig, key_mask: torch.Tensor
) -> torch.Tensor:
    """Bidirectional multi-head attention context (b, n, d), before the output dense.

    key_mask: (b, n) bool, True for real tokens; padded keys get probability 0.
    """
    b, n, d = x.shape
    H, D = config.num_heads, config.head_dim
    q = (x @ layer.wq + layer.bq).reshape(b, n, H, D)
    k = (x @ layer.wk + layer.bk).reshape(b, n, H, D)
    v = (x @ layer.wv + layer.bv).reshape(b, n, H, D)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, n, d)


def encoder_layer(
    x: torch.Tensor,
    layer: EncoderLayerWeights,
    config: EncoderConfig,
    key_mask: torch.Tensor,
    trace: dict | None = None,
    prefix: str = "",
) -> torch.Tensor:
    """Post-LN BERT block: h = LN(x + attn(x) @ wo + bo); out = LN(h + gelu(h @ w_in + b_in) @ w_out + b_out)."""
    eps = config.layer_norm_eps
    ctx = encoder_attention(x, layer, config, key_mask)
    attn_out = ctx @ layer.wo + layer.bo
    h = layer_norm(x + attn_out, layer.attn_ln_weight, layer.attn_ln_bias, eps)
    inter = h @ layer.w_in + layer.b_in
    act = gelu(inter)
    mlp_out = act @ layer.w_out + layer.b_out
    out = layer_norm(h + mlp_out, layer.out_ln_weight, layer.out_ln_bias, eps)
    if trace is not None:
        trace.update(
            {
                prefix + "attn": ctx,
                prefix + "attn_out": attn_out,
                prefix + "attn_ln": h,
                prefix + "inter": inter,
                prefix + "act": act,
                prefix + "mlp_out": mlp_out,
                prefix + "out_ln": out,
            }
        )
    return out


def _batch_inputs(ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor, bool]:
    ids = torch.as_tensor(ids, dtype=torch.long)
    single = ids.dim() == 1
    if single:
        ids = ids[None]
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(attention_mask).to(torch.bool)
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
    return ids, mask, single


@torch.no_grad()
def encoder_forward(
    weights: EncoderWeights, ids, attention_mask=None, token_type_ids=None, trace: dict | None = None
) -> torch.Tensor:
    """Token states of the last layer: ids (b, n) or (n,) -> (b, n, d) or (n, d)."""
    ids, mask, single = _batch_inputs(ids, attention_mask)
    if token_type_ids is not None:
        token_type_ids = torch.as_tensor(token_type_ids, dtype=torch.long).reshape(ids.shape)
    x = encoder_embeddings(weights, ids, token_type_ids)
    if trace is not None:
        trace["embed"] = x
    for i, layer in enumerate(weights.layers):
        x = encoder_layer(x, layer, weights.config, mask, trace, f"layer{i}.")
    return x[0] if single else x


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over positions where mask is 1: (b, n, d), (b, n) -> (b, d)."""
    m = mask.to(states.dtype)[..., None]
    return (states * m).sum(dim=-2) / m.sum(dim=-2).clamp(min=1e-9)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


@torch.no_grad()
def encoder_embed(
    weights: EncoderWeights, ids, attention_mask=None, normalize: bool = True, token_type_ids=None
) -> torch.Tensor:
    """Sentence embedding(s): mean pooling over the attention mask, then L2 normalisation.

    With ``normalize=True`` (default) this reproduces sentence-transformers all-MiniLM-L6-v2
    (modules.json: Transformer -> Pooling(mean) -> Normalize). ids (n,) -> (d,); ids (b, n) -> (b, d).
    """
    ids_b, mask, single = _batch_inputs(ids, attention_mask)
    states = encoder_forward(weights, ids_b, mask, token_type_ids)
    pooled = mean_pool(states, mask)
    if normalize:
        pooled = l2_normalize(pooled)
    return pooled[0] if single else pooled


def decoder_reference(weights: DecoderWeights) -> DecoderReference:
    """Convenience alias for ``DecoderReference(weights)``."""
    return DecoderReference(weights)


__all__ = [
    "DECODER_TRACE_KEYS",
    "ENCODER_TRACE_KEYS",
    "DecoderReference",
    "apply_rope",
    "causal_attention",
    "decoder_layer",
    "decoder_reference",
    "encoder_attention",
    "encoder_embed",
    "encoder_embeddings",
    "encoder_forward",
    "encoder_layer",
    "gelu",
    "l2_normalize",
    "layer_norm",
    "mean_pool",
    "rms_norm",
    "rope_cos_sin",
    "rotate_half",
    "silu",
    "softmax",
]
