"""Shared x shared products with a growing operand (PermLLM's appending Beaver triples, §4.3).

For attention over a KV cache that grows by rows: Z = X @ Y^T (scores, Y = K) or Z = X @ Y
(weighted values, Y = V), batched over a leading group dimension (one group per KV head).

Each row of Y is masked once, when it is appended: Y = E_Y + B with E_Y public to both parties and
<B> kept by both for the rest of the session (the helper keeps B too, to deal C). Each call masks
the fresh X with a fresh A:

    in:  <X> (G, mx, k), <Y_new> (G, m_new, ·) appended to the cache first; scales s_x, s_y
    out: <Z>, scale s_x + s_y; the user share is not dealt
    helper deals: <A>, <B_new> (both halves seeded), <C> = <A @ op(B)> (owner half seeded, user half dealt)
    one flight, both at once: X_i - A_i and Y_new_i - B_new_i      8*(|X| + |Y_new|) bytes each way
    Z_i = [owner] E_X op(E_Y) + E_X op(B_i) + A_i op(E_Y) + C_i
where op(M) = M^T for scores and M for weighted values. A one-time pad per row: E_Y is opened once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from permllm.sharing import Shared
from protocols.context import shape_key


class GrowingOperand:
    """One party's state of a growing operand Y (e.g. one layer's K cache).

    transpose: True for X @ Y^T (scores), False for X @ Y (weighted values).
    mask: this party's share of B (the helper's dry run keeps the whole B); opened: E_Y = Y - B.
    """

    def __init__(self, name: str, transpose: bool):
        self.name = name
        self.transpose = transpose
        self.mask: torch.Tensor | None = None
        self.opened: torch.Tensor | None = None
        self.rows = 0

    def _op(self, m: torch.Tensor) -> torch.Tensor:
        return m.transpose(-1, -2) if self.transpose else m

    def _append(self, attr: str, rows: torch.Tensor) -> None:
        current = getattr(self, attr)
        setattr(self, attr, rows if current is None else torch.cat([current, rows], dim=1))


@dataclass
class ProductMask:
    """The correlation of one appending product: A (x_shape) and B_new (y_shape) with both halves
    seeded, and C = A @ op(B) over the whole mask B of `cache` so far: the owner's half seeded (made
    with the user in the two-party mode), the user's dealt. The helper's dry run keeps B in the cache."""

    cache: GrowingOperand
    x_shape: tuple
    y_shape: tuple
    out_shape: tuple

    def deal(self, call, ctx) -> None:
        a = call.owner_draw("A", self.x_shape) + call.user_draw("A", self.x_shape)
        b_new = call.owner_draw("B", self.y_shape) + call.user_draw("B", self.y_shape)
        self.cache._append("mask", b_new)
        call.to_user("C", a @ self.cache._op(self.cache.mask) - call.owner_draw("C", self.out_shape))


def product(ctx, x: Shared, y_new: Shared, cache: GrowingOperand) -> Shared:
    """Append <y_new> to the growing operand, then <X @ op(Y)>. 1 flight. See the module docstring."""
    g, mx, k = x.shape
    gy, m_new, d = y_new.shape
    if gy != g:
        raise ValueError(f"{cache.name}: group counts differ ({g} vs {gy})")
    rows = cache.rows + m_new
    expected_k = d if cache.transpose else rows
    if k != expected_k:
        raise ValueError(f"{cache.name}: X has inner size {k}, expected {expected_k}")
    out_shape = (g, mx, rows) if cache.transpose else (g, mx, d)
    key = shape_key(x.shape, y_new.shape, cache.rows)
    out_bits = x.bits + y_new.bits
    if ctx.dealing:
        ctx.deal(
            ctx.call("product:" + cache.name, key), ProductMask(cache, tuple(x.shape), tuple(y_new.shape), out_shape)
        )
        cache.rows = rows
        return Shared.placeholder(out_shape, out_bits)

    mat = ctx.take("product:" + cache.name, key)
    a = mat.draw("A", x.shape)
    b_new = mat.draw("B", y_new.shape)
    mine = torch.cat([(x.local - a).reshape(-1), (y_new.local - b_new).reshape(-1)])
    opened = mine + ctx.exchange(f"prod.{cache.name}", mine)
    e_x = opened[: x.local.numel()].reshape(x.shape)
    cache._append("opened", opened[x.local.numel() :].reshape(y_new.shape))
    cache._append("mask", b_new)
    cache.rows = rows
    # the owner's E_X op(E_Y) + E_X op(B_o) as one product E_X op(E_Y + B_o) (equal mod 2^64)
    held = cache.mask + cache.opened if ctx.is_owner else cache.mask
    z = e_x @ cache._op(held) + a @ cache._op(cache.opened) + mat.part("C", out_shape)
    return Shared.of(z, out_bits)
