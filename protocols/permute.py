"""Secure random permutation of a shared tensor, and permuted non-linear evaluation (PermLLM §4.2).

The owner applies a fresh secret permutation pi (drawn from the seed it shares with the helper), the
user sees pi(x) in the clear, evaluates the function and re-shares the result; inverse permuting the
re-shared result restores the original order. pi moves whole equal-length rows (segments) and,
independently, shuffles entries within each row; for element-wise functions the layout is a single
segment, i.e. the whole tensor is shuffled.

    in:  <x>, shape (n, c) (c channels permuted together, e.g. SwiGLU's (gate, up)), scale s
    out: <f(x)>, shape (n, c_out), scale out_bits; the user share is dealt (helper-known)

    helper deals: owner pi, b, b2 (seeded); user a, a2 (seeded), c1 = pi(a) - b, c2 = pi^-1(a2) - b2
    flight 1, user -> owner:  d = x_u - a                        n*c*8 bytes
    flight 2, owner -> user:  w = pi(x_o + d) + b                n*c*8 bytes
    user: z = w + c1 = pi(x); Y = encode(f(decode(z)))
    flight 3, user -> owner:  e = Y - a2                         n*c_out*8 bytes
    owner: y_o = pi^-1(e) + b2        user: y_u = c2
Check: y_o + y_u = pi^-1(Y - a2) + pi^-1(a2) = pi^-1(Y) = f(x).
pi(t) is the row gather t[pi]; pi^-1 the matching scatter.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from permllm.fixed import ACT_BITS, decode, encode
from permllm.kernels import gather_rows, scatter_rows
from permllm.sharing import Shared
from protocols.functions import UserFunction


def layout_key(n: int, channels: int, lengths) -> str:
    """Identifies a permutation layout: item count, channels and a digest of the segment lengths."""
    digest = hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:12]
    return f"{n}x{channels}/{len(lengths)}seg/{digest}"


def _as_items(x: Shared) -> Shared:
    return x if len(x.shape) == 2 else x.reshape(-1, 1)


def _check_layout(n: int, lengths) -> list[int]:
    lengths = [int(v) for v in lengths]
    if sum(lengths) != n or any(v <= 0 for v in lengths):
        raise ValueError(f"segment lengths must be positive and sum to {n}, got sum {sum(lengths)}")
    return lengths


def _deal_reveal(call, x: Shared, lengths):
    n, c = x.shape
    pi = call.owner_permutation("pi", lengths)
    call.to_user("c1", gather_rows(call.user_draw("a", (n, c)), pi) - call.owner_draw("b", (n, c)))
    return pi


def _reveal_permuted(ctx, mat, x: Shared, lengths, tag: str):
    """Flights 1 and 2: the user ends with pi(x) in the clear (int64), the owner with pi."""
    n, c = x.shape
    d = ctx.user_sends(f"{tag}.mask", lambda: x.local - mat.draw("a", (n, c)), (n, c))
    if ctx.is_owner:
        pi = mat.permutation("pi", lengths)
        ctx.owner_sends(f"{tag}.perm", lambda: gather_rows(x.local + d, pi) + mat.draw("b", (n, c)), (n, c))
        return None, pi
    w = ctx.owner_sends(f"{tag}.perm", None, (n, c))
    return w + mat.dealt("c1", (n, c)), None


def permuted_reveal(ctx, x: Shared, lengths, tag: str = "reveal"):
    """Reveal pi(x) to the user under a fresh owner permutation pi. 2 flights, 2*n*c*8 bytes.

    Returns (user: the permuted plaintext as int64 at scale x.bits, None) and (owner: None, pi).
    The helper's dry run returns None."""
    x = _as_items(x)
    lengths = _check_layout(x.shape[0], lengths)
    key = layout_key(x.shape[0], x.shape[1], lengths)
    if ctx.dealing:
        _deal_reveal(ctx.call("reveal", key), x, lengths)
        return None
    return _reveal_permuted(ctx, ctx.take("reveal", key), x, lengths, tag)


def permuted_apply(ctx, x: Shared, fn: UserFunction, lengths, out_bits: int = ACT_BITS, tag: str = "nl") -> Shared:
    """<fn(x)> by permuted evaluation. 3 flights; bytes 8*n*(2c + c_out). See the module docstring."""
    x = _as_items(x)
    n, c = x.shape
    if c != fn.in_channels:
        raise ValueError(f"{fn.name} takes {fn.in_channels} channels per item, got {c}")
    lengths = _check_layout(n, lengths)
    out_shape = (n, fn.out_channels)
    kind = "nonlinear:" + fn.name
    key = layout_key(n, c, lengths)
    if ctx.dealing:
        call = ctx.call(kind, key)
        pi = _deal_reveal(call, x, lengths)
        c2 = scatter_rows(call.user_draw("a2", out_shape), pi) - call.owner_draw("b2", out_shape)
        call.to_user("c2", c2)
        return Shared.placeholder(out_shape, out_bits, user_share=c2)

    mat = ctx.take(kind, key)
    revealed, pi = _reveal_permuted(ctx, mat, x, lengths, tag)
    if ctx.is_owner:
        e = ctx.user_sends(f"{tag}.reshare", None, out_shape)
        y = scatter_rows(e, pi) + mat.draw("b2", out_shape)
    else:
        values = fn.apply(decode(revealed, x.bits).numpy(), lengths)
        encoded = encode(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)), out_bits)
        ctx.user_sends(f"{tag}.reshare", lambda: encoded - mat.draw("a2", out_shape), out_shape)
        y = mat.dealt("c2", out_shape)
    return Shared(y, out_bits, out_shape, dealt=True)
