"""Float64 plaintext reference of a BERT-style (post-LayerNorm) sentence encoder.

Small standalone blocks on plain float64 tensors: ``layer_norm``, ``gelu`` (exact erf),
``encoder_embeddings``, ``encoder_attention``, ``encoder_layer``, ``encoder_forward``, ``mean_pool``,
``encoder_embed``. ``encoder_forward(..., trace=dict)`` fills the dict with the intermediate tensors
named in ``ENCODER_TRACE_KEYS`` (per layer, prefixed ``"layer{i}."``; plus ``"embed"``).
"""

from __future__ import annotations

import math

import torch

from permllm.model.decoder_reference import softmax
from permllm.model.weights import EncoderConfig, EncoderLayerWeights, EncoderWeights

# per-layer names recorded in an encoder trace, plus "embed" (post embedding LayerNorm)
ENCODER_TRACE_KEYS = ("attn", "attn_out", "attn_ln", "inter", "act", "mlp_out", "out_ln")


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
