"""Linear layer: the owner's weight times a shared activation (PermLLM §4.1, exact over Z_2^64).

Setting: the owner holds W (in x @ W orientation, encoded at `weight.bits`) and a mask U; during
preparation it sent W~ = W - U to the user once. The helper knows U (from the owner's seed), never W.

    in:  <x> = (x_o, x_u), shape (m, d_in), scale s
    out: <y> = <x @ W + b>, shape (m, d_out), scale s + weight.bits; user share not dealt

Online, general case (1 flight, user -> owner, m*d_in*8 bytes), "opened input":
    helper deals: user v, s (seeded), owner M = v @ U - s
    user sends d = x_u - v
    owner: y_o = (x_o + d) @ W + M + b          user: y_u = v @ W~ + s
Check: y_o + y_u = (x - v) W + v U - s + v (W - U) + s = x W.
The owner multiplies by its own (packed) W only and never needs U online; the user's share does not
depend on the input, so `precompute_user_terms` computes it when the material arrives, before the
online phase (the user's online work is then the subtraction d = x_u - v).
Online, dealt input (x_u known to the helper, e.g. the output of a permuted non-linear step):
    0 flights: the helper deals owner M = x_u @ U - s directly; y_o = x_o @ W + M + b,
    y_u = x_u @ W~ + s. Check: x_o W + x_u U - s + x_u (W - U) + s = x W. When x_u is the dealt
    output of the call before (a permuted non-linear step), `precompute_user_terms` computes y_u
    ahead too.

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

    name: identifies the weight across parties (the helper derives U from it; nobody holds U in a
        LinearWeight: the owner never needs it online).
    bits: fixed-point scale of W.
    local: owner: W (int32 where it fits, else int64); user: W~ = W - U (int64); helper: None.
    bias: owner only, float64 (encoded at the output scale on use), or None.
    d_in, d_out: the shape of W.
    """

    name: str
    bits: int
    d_in: int
    d_out: int
    local: torch.Tensor | None = None
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
        v = x.user_share if x.dealt else call.user_draw("v", (m, d_in))
        call.to_owner("M", ctx.mask_product(weight.name, v) - call.user_draw("s", out_shape))
        return Shared.placeholder(out_shape, out_bits)

    mat = ctx.take("linear:" + weight.name, key)
    if x.dealt:
        if ctx.is_owner:
            y = ring_matmul(x.local, weight.local) + mat.dealt("M", out_shape)
        else:
            y = _dealt_user_term(mat, weight, x.local)
    elif ctx.is_owner:
        d = ctx.receive(f"lin.{weight.name}", (m, d_in))
        y = ring_matmul(x.local + d, weight.local) + mat.dealt("M", out_shape)
    else:
        ctx.send(f"lin.{weight.name}", x.local - mat.draw("v", (m, d_in)))
        y = _user_term(mat, weight, m)
    if ctx.is_owner and weight.bias is not None:
        y = y + encode(weight.bias, out_bits)
    return Shared.of(y, out_bits)


_TERM = "v@W~+s"
"""The name under which a linear call's input-independent user share is kept with its material."""


def _user_term(mat, weight: LinearWeight, m: int) -> torch.Tensor:
    """The user's share v @ W~ + s of a masked-input call: precomputed with the material, or now."""
    term = mat.local(_TERM)
    if term is None:
        term = ring_matmul(mat.draw("v", (m, weight.d_in)), weight.local) + mat.draw("s", (m, weight.d_out))
    return term


_DEALT_TERM = "x_u@W~+s"
"""The name under which a dealt-input call's user share is kept, with the input x_u it was computed from."""


def _dealt_user_term(mat, weight: LinearWeight, x_u: torch.Tensor) -> torch.Tensor:
    """The user's share x_u @ W~ + s of a dealt-input call: kept ahead for exactly this x_u, or now."""
    kept = mat.local(_DEALT_TERM)
    if kept is not None and kept[0].shape == x_u.shape and torch.equal(kept[0], x_u):
        return kept[1]
    return ring_matmul(x_u, weight.local) + mat.draw("s", (x_u.shape[0], weight.d_out))


def precompute_user_terms(material, weights: dict[str, LinearWeight]) -> int:
    """The user's input-independent shares of the linear calls queued in `material` (a
    `QueuedMaterial`), computed now and kept with each call's material. Returns how many calls it prepared.

    Masked input: v @ W~ + s, so that the online step only subtracts d = x_u - v and sends it.
    Dealt input right after a permuted non-linear call (a norm before QKV, SwiGLU before the down
    projection): x_u is that call's dealt c2, so x_u @ W~ + s is computed from it now; the online call
    uses it only when its input equals that c2 (compared exactly), else computes its share itself.
    (m, d_out) int64 per call (and the m * d_in input of a dealt one): for SmolLM2-135M ~2 MB per
    generated token."""
    count = 0
    previous = None
    for call in material.pending():
        kind, key, before, previous = call.kind, call.key, previous, call
        if not kind.startswith("linear:"):
            continue
        weight = weights.get(kind[len("linear:") :])
        if weight is None:
            continue
        m = int(key.split("x", 1)[0])
        if key.endswith("|masked") and call.local(_TERM) is None:
            call.keep(_TERM, _user_term(call, weight, m))
            count += 1
        elif key.endswith("|dealt") and call.local(_DEALT_TERM) is None:
            x_u = _nonlinear_output(before, m * weight.d_in)
            if x_u is not None:
                x_u = x_u.reshape(m, weight.d_in)
                call.keep(_DEALT_TERM, (x_u, ring_matmul(x_u, weight.local) + call.draw("s", (m, weight.d_out))))
                count += 1
    return count


def _nonlinear_output(call, numel: int) -> torch.Tensor | None:
    """The user's dealt share c2 of a permuted non-linear call's output, if `call` is one with `numel` entries."""
    if call is None or not call.kind.startswith("nonlinear:"):
        return None
    c2 = call.ahead("c2")
    return c2 if c2 is not None and c2.numel() == numel else None


def lookup(ctx, token_ids: list[int] | None, count: int, weight: LinearWeight) -> Shared:
    """<W[t]> for `count` token ids t that only the user knows (embedding lookup, PermLLM §4.5).

    The linear protocol on the one-hot input onehot(t) whose owner share is zero:
        helper deals: user v, s (seeded), owner M = v @ U - s
        flight 1, user -> owner: d = onehot(t) - v          count * vocab * 8 bytes
        owner: y_o = d @ W + M        user: y_u = v @ W~ + s (input independent, as in `linear`)
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
        return Shared.of(ring_matmul(d, weight.local) + mat.dealt("M", out_shape), weight.bits)
    if token_ids is None or len(token_ids) != count:
        raise ValueError(f"the user must supply {count} token ids")
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"token ids must be in [0, {vocab})")
    onehot = torch.zeros(shape, dtype=torch.int64)
    onehot[torch.arange(count), ids] = 1
    ctx.send(f"lin.{weight.name}", onehot - mat.draw("v", shape))
    return Shared.of(_user_term(mat, weight, count), weight.bits)
