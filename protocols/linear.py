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
    y_u = x_u @ W~ + s. Check: x_o W + x_u U - s + x_u (W - U) + s = x W.
x_u is then the user's dealt output c2 of the call just before (a permuted step), already in its
material: `precompute_user_terms` computes x_u @ W~ + s ahead too, and the online call checks that
its input is that c2. So the user needs W~ only while it precomputes, one weight (even one row block)
at a time, and may hold none online (a LinearWeight with local=None).

Why s: the owner knows U, so an unmasked M = v @ U (or x_u @ U) together with d would give it
x_u @ U, and from that x_u itself (U is left-invertible mod 2^64 for d_in <= d_out, and for the
embedding x_u @ U is the row U[t] of the user's token). With s uniform and unknown to the owner,
d and M are independent one-time pads. Cost of s: a seeded (m, d_out) draw on the user's side;
the owner's material has the same size as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from permllm.errors import MaterialMismatch
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
    local: owner: W (int32 where it fits, else int64); user: W~ = W - U (int64), or None once every
        call's share is precomputed (`precompute_user_terms`); helper: None.
    bias: owner only, float64 (encoded at the output scale on use), or None.
    d_in, d_out: the shape of W.
    """

    name: str
    bits: int
    d_in: int
    d_out: int
    local: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass
class LinearMask:
    """The correlation of one linear call: the owner's M = v @ U - s, the user's v (seeded unless the
    input is dealt: then v is its dealt share) and s (seeded).

    v: the dealt input's user share (in the helper's dry run the tensor itself, in the two-party plan
    the positions of its entries among the plan's dealt shares), or None for a seeded v."""

    weight: str
    rows: int
    d_in: int
    d_out: int
    v: torch.Tensor | None = None

    def deal(self, call, ctx) -> None:
        v = self.v if self.v is not None else call.user_draw("v", (self.rows, self.d_in))
        call.to_owner("M", ctx.mask_product(self.weight, v) - call.user_draw("s", (self.rows, self.d_out)))


def linear(ctx, x: Shared, weight: LinearWeight) -> Shared:
    """<x> @ W (+ b). See the module docstring for messages, flights and bytes."""
    m, d_in = x.shape
    if d_in != weight.d_in:
        raise ValueError(f"{weight.name}: input has {d_in} features, weight expects {weight.d_in}")
    key = shape_key((m, d_in, weight.d_out), "dealt" if x.dealt else "masked")
    out_bits = x.bits + weight.bits
    out_shape = (m, weight.d_out)
    if ctx.dealing:
        ctx.deal(ctx.call("linear:" + weight.name, key), LinearMask(weight.name, m, d_in, weight.d_out, x.user_share))
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
_INPUT = "x_u"
"""The dealt input a dealt-input call's share was precomputed for (kept with it, checked on use)."""
PRECOMPUTE_BLOCK_ELEMENTS = 1 << 21
"""Entries of W~ per row block when `precompute_user_terms` multiplies by blocks (16 MB of int64)."""


def keep_user_term(material, term: torch.Tensor, x_u: torch.Tensor | None = None) -> None:
    """Keep a linear call's user share made ahead by another route (the two-party mode's v @ W - R):
    `term` for a masked-input call, or for a dealt-input call together with the input x_u it is for."""
    material.keep(_TERM, term)
    if x_u is not None:
        material.keep(_INPUT, x_u)


def _held(weight: LinearWeight) -> torch.Tensor:
    if weight.local is None:
        raise MaterialMismatch(
            f"{weight.name}: the user holds no W~ for this call and its share was not precomputed for this input"
        )
    return weight.local


def _user_term(mat, weight: LinearWeight, m: int) -> torch.Tensor:
    """The user's share v @ W~ + s of a masked-input call: precomputed with the material, or now."""
    term = mat.local(_TERM)
    if term is None:
        term = ring_matmul(mat.draw("v", (m, weight.d_in)), _held(weight)) + mat.draw("s", (m, weight.d_out))
    return term


def _dealt_user_term(mat, weight: LinearWeight, x_u: torch.Tensor) -> torch.Tensor:
    """The user's share x_u @ W~ + s of a dealt-input call: precomputed for this very x_u, or now."""
    term, seen = mat.local(_TERM), mat.local(_INPUT)
    if term is not None and seen is not None and torch.equal(seen, x_u):
        return term
    return ring_matmul(x_u, _held(weight)) + mat.draw("s", (x_u.shape[0], weight.d_out))


def user_term_inputs(material) -> dict[str, list]:
    """The user's linear calls queued in `material` whose share it can compute ahead, by weight name:
    [(call, m, d_in, x)] with x the input the share multiplies (None: the masked call's v, drawn when
    needed; a tensor: a dealt-input call's x_u, the c2 the call just before dealt with m*d_in entries)."""
    inputs: dict[str, list] = {}
    previous = None
    for call in material.pending():
        kind, key = call.kind, call.key
        if kind.startswith("linear:") and call.local(_TERM) is None:
            m, d_in, _ = (int(n) for n in key.split("|", 1)[0].split("x"))
            if key.endswith("|masked"):
                inputs.setdefault(kind[len("linear:") :], []).append((call, m, d_in, None))
            elif key.endswith("|dealt") and previous is not None and previous.numel() == m * d_in:
                inputs.setdefault(kind[len("linear:") :], []).append((call, m, d_in, previous.reshape(m, d_in)))
        previous = call.peek("c2")
    return inputs


def precompute_weight_terms(calls: list, d_out: int, blocks) -> int:
    """The shares of `calls` (one weight's entry of `user_term_inputs`) from W~ given as row blocks:
    blocks yields (i, j, W~[i:j]) covering the rows in order. sum_b x[:, b] @ W~[b] + s is the same
    ring value as x @ W~ + s, so only one block of W~ is needed at a time. Returns len(calls)."""
    inputs = [call.draw("v", (m, d_in)) if x is None else x for call, m, d_in, x in calls]
    sums = [torch.zeros((m, d_out), dtype=torch.int64) for _, m, _, _ in calls]
    for i, j, block in blocks:
        for x, acc in zip(inputs, sums):
            acc += ring_matmul(x[:, i:j].contiguous(), block)
    for (call, m, _, x), acc in zip(calls, sums):
        call.keep(_TERM, acc + call.draw("s", (m, d_out)))
        if x is not None:
            call.keep(_INPUT, x)
    return len(calls)


def weight_blocks(local: torch.Tensor, rows: int | None = None):
    """(i, j, local[i:j]) row blocks of a held W~ (PRECOMPUTE_BLOCK_ELEMENTS entries each unless `rows`)."""
    d_in, d_out = local.shape
    step = rows or max(1, PRECOMPUTE_BLOCK_ELEMENTS // max(d_out, 1))
    for i in range(0, d_in, step):
        yield i, min(d_in, i + step), local[i : i + step]


def user_terms_missing(material) -> set[str]:
    """The weights of the user's linear calls queued in `material` that have no precomputed share."""
    pending = material.pending()
    return {c.kind[len("linear:") :] for c in pending if c.kind.startswith("linear:") and c.local(_TERM) is None}


def precompute_user_terms(material, weights: dict[str, LinearWeight]) -> int:
    """The user's input-independent shares of every linear call queued in `material` (a
    `QueuedMaterial`) whose weight `weights` holds: v @ W~ + s of a masked-input call, x_u @ W~ + s of
    a dealt-input call (see the module docstring), computed now and kept with each call's material,
    so that the online step only subtracts d = x_u - v and sends it (or adds nothing). Returns how
    many calls it prepared. (m, d_out) int64 per call: for SmolLM2-135M ~1.5 MB per generated token."""
    count = 0
    for name, calls in user_term_inputs(material).items():
        weight = weights.get(name)
        if weight is not None and weight.local is not None:
            count += precompute_weight_terms(calls, weight.d_out, weight_blocks(weight.local))
    return count


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
