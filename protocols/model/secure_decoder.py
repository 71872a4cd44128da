"""The secure Llama-style decoder: one driver that the owner, the user and the helper's dry run share.

Each party builds a `SecureDecoder` from the public architecture and its own view of the linear
weights (`decoder_weights`), then calls `forward(ctx, tokens, count)` for the prefill and for each
generated token. The owner passes tokens=None (it never sees them); the helper's dry run passes a
`DealerContext` and deals the material the same calls will consume.

One layer, m new positions, cache length L after appending (messages in sequence):
    RMSNorm (permuted)                               3
    QKV linear (input dealt)                         0
    RoPE on Q, K (public, local); rescale Q, K, V    1   (trunc by 32 bits)
    scores Q K^T (appending Beaver)                  1
    causal softmax (permuted rows)                   3
    weights @ V (appending Beaver)                   1
    rescale                                          1
    output projection                                1
    RMSNorm (permuted)                               3
    gate/up linear (input dealt)                     0
    SwiGLU (permuted, gate and up jointly)           3
    down projection (input dealt)                    0
                                                    17
The critical path is shorter: 12 flights per layer (PermLLM: 18), because five of these messages
leave the user right after its previous one (its share is already known to it: dealt, or computed
locally from its own shares) and so travel on the same one-way hop. The netsim flight clock measures
this depth directly. Per token outside the layers: embedding 1, final RMSNorm 3, lm_head 0.

Decode steps (one position after the prefill) fold the second RMSNorm into the SwiGLU step: RMSNorm
is one scalar 1/rms(h) per row, and the gains are already in W_gate/up, so the owner computes the
unnormalised h @ W_gate/up (input masked: 1 message, on the user's hop) and the user, shown pi'(h)
and the permuted pairs in one owner flight, applies 1/rms(pi'(h)) before SiLU. That takes the norm's
own two flights out: 10 per layer. With `for_selection`, the final RMSNorm is folded into the token
choice the same way: the owner reveals pi'(h) in the same flight as the selection's permuted logits,
which are the unnormalised h @ W_head, and `normalized_chooser` scales them by 1/rms before choosing.
The unnormalised values are larger: the fold holds only where they stay far below 2^62 at scale
LINEAR_BITS + WEIGHT_BITS (docs/DESIGN.md, "Folded norms"); the prefill, whose first position
carries the model's largest activations, keeps the unfused steps.
"""

from __future__ import annotations

import numpy as np
import torch

from permllm.errors import FixedPointOverflow, ProtocolError
from permllm.fixed import ACT_BITS, LINEAR_BITS, MAX_ENCODABLE, ROPE_BITS, WEIGHT_BITS, decode, encode
from permllm.ring_kernels import rotate_heads
from permllm.sharing import Shared
from protocols.beaver import GrowingOperand, product
from protocols.context import Role
from protocols.functions import SOFTMAX, SWIGLU, inverse_rms, rms_normalize
from protocols.linear import LinearWeight, linear, lookup
from protocols.model.decoder_weights import DecoderArch
from protocols.model.step_hooks import StepHooks
from protocols.permute import check_headroom, permuted_apply, permuted_apply_scaled, permuted_reveal_later
from protocols.trunc import trunc

UNNORMALISED_LIMIT = MAX_ENCODABLE / 2.0 ** (LINEAR_BITS + WEIGHT_BITS)
"""The largest magnitude (2^14) the unnormalised gate/up values and logits of a folded norm may reach."""


