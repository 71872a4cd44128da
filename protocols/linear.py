"""Linear layer: the owner's weight times a shared activation (PermLLM §4.1, exact over Z_2^64).

Setting: the owner holds W (in x @ W orientation, encoded at `weight.bits`) and a mask U; during
preparation it sent W~ = W - U to the user once. The helper knows U (from the owner's seed), never W.

    in:  <x> = (x_o, x_u), shape (m, d_in), scale s
    out: <y> = <x @ W + b>, shape (m, d_out), scale s + weight.bits; user share not dealt

Online, general case (1 flight, user -> owner, m*d_in*8 bytes):
    helper deals: user v, s (seeded), owner M = v @ U - s
    user sends d = x_u - v
    owner: y_o = x_o @ W + d @ U + M + b        user: y_u = x_u @ W~ + s
Online, dealt input (x_u known to the helper, e.g. the output of a permuted non-linear step):
    0 flights: the helper deals owner M = x_u @ U - s directly; y_o = x_o @ W + M + b.
Check: y_o + y_u = x_o W + (x_u - v) U + v U - s + x_u (W - U) + s = x W.

Why s: the owner knows U, so an unmasked M = v @ U (or x_u @ U) together with d would give it
x_u @ U, and from that x_u itself (U is left-invertible mod 2^64 for d_in <= d_out, and for the
embedding x_u @ U is the row U[t] of the user's token). With s uniform and unknown to the owner,
d and M are independent one-time pads. Cost of s: a seeded (m, d_out) draw on the user's side;
the owner's material has the same size as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from permllm.fixed import encode
from permllm.ring_matmul import ring_matmul
from permllm.sharing import Shared
from protocols.context import shape_key


@dataclass
class LinearWeight:
    """A linear layer as one party holds it.

    name: identifies the weight across parties (the helper derives U from it).
    bits: fixed-point scale of W.
    local: owner: W (int32 where it fits, else int64); user: W~ = W - U (int64); helper: None.
    mask: owner: U (needed for d @ U); user and helper: None (the helper calls weight_mask(name)).
    bias: owner only, float64 (encoded at the output scale on use), or None.
    d_in, d_out: the shape of W.
    """

    name: str
    bits: int
    d_in: int
    d_out: int
    local: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def linear(ctx, x: Shared, weight: LinearWeight) -> Shared:
    """<x> @ W (+ b). See the module docstring for messages, flights and bytes."""
    m, d_in = x.shape
    if d_in != weight.d_in:
        raise ValueError(f"{weight.name}: input has {d_in} features, weight expects {weight.d_in}")
    key = shape_key((m, d_in, weight.d_out), "dealt" if x.dealt else "masked")
    out_bits = x.bits + weight.bits
    out_shape = (m, weight.d_out)
    if ctx.dealing:
        call = ctx.call("linear:" + weight.name, key)
        u = ctx.weight_mask(weight.name)
        v = x.user_share if x.dealt else call.user_draw("v", (m, d_in))
        call.to_owner("M", ring_matmul(v, u) - call.user_draw("s", out_shape))
        return Shared.placeholder(out_shape, out_bits)

    mat = ctx.take("linear:" + weight.name, key)
    if x.dealt:
        correction = mat.dealt("M", out_shape) if ctx.is_owner else None
    else:
        d = ctx.user_sends(f"lin.{weight.name}", lambda: x.local - mat.draw("v", (m, d_in)), (m, d_in))
        correction = ring_matmul(d, weight.mask) + mat.dealt("M", out_shape) if ctx.is_owner else None
    y = ring_matmul(x.local, weight.local)
    if ctx.is_owner:
        y = y + correction
        if weight.bias is not None:
            y = y + encode(weight.bias, out_bits)
    else:
        y = y + mat.draw("s", out_shape)
    return Shared.of(y, out_bits)


def lookup(ctx, token_ids: list[int] | None, count: int, weight: LinearWeight) -> Shared:
    """<W[t]> for `count` token ids t that only the user knows (embedding lookup, PermLLM §4.5).

    The linear protocol on the one-hot input onehot(t) whose owner share is zero, so nobody
    multiplies by it: the user's share is the row gather W~[t] + s and the owner's d @ U + M.
        helper deals: user v, s (seeded), owner M = v @ U - s
        flight 1, user -> owner: d = onehot(t) - v          count * vocab * 8 bytes
        owner: y_o = d @ U + M = U[t] - s        user: y_u = W~[t] + s
    out: <W[t]>, shape (count, d_out), scale weight.bits; same material as `linear` on that input.
    """
    vocab = weight.d_in
    shape = (count, vocab)
    if ctx.dealing:
        return linear(ctx, Shared.placeholder(shape, 0), weight)
    mat = ctx.take("linear:" + weight.name, shape_key((count, vocab, weight.d_out), "masked"))
    out_shape = (count, weight.d_out)
    if ctx.is_owner:
        d = ctx.receive(f"lin.{weight.name}", shape)
        return Shared.of(ring_matmul(d, weight.mask) + mat.dealt("M", out_shape), weight.bits)
    if token_ids is None or len(token_ids) != count:
        raise ValueError(f"the user must supply {count} token ids")
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"token ids must be in [0, {vocab})")
    onehot = torch.zeros(shape, dtype=torch.int64)
    onehot[torch.arange(count), ids] = 1
    ctx.send(f"lin.{weight.name}", onehot - mat.draw("v", shape))
    return Shared.of(weight.local[ids] + mat.draw("s", out_shape), weight.bits)
