"""Rescaling a shared fixed-point tensor: <x> at scale s -> <x / 2^k> at scale s - k.

No local share truncation (which fails with probability ~|x|/2^63 per element). Instead a
dealer-masked opening with a top-bit correction, exact up to one unit in the last place and with
zero failure probability whenever |x| < 2^62:

    helper deals: r = r_o + r_u uniform in Z_2^64 (both seeded);
                  <alpha> = <floor(r / 2^k)> and <rho> = <bit 63 of r>
                  (owner halves seeded, user halves dealt)
    both send c_i = x_i + r_i (+ 2^62 on the owner's side), at once: 1 flight, n*8 bytes each way
    c = c_o + c_u = x' + r mod 2^64 with x' = x + 2^62 in [0, 2^63)
    the wrap of x' + r past 2^64 is w = rho * (1 - c_63)  (x' < 2^63, so it can only wrap when r_63 = 1
    and then it wrapped exactly when c_63 = 0), linear in <rho> since c is public:
    y_i = [owner] (floor(c / 2^k) - 2^(62-k)) - alpha_i + 2^(64-k) (1 - c_63) rho_i
    so y = floor(x' / 2^k) - 2^(62-k) + e, e in {0, -1}   (the usual borrow of the low bits).
c is uniform over the ring, so neither party learns anything about x.
Reference: the MSB-known truncation pattern, e.g. Escudero et al., CRYPTO 2020.
"""

from __future__ import annotations

from permllm.ring import logical_rshift, top_bit
from permllm.ring_kernels import OFFSET_BITS as _OFFSET_BITS
from permllm.ring_kernels import truncation_close, truncation_open
from permllm.sharing import Shared
from protocols.context import shape_key


def trunc(ctx, x: Shared, k: int) -> Shared:
    """<x> / 2^k, scale x.bits - k. 1 flight (simultaneous exchange), 8 bytes per element each way."""
    if not 0 < k < _OFFSET_BITS:
        raise ValueError(f"truncation shift must be in (0, 62), got {k}")
    if k > x.bits:
        raise ValueError(f"cannot drop {k} bits from a value at scale {x.bits}")
    shape = x.shape
    key = shape_key(shape, k)
    if ctx.dealing:
        call = ctx.call("trunc", key)
        r = call.owner_draw("r", shape) + call.user_draw("r", shape)
        alpha_o = call.owner_draw("alpha", shape)
        rho_o = call.owner_draw("rho", shape)
        call.to_user("alpha", logical_rshift(r, k) - alpha_o)
        call.to_user("rho", top_bit(r) - rho_o)
        return Shared.placeholder(shape, x.bits - k)

    mat = ctx.take("trunc", key)
    mine = truncation_open(x.local, mat.draw("r", shape), ctx.is_owner)
    theirs = ctx.exchange("trunc", mine)
    alpha, rho = mat.part("alpha", shape), mat.part("rho", shape)
    # the formula above in one fused pass (permllm.ring_kernels): c = mine + theirs,
    # y = 2^(64-k) (1 - c_63) rho - alpha, plus floor(c / 2^k) - 2^(62-k) on the owner's side
    y = truncation_close(mine, theirs, rho, alpha, k, ctx.is_owner)
    return Shared.of(y, x.bits - k)
