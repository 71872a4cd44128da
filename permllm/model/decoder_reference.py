"""Float64 plaintext reference of a Llama-style decoder, computed directly from the extracted weights.

Small standalone blocks on plain float64 tensors (row-vector activations, ``x @ W`` weights):
``rms_norm``, ``rope_cos_sin`` / ``rotate_half`` / ``apply_rope`` (HF "rotate_half" convention),
``causal_attention`` (GQA), ``swiglu_mlp``, ``decoder_layer``; the stateful ``DecoderReference`` adds a
KV cache, ``prefill``, ``decode`` and ``generate_greedy``. ``prefill/decode(..., trace=dict)`` fill the
dict with the intermediate tensors named in ``DECODER_TRACE_KEYS`` (per layer, prefixed ``"layer{i}."``).
"""

from __future__ import annotations

import math

import torch

from permllm.model.weights import DecoderConfig, DecoderLayerWeights, DecoderWeights

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


def _as_ids(ids) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    return t.reshape(-1) if t.dim() == 0 else t


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