class SecureDecoder(StepHooks):
    """Per-session state of one party: its weights, the KV caches and the position."""

    def __init__(
        self, arch: DecoderArch, weights: dict[str, LinearWeight], max_positions: int, *, fold_norms: bool = True
    ):
        """fold_norms=False keeps the unfused RMSNorm steps in decode too (all three parties must agree)."""
        self.arch = arch
        self.fold_norms = fold_norms
        self.weights = weights
        self.max_positions = max_positions
        self.position = 0
        self.keys = [GrowingOperand(f"L{i}.k", transpose=True) for i in range(arch.layers)]
        self.values = [GrowingOperand(f"L{i}.v", transpose=False) for i in range(arch.layers)]
        self._norm = rms_normalize(arch.rms_eps)
        self._inverse_rms = inverse_rms(arch.rms_eps)
        self._logit_scale: float | None = None
        self._raw_logit_bits: int | None = None
        self._cos, self._sin = _rope_tables(arch, max_positions)
        self.step_hooks = []

    def forward(self, ctx, tokens: list[int] | None, count: int, *, for_selection: bool = False) -> Shared:
        """Run `count` new positions through the model; returns <logits> of the last one, shape
        (1, vocab). The user passes the token ids, the owner and helper pass None.

        Without `for_selection` the logits are normalised, at LINEAR_BITS. With it, a decode step
        returns the unnormalised <h @ W_head> (scale LINEAR_BITS + WEIGHT_BITS) for `select_token`, and
        the user's pi'(h) arrives with the selection's permuted logits: choose through `normalized_chooser`."""
        if self.position + count > self.max_positions:
            raise ValueError(f"{self.position + count} positions exceed the prepared {self.max_positions}")
        fold = self.fold_norms and count == 1 and self.position > 0
        h = self._mark("embedding", ctx, lambda: self._embed(ctx, tokens, count))
        for i in range(self.arch.layers):
            h = self._layer(ctx, i, h, count, fold)
        self.position += count
        last = h if count == 1 else _last_row(h)
        self._logit_scale = 1.0
        if for_selection and fold:
            self._logit_scale = None
            self._mark(
                "norm",
                ctx,
                lambda: permuted_reveal_later(
                    ctx, last.reshape(-1, 1), [self.arch.hidden], self._keep_logit_scale(last), tag="fnorm"
                ),
            )
            return self._mark("lm_head", ctx, lambda: linear(ctx, last, self.weights["lm_head"]))
        x = self._mark(
            "norm", ctx, lambda: permuted_apply(ctx, last.reshape(-1, 1), self._norm, [self.arch.hidden], tag="fnorm")
        )
        return self._mark("lm_head", ctx, lambda: linear(ctx, x.reshape(1, self.arch.hidden), self.weights["lm_head"]))

    def normalized_chooser(self, choose):
        """The user's chooser for the logits of `forward(..., for_selection=True)`: multiplies the
        permuted logits by the final norm's 1/rms (1 where the norm was not folded) before `choose`.
        None stays None (the owner and the dry run choose nothing)."""
        if choose is None:
            return None

        def normalized(logits):
            scale, self._logit_scale = self._logit_scale, None
            if scale is None:
                raise ProtocolError("the final norm's permuted row did not arrive before the token choice")
            bits, self._raw_logit_bits = self._raw_logit_bits, None
            if bits is not None and float(np.abs(logits).max()) >= MAX_ENCODABLE / 2.0**bits:
                raise FixedPointOverflow("unnormalised logits reached 2^62 (fixed-point headroom exhausted)")
            return choose(logits * scale)

        return normalized

    def _keep_logit_scale(self, last: Shared):
        def keep(seen: torch.Tensor) -> None:
            check_headroom(seen, "fnorm")
            self._logit_scale = self._inverse_rms.apply(decode(seen, last.bits).numpy().reshape(-1))
            self._raw_logit_bits = last.bits + self.weights["lm_head"].bits

        return keep

    def _embed(self, ctx, tokens, count: int) -> Shared:
        return lookup(ctx, tokens, count, self.weights["embed"])

    def _layer(self, ctx, i: int, h: Shared, m: int, fold: bool) -> Shared:
        a = self.arch
        x = self._mark(
            "norm", ctx, lambda: permuted_apply(ctx, h.reshape(-1, 1), self._norm, [a.hidden] * m, tag=f"L{i}.n1")
        )
        x = x.reshape(m, a.hidden)
        attn = self._attention(ctx, i, x, m)
        h = h + attn
        if fold:
            return h + self._normalized_mlp(ctx, i, h)
        x = self._mark(
            "norm", ctx, lambda: permuted_apply(ctx, h.reshape(-1, 1), self._norm, [a.hidden] * m, tag=f"L{i}.n2")
        )
        return h + self._mlp(ctx, i, x.reshape(m, a.hidden), m)

    def _attention(self, ctx, i: int, x: Shared, m: int) -> Shared:
        a = self.arch
        hd, groups = a.head_dim, a.kv_heads
        per_group = a.heads // groups
        qkv = self._mark("qkv", ctx, lambda: linear(ctx, x, self.weights[f"L{i}.qkv"]))
        q_end, k_end = a.heads * hd, (a.heads + groups) * hd
        positions = slice(self.position, self.position + m)
        cos, sin = self._cos[positions], self._sin[positions]

        # RoPE on the query and key heads (public tables, local), V shifted to the same scale: one fused
        # pass equal to rotate_heads_torch on q and k and `<< ROPE_BITS` on v (permllm.ring_kernels.rotate_heads)
        aligned = qkv.map(lambda t: rotate_heads(t, cos, sin, k_end, hd, ROPE_BITS), bits=qkv.bits + ROPE_BITS)
        qkv16 = self._mark("qkv", ctx, lambda: trunc(ctx, aligned, aligned.bits - ACT_BITS, holder=Role.USER))
        # group layout: queries (G, per_group*m, hd) ordered (head in group, position); keys/values (G, m, hd)
        q = qkv16.map(
            lambda t: (
                t[:, :q_end].reshape(m, groups, per_group, hd).permute(1, 2, 0, 3).reshape(groups, per_group * m, hd)
            ),
            shape=(groups, per_group * m, hd),
        )
        k = qkv16.map(
            lambda t: t[:, q_end:k_end].reshape(m, groups, hd).transpose(0, 1).contiguous(), shape=(groups, m, hd)
        )
        v = qkv16.map(lambda t: t[:, k_end:].reshape(m, groups, hd).transpose(0, 1).contiguous(), shape=(groups, m, hd))
        scores = self._mark("scores", ctx, lambda: product(ctx, q, k, self.keys[i]))
        length = self.keys[i].rows
        if m == 1:  # one new position sees every key: the causal layout is the whole score tensor, row by row
            lengths = [length] * (groups * per_group)
            flat = scores.map(lambda t: t.reshape(-1), shape=(groups * per_group * length,))
            probs = self._mark("softmax", ctx, lambda: permuted_apply(ctx, flat, SOFTMAX, lengths, tag=f"L{i}.sm"))
            weights = probs.map(lambda t: t.reshape(groups, per_group, length), shape=(groups, per_group, length))
        else:
            valid = _causal_mask(self.position, m, length, per_group, groups)
            lengths = valid.sum(dim=2).reshape(-1).tolist()
            flat = scores.map(lambda t: t[valid], shape=(int(valid.sum()),))
            probs = self._mark("softmax", ctx, lambda: permuted_apply(ctx, flat, SOFTMAX, lengths, tag=f"L{i}.sm"))

            def place(t: torch.Tensor) -> torch.Tensor:
                full = torch.zeros((groups, per_group * m, length), dtype=torch.int64)
                full[valid] = t.reshape(-1)
                return full

            weights = probs.map(place, shape=(groups, per_group * m, length))
        mixed = self._mark("weighted_values", ctx, lambda: product(ctx, weights, v, self.values[i]))
        heads = mixed.map(
            lambda t: t.reshape(groups, per_group, m, hd).permute(2, 0, 1, 3).reshape(m, a.heads * hd),
            shape=(m, a.heads * hd),
        )
        heads = self._mark("weighted_values", ctx, lambda: trunc(ctx, heads, heads.bits - ACT_BITS, holder=Role.OWNER))
        return self._mark("out_proj", ctx, lambda: linear(ctx, heads, self.weights[f"L{i}.o"]))

    def _mlp(self, ctx, i: int, x: Shared, m: int) -> Shared:
        inter = self.arch.intermediate
        gate_up = self._mark("mlp", ctx, lambda: linear(ctx, x, self.weights[f"L{i}.gate_up"]))
        pairs = gate_up.reshape(m * inter, 2)
        act = self._mark("mlp", ctx, lambda: permuted_apply(ctx, pairs, SWIGLU, [m * inter], tag=f"L{i}.act"))
        return self._mark("mlp", ctx, lambda: linear(ctx, act.reshape(m, inter), self.weights[f"L{i}.down"]))

    def _normalized_mlp(self, ctx, i: int, h: Shared) -> Shared:
        """RMSNorm folded into SwiGLU for one position: <h> (1, hidden) at LINEAR_BITS; the gate/up
        pairs come out at LINEAR_BITS + WEIGHT_BITS and the user scales them by 1/rms(pi'(h))."""
        inter = self.arch.intermediate
        gate_up = self._mark("mlp", ctx, lambda: linear(ctx, h, self.weights[f"L{i}.gate_up"]))
        act = self._mark(
            "mlp",
            ctx,
            lambda: permuted_apply_scaled(
                ctx,
                gate_up.reshape(inter, 2),
                SWIGLU,
                [inter],
                h.reshape(-1, 1),
                self._inverse_rms,
                tag=f"L{i}.act",
                source_tag=f"L{i}.n2",
            ),
        )
        return self._mark("mlp", ctx, lambda: linear(ctx, act.reshape(1, inter), self.weights[f"L{i}.down"]))


def _rope_tables(arch: DecoderArch, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (positions, head_dim) in the rotate-half convention, encoded at ROPE_BITS."""
    hd = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return encode(torch.cos(angles), ROPE_BITS), encode(torch.sin(angles), ROPE_BITS)


def _causal_mask(start: int, m: int, length: int, per_group: int, groups: int) -> torch.Tensor:
    """valid[g, j*m + i, key] = key <= start + i, for the (G, per_group*m, length) score layout."""
    query_pos = start + torch.arange(m)
    keys = torch.arange(length)
    per_query = keys[None, :] <= query_pos[:, None]
    return per_query.repeat(per_group, 1).unsqueeze(0).expand(groups, -1, -1).contiguous()


def _last_row(h: Shared) -> Shared:
    return h.map(lambda t: t[-1:].contiguous(), shape=(1, h.shape[1]))
