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

Two variants let a step share its hops with another: `permuted_apply_scaled` reveals a second tensor
(pi'(source)) alongside x, both masks in flight 1 and both permuted shares in flight 2, and the user
scales x by a scalar of pi'(source) before f (an RMSNorm folded into the next step);
`permuted_reveal_later` sends the mask and lets the user read the owner's reply at its next
receive, so the next reveal's mask leaves in the same hop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from permllm.errors import FixedPointOverflow
from permllm.fixed import ACT_BITS, MAX_ENCODABLE, decode, encode
from permllm.kernels import gather_rows, scatter_rows
from permllm.sharing import Shared
from protocols.functions import ScaleFunction, UserFunction

_HEADROOM = int(MAX_ENCODABLE)


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


@dataclass
class PermutationMask:
    """The permutation correlation of a permuted step: the user's out = pi(a) - b (or, for the
    re-share, pi^-1(a) - b), pi the owner's seeded permutation `pi` over `lengths`, a the user's seeded
    draw, b the owner's (seeded from the helper; made by oblivious transfer in the two-party mode).

    shape: (n, c) of a, b and out; pi moves the n rows (and entries inside segments, see `lengths`)."""

    pi: str
    lengths: tuple
    a: str
    b: str
    out: str
    shape: tuple
    inverse: bool = False

    def permute(self, t: torch.Tensor, pi: np.ndarray) -> torch.Tensor:
        return scatter_rows(t, pi) if self.inverse else gather_rows(t, pi)

    def deal(self, call, ctx) -> torch.Tensor:
        pi = call.owner_permutation(self.pi, list(self.lengths))
        out = self.permute(call.user_draw(self.a, self.shape), pi) - call.owner_draw(self.b, self.shape)
        call.to_user(self.out, out)
        return out


def _deal_reveal(ctx, call, x: Shared, lengths, name: str = "") -> None:
    mask = PermutationMask("pi" + name, tuple(lengths), "a" + name, "b" + name, "c1" + name, tuple(x.shape))
    ctx.deal(call, mask)


def _send_mask(ctx, mat, x: Shared, tag: str, name: str = "") -> torch.Tensor:
    """Flight 1: the user sends d = x_u - a; both return d."""
    return ctx.user_sends(f"{tag}.mask", lambda: x.local - mat.draw("a" + name, x.shape), x.shape)


def _send_permuted(ctx, mat, x: Shared, d: torch.Tensor, lengths, tag: str, name: str = ""):
    """Flight 2, owner side: sends w = pi(x_o + d) + b and returns pi."""
    pi = mat.permutation("pi" + name, lengths)
    ctx.send(f"{tag}.perm", gather_rows(x.local + d, pi) + mat.part("b" + name, x.shape))
    return pi


def _unmask(mat, w: torch.Tensor, name: str = "") -> torch.Tensor:
    """User side: pi(x) = w + c1."""
    return w + mat.dealt("c1" + name, tuple(w.shape))


def _reveal_permuted(ctx, mat, x: Shared, lengths, tag: str):
    """Flights 1 and 2: the user ends with pi(x) in the clear (int64), the owner with pi."""
    d = _send_mask(ctx, mat, x, tag)
    if ctx.is_owner:
        return None, _send_permuted(ctx, mat, x, d, lengths, tag)
    return _unmask(mat, ctx.receive(f"{tag}.perm", x.shape)), None


def permuted_reveal(ctx, x: Shared, lengths, tag: str = "reveal"):
    """Reveal pi(x) to the user under a fresh owner permutation pi. 2 flights, 2*n*c*8 bytes.

    Returns (user: the permuted plaintext as int64 at scale x.bits, None) and (owner: None, pi).
    The helper's dry run returns None."""
    x = _as_items(x)
    lengths = _check_layout(x.shape[0], lengths)
    key = layout_key(x.shape[0], x.shape[1], lengths)
    if ctx.dealing:
        _deal_reveal(ctx, ctx.call("reveal", key), x, lengths)
        return None
    return _reveal_permuted(ctx, ctx.take("reveal", key), x, lengths, tag)


def permuted_reveal_later(ctx, x: Shared, lengths, then: Callable[[torch.Tensor], None], tag: str = "reveal") -> None:
    """`permuted_reveal` whose second flight the user reads at its next receive, not now.

    The user sends its mask and goes on sending in the same hop (e.g. the mask of the next reveal);
    the owner answers at once. `then(pi(x))` (int64 at scale x.bits) runs on the user's side just
    before its next `ctx.receive`. Same material and messages as `permuted_reveal`; returns None."""
    x = _as_items(x)
    lengths = _check_layout(x.shape[0], lengths)
    key = layout_key(x.shape[0], x.shape[1], lengths)
    if ctx.dealing:
        _deal_reveal(ctx, ctx.call("reveal", key), x, lengths)
        return
    mat = ctx.take("reveal", key)
    d = _send_mask(ctx, mat, x, tag)
    if ctx.is_owner:
        _send_permuted(ctx, mat, x, d, lengths, tag)
    else:
        ctx.receive_later(f"{tag}.perm", x.shape, lambda w: then(_unmask(mat, w)))


def permuted_apply(ctx, x: Shared, fn: UserFunction, lengths, out_bits: int = ACT_BITS, tag: str = "nl") -> Shared:
    """<fn(x)> by permuted evaluation. 3 flights; bytes 8*n*(2c + c_out). See the module docstring."""
    x = _as_items(x)
    n, c = x.shape
    lengths = _check_function_layout(x, fn, lengths)
    kind = "nonlinear:" + fn.name
    key = layout_key(n, c, lengths)
    if ctx.dealing:
        call = ctx.call(kind, key)
        _deal_reveal(ctx, call, x, lengths)
        return _deal_reshare(ctx, call, lengths, (n, fn.out_channels), out_bits)
    mat = ctx.take(kind, key)
    revealed, pi = _reveal_permuted(ctx, mat, x, lengths, tag)
    values = None if ctx.is_owner else fn.apply(decode(revealed, x.bits).numpy(), lengths)
    return _reshare(ctx, mat, pi, values, (n, fn.out_channels), out_bits, tag)


def permuted_apply_scaled(
    ctx,
    x: Shared,
    fn: UserFunction,
    lengths,
    source: Shared,
    scale: ScaleFunction,
    out_bits: int = ACT_BITS,
    tag: str = "nl",
    source_tag: str = "src",
) -> Shared:
    """<fn(s * x)> with s = scale(source), a scalar of the whole of <source> (e.g. 1/rms of a row).

    Folds a per-tensor scaling such as an RMSNorm into the next non-linear step: the user sees
    pi'(source) and pi(x) under two fresh permutations and computes s from pi'(source) (s must be
    invariant under permutation). 3 flights, as `permuted_apply`: both masks leave the user in the
    first, both permuted tensors the owner in the second, the re-share is the third. Bytes: that of
    `permuted_apply` on x plus 2*8*|source| (the source's mask and its permuted share).
    Raises FixedPointOverflow on the user's side when a revealed value reaches 2^62 (see trunc.py)."""
    x, source = _as_items(x), _as_items(source)
    n, c = x.shape
    lengths = _check_function_layout(x, fn, lengths)
    source_lengths = [source.shape[0]]
    kind = f"nonlinear:{fn.name}*{scale.name}"
    key = layout_key(n, c, lengths) + "+" + layout_key(source.shape[0], source.shape[1], source_lengths)
    if ctx.dealing:
        call = ctx.call(kind, key)
        _deal_reveal(ctx, call, source, source_lengths, name=".src")
        _deal_reveal(ctx, call, x, lengths)
        return _deal_reshare(ctx, call, lengths, (n, fn.out_channels), out_bits)
    mat = ctx.take(kind, key)
    d_source = _send_mask(ctx, mat, source, source_tag, name=".src")
    d = _send_mask(ctx, mat, x, tag)
    values = pi = None
    if ctx.is_owner:
        _send_permuted(ctx, mat, source, d_source, source_lengths, source_tag, name=".src")
        pi = _send_permuted(ctx, mat, x, d, lengths, tag)
    else:
        seen_source = _unmask(mat, ctx.receive(f"{source_tag}.perm", source.shape), name=".src")
        seen = _unmask(mat, ctx.receive(f"{tag}.perm", x.shape))
        check_headroom(seen_source, source_tag)
        check_headroom(seen, tag)
        s = scale.apply(decode(seen_source, source.bits).numpy().reshape(-1))
        values = fn.apply(decode(seen, x.bits).numpy() * s, lengths)
    return _reshare(ctx, mat, pi, values, (n, fn.out_channels), out_bits, tag)


def check_headroom(values: torch.Tensor, what: str) -> None:
    """Raise FixedPointOverflow if an opened ring value reaches 2^62 in magnitude: past that bound a
    value no longer decodes reliably (and a truncation of it could fail), so growth is caught before it wraps."""
    if bool(((values >= _HEADROOM) | (values <= -_HEADROOM)).any()):
        raise FixedPointOverflow(f"{what}: an opened value reached 2^62 (fixed-point headroom exhausted)")


def _check_function_layout(x: Shared, fn: UserFunction, lengths) -> list[int]:
    if x.shape[1] != fn.in_channels:
        raise ValueError(f"{fn.name} takes {fn.in_channels} channels per item, got {x.shape[1]}")
    return _check_layout(x.shape[0], lengths)


def _deal_reshare(ctx, call, lengths, out_shape, out_bits: int) -> Shared:
    mask = PermutationMask("pi", tuple(lengths), "a2", "b2", "c2", tuple(out_shape), inverse=True)
    return Shared.placeholder(out_shape, out_bits, user_share=ctx.deal(call, mask))


def _reshare(ctx, mat, pi, values: np.ndarray | None, out_shape, out_bits: int, tag: str) -> Shared:
    """Flight 3: the user re-shares Y = encode(values) as e = Y - a2; the owner's share is pi^-1(e) + b2."""
    if ctx.is_owner:
        e = ctx.user_sends(f"{tag}.reshare", None, out_shape)
        y = scatter_rows(e, pi) + mat.part("b2", out_shape)
    else:
        encoded = encode(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)), out_bits)
        ctx.user_sends(f"{tag}.reshare", lambda: encoded - mat.draw("a2", out_shape), out_shape)
        y = mat.dealt("c2", out_shape)
    return Shared(y, out_bits, out_shape, dealt=True)
